"""Every registered loss (dino_fast.losses.registry.LOSSES) against its float64 definition:
value and gradient on fresh random inputs in each supported dtype, inputs unchanged, finite."""
from __future__ import annotations

import pytest
import torch

from dino_fast.losses.registry import LOSSES, LossSpec, register_loss

CASES = [(name, dtype) for name, spec in sorted(LOSSES.items()) for dtype in spec.dtypes]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d).replace('torch.', '')}" for n, d in CASES])
def test_loss_matches_float64_definition(name: str, dtype: torch.dtype) -> None:
    spec = LOSSES[name]
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    inputs = spec.example(g, dtype)
    before = [t.clone() for t in inputs]
    x = inputs[0].detach().requires_grad_()
    got = spec.fast(x, *inputs[1:])
    assert got.dim() == 0 and torch.isfinite(got)
    (gx,) = torch.autograd.grad(got, x)
    x64 = inputs[0].detach().double().requires_grad_()
    want = spec.reference(x64, *[t.double() for t in inputs[1:]])
    (gref,) = torch.autograd.grad(want, x64)
    rtol = dict(spec.rtol)[str(dtype).replace("torch.", "")]
    assert abs(got.double().item() - want.item()) <= rtol * max(1.0, abs(want.item())), (got.item(), want.item())
    # the gradient in the input's dtype: relative to its scale, at that dtype's resolution
    err = (gx.double() - gref).abs().max().item() / max(gref.abs().max().item(), 1e-30)
    assert err <= {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype], err
    for a, b in zip(inputs, before):
        assert torch.equal(a, b), "a loss changed its input"


def test_registry_refuses_a_second_loss_of_a_name() -> None:
    spec = LOSSES["koleo"]
    with pytest.raises(ValueError, match="already registered"):
        register_loss(LossSpec("koleo", spec.fast, spec.reference, spec.example))
    assert register_loss(spec) is spec  # the same spec again is a no-op

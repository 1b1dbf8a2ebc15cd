"""Per-student-crop pair weights of the fused DINO-loss op (``crop_weights``, Mugs' group loss):
the eager CPU path, the Triton kernels (interpreter, gradient buffer NaN-poisoned, random upstream
gradient) and the autograd / custom-op paths against the float64 pair loop with the same weights."""
from __future__ import annotations

import pytest
import torch

from dino_fast.ops.soft_ce.function import dino_loss, dino_loss_with_colsum
from tests._loss_utils import make_inputs, reference64, rel

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def mugs_weights(ncrops: int, n_teacher: int = 2) -> list[float]:
    """1/2 (mean over the large pairs + mean over the small pairs) as per-crop pair weights."""
    n_large = n_teacher * n_teacher - n_teacher
    n_small = n_teacher * (ncrops - n_teacher)
    return [0.5 / n_large] * n_teacher + [0.5 / n_small] * (ncrops - n_teacher)


def random_weights(ncrops: int, zero: bool) -> list[float]:
    w = (torch.rand(ncrops, dtype=torch.float64) * 2).tolist()
    if zero:
        w[1] = 0.0
    return w


def ref64(S, T, c, ncrops, n_teacher, w, tau_s=0.1, tau_t=0.04):
    return reference64(S, T, c, ncrops, n_teacher, tau_s, tau_t, crop_weights=w)


CASES = [  # (B, K, ncrops, n_teacher, dtype, weights)
    (1, 1, 3, 2, torch.float32, "mugs"),
    (3, 7, 4, 2, torch.float32, "random0"),
    (3, 4099, 12, 2, torch.float32, "mugs"),
    (2, 1000, 5, 3, torch.float32, "random"),
    (3, 1000, 4, 1, torch.float32, "random0"),
    (1, 65536, 4, 2, torch.float32, "mugs"),
    (3, 4099, 12, 2, torch.bfloat16, "mugs"),
    (8, 300, 6, 2, torch.float16, "random"),
]


def _weights(kind: str, ncrops: int, n_teacher: int) -> list[float]:
    return mugs_weights(ncrops, n_teacher) if kind == "mugs" else random_weights(ncrops, kind == "random0")


@pytest.mark.parametrize("B,K,ncrops,n_teacher,dtype,kind", CASES)
def test_triton_kernels_with_crop_weights_match_float64(B, K, ncrops, n_teacher, dtype, kind):
    from dino_fast.ops.soft_ce.kernels import dino_loss_backward_triton, dino_loss_forward_triton

    S, T, c = make_inputs(B, K, ncrops, n_teacher, dtype)
    w = _weights(kind, ncrops, n_teacher)
    ref_loss, ref_g = ref64(S, T, c, ncrops, n_teacher, w)
    wt = torch.tensor(w, dtype=torch.float32)
    c32 = c.reshape(-1).float().contiguous()
    kw = dict(ncrops=ncrops, n_teacher=n_teacher, student_temp=0.1, teacher_temp=0.04, crop_weights=wt)
    loss, lse, tmax, tsum, colsum = dino_loss_forward_triton(S, T, c32, **kw)
    upstream = float(torch.empty(()).uniform_(0.5, 2.0))
    out = torch.full_like(S, float("nan"))
    g = dino_loss_backward_triton(torch.tensor(upstream), S, T, c32, lse, tmax, tsum, out=out, **kw)
    assert g is out and torch.isfinite(g).all(), "gradient has unwritten (NaN-poisoned) elements"
    if K == 1:
        assert abs(loss.item()) < 1e-6 and g.float().abs().max().item() < 1e-5
        return
    assert rel(loss, ref_loss) < TOL[dtype], (loss.item(), ref_loss.item())
    assert rel(g, upstream * ref_g) < TOL[dtype]
    assert rel(colsum, T.double().sum(0)) < 1e-6
    if kind == "random0":   # crop 1 has weight 0: its gradient rows are exactly zero
        B_ = S.shape[0] // ncrops
        assert torch.equal(g[B_:2 * B_], torch.zeros_like(g[B_:2 * B_]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K,ncrops,n_teacher,kind", [(3, 7, 4, 2, "random0"), (3, 4099, 12, 2, "mugs"),
                                                       (2, 1000, 5, 3, "random"), (3, 999, 4, 1, "random0"),
                                                       (64, 200, 6, 2, "mugs")])
def test_eager_path_with_crop_weights_matches_float64(B, K, ncrops, n_teacher, kind, dtype):
    """The CPU fast path through autograd, with a random upstream gradient."""
    S, T, c = make_inputs(B, K, ncrops, n_teacher, dtype)
    w = _weights(kind, ncrops, n_teacher)
    ref_loss, ref_g = ref64(S, T, c, ncrops, n_teacher, w)
    s = S.clone().requires_grad_()
    loss, colsum = dino_loss_with_colsum(s, T, c, ncrops=ncrops, n_teacher=n_teacher, student_temp=0.1,
                                         teacher_temp=0.04, backend="torch", crop_weights=w)
    upstream = float(torch.empty(()).uniform_(0.5, 2.0))
    (loss * upstream).backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    assert rel(loss.detach(), ref_loss) < TOL[dtype], (loss.item(), ref_loss.item())
    assert rel(s.grad, upstream * ref_g) < TOL[dtype]
    assert rel(colsum, T.double().sum(0)) < 1e-6
    if kind == "random0":
        assert torch.equal(s.grad[B:2 * B], torch.zeros_like(s.grad[B:2 * B]))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_uniform_weights_equal_the_default(backend):
    B, K, ncrops = 3, 513, 6
    S, T, c = make_inputs(B, K, ncrops)
    n_terms = 2 * ncrops - 2
    a, b = S.clone().requires_grad_(), S.clone().requires_grad_()
    kw = dict(ncrops=ncrops, student_temp=0.1, teacher_temp=0.04, backend=backend)
    la = dino_loss(a, T, c, **kw)
    lb = dino_loss(b, T, c, crop_weights=[1.0 / n_terms] * ncrops, **kw)
    la.backward()
    lb.backward()
    assert rel(lb.detach(), la.detach()) < 1e-6 and rel(b.grad, a.grad) < 1e-6


def test_mugs_weights_through_triton_autograd_and_custom_op():
    """The eager autograd Function and the torch.library custom op (the torch.compile path) with
    the Mugs weights, on both fast implementations."""
    B, K, ncrops = 2, 700, 12
    S, T, c = make_inputs(B, K, ncrops)
    w = mugs_weights(ncrops)
    ref_loss, ref_g = ref64(S, T, c, ncrops, 2, w)
    s = S.clone().requires_grad_()
    loss = dino_loss(s, T, c, ncrops=ncrops, student_temp=0.1, teacher_temp=0.04, backend="triton", crop_weights=w)
    loss.backward()
    assert rel(loss.detach(), ref_loss) < 1e-5 and rel(s.grad, ref_g) < 1e-5
    for impl in ("torch", "triton"):
        s = S.clone().requires_grad_()
        out = torch.ops.dino_fast.dino_loss_fwd(s, T, c.reshape(-1).contiguous(), ncrops, 2, 0.1, 0.04, impl, w)
        out[0].backward()
        assert rel(out[0].detach(), ref_loss) < 1e-5 and rel(s.grad, ref_g) < 1e-5, impl


@pytest.mark.parametrize("weights,exc,match", [
    ([0.1, 0.2], ValueError, r"crop_weights: expected 4 weights \(one per student crop\), got 2"),
    ([0.1, -0.2, 0.1, 0.1], ValueError, r"crop_weights\[1\]: expected a finite float >= 0, got -0.2"),
    ([0.1, float("nan"), 0.1, 0.1], ValueError, r"crop_weights\[1\]: expected a finite float >= 0"),
    ([0.0, 0.0, 0.0, 0.0], ValueError, r"at least one weight > 0"),
    ([0.1, "a", 0.1, 0.1], TypeError, r"crop_weights\[1\]: expected a float, got str"),
    (0.25, TypeError, r"crop_weights: expected a sequence of 4 floats or None, got float"),
    (torch.ones(2, 2), ValueError, r"crop_weights: expected a 1-D tensor of 4 weights"),
])
def test_bad_crop_weights_are_refused(weights, exc, match):
    S, T, c = make_inputs(2, 16, 4)
    with pytest.raises(exc, match=match):
        dino_loss(S, T, c, ncrops=4, student_temp=0.1, teacher_temp=0.04, backend="torch", crop_weights=weights)


def test_launcher_refuses_a_bad_weight_tensor():
    from dino_fast.ops.soft_ce.kernels import dino_loss_forward_triton

    S, T, c = make_inputs(2, 16, 4)
    with pytest.raises(ValueError, match=r"crop_weights: expected a float32 \(4,\) tensor on cpu, got torch.float64"):
        dino_loss_forward_triton(S, T, c.reshape(-1).contiguous(), ncrops=4, student_temp=0.1, teacher_temp=0.04,
                                 crop_weights=torch.ones(4, dtype=torch.float64))

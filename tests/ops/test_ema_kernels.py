"""dino_fast/ops/ema/kernels.py under TRITON_INTERPRET=1: values vs float64, one launch, 12 bytes per element,
nothing written outside the buffer, launcher checks, and sm_80 / sm_90 builds without spills."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import common  # noqa: E402
from dino_fast.ops.ema import kernels as kema  # noqa: E402
from dino_fast.ops.ema.teacher import TeacherEMA  # noqa: E402

MOMENTA = [0.5, 0.996, 0.9999, 1.0, 0.0, 0.3]


def _check(t0: torch.Tensor, s: torch.Tensor, out: torch.Tensor, m: float) -> None:
    t64, s64 = t0.double(), s.double()
    ref = m * t64 + (1 - m) * s64
    scale = (m * t64.abs() + (1 - m) * s64.abs()).max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-6 * scale, f"max abs err {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("n", [1, 127, 4096, 4097, 65537])
@pytest.mark.parametrize("m", MOMENTA)
def test_kernel_matches_float64(n: int, m: float) -> None:
    pad = 257
    # the buffers are slices of larger ones: the guard regions must stay untouched
    t_big = torch.randn(n + 2 * pad)
    s = torch.randn(n) * torch.rand(()) * 10
    t = t_big[pad:pad + n]
    t0 = t.clone()
    guard = t_big.clone()
    kema.ema_flat_(t, s, m)
    _check(t0, s, t, m)
    assert torch.equal(t_big[:pad], guard[:pad]) and torch.equal(t_big[pad + n:], guard[pad + n:])
    if m == 1.0:
        assert torch.equal(t, t0)
    if m == 0.0:
        assert torch.equal(t, s)


@pytest.mark.parametrize("block,num_warps", [(128, 1), (1024, 4), (8192, 8)])
def test_kernel_block_sizes(block: int, num_warps: int) -> None:
    n = int(torch.randint(1, 20000, ()).item())
    t, s = torch.randn(n), torch.randn(n)
    t0 = t.clone()
    kema.ema_flat_(t, s, 0.996, block=block, num_warps=num_warps)
    _check(t0, s, t, 0.996)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_kernel_special_values_propagate() -> None:
    t = torch.tensor([1.0, float("inf"), 2.0, float("nan"), -3.0])
    s = torch.tensor([float("nan"), 1.0, float("-inf"), 0.0, 4.0])
    ref = t.clone().lerp_(s, 1 - 0.9)
    kema.ema_flat_(t, s, 0.9)
    assert torch.equal(torch.isnan(t), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert torch.allclose(t[fin], ref[fin], rtol=1e-6, atol=0)


def test_one_launch_and_12_bytes_per_element() -> None:
    n = int(torch.randint(10_000, 50_000, ()).item())
    t, s = torch.randn(n), torch.randn(n)
    stats = common.count_triton_traffic(lambda: kema.ema_flat_(t, s, 0.996))
    assert stats["launches"] == 1
    assert stats["bytes_loaded"] == 8 * n and stats["bytes_stored"] == 4 * n


class _CountingKernel:
    """Wraps the JIT kernel: counts ``kernel[grid](...)`` launches."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.launches = 0

    def __getitem__(self, grid):
        launcher = self.inner[grid]

        def run(*args, **kwargs):
            self.launches += 1
            return launcher(*args, **kwargs)

        return run


def _wide_model(shapes: list[tuple[int, int]]) -> nn.Module:
    m = nn.Module()
    for i, shape in enumerate(shapes):
        m.register_parameter(f"p{i}", nn.Parameter(torch.randn(shape)))
    return m


def test_teacher_ema_triton_one_launch_per_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """~170 tensors (a ViT-S/16 + head has about that many): one kernel launch per update, and
    the whole update moves 12 bytes per parameter."""
    shapes = [(int(torch.randint(1, 40, ()).item()), int(torch.randint(1, 9, ()).item())) for _ in range(170)]
    student = _wide_model(shapes)
    teacher = _wide_model(shapes)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    ema = TeacherEMA(teacher, student, backend="triton")
    counter = _CountingKernel(kema._ema_kernel)
    monkeypatch.setattr(kema, "_ema_kernel", counter)
    t64 = [p.detach().double().clone() for p in teacher.parameters()]
    s64 = [p.detach().double().clone() for p in student.parameters()]
    for k in range(1, 4):
        ema.update(0.99)
        assert counter.launches == k
        t64 = [0.99 * a + 0.01 * b for a, b in zip(t64, s64)]
    for a, p in zip(t64, teacher.parameters()):
        # three fp32 updates against float64: a few ulps of the values' magnitude
        assert (p.double() - a).abs().max().item() <= 1e-6 * max(a.abs().max().item(), 1.0)
    monkeypatch.undo()
    stats = common.count_triton_traffic(lambda: ema.update(0.99))
    assert stats["launches"] == 1
    assert stats["bytes"] == 12 * ema.numel


def test_launcher_checks() -> None:
    t, s = torch.randn(100), torch.randn(100)
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor"):
        kema.ema_flat_(t.tolist(), s, 0.9)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        kema.ema_flat_(t.view(10, 10), s.view(10, 10), 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        kema.ema_flat_(torch.randn(200)[::2], s, 0.9)
    with pytest.raises(ValueError, match="dtype"):
        kema.ema_flat_(t.half(), s.half(), 0.9)
    with pytest.raises(ValueError, match="same shape"):
        kema.ema_flat_(t, torch.randn(101), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        kema.ema_flat_(t, s, 1.5)
    with pytest.raises(ValueError, match="momentum"):
        kema.ema_flat_(t, s, float("nan"))
    with pytest.raises(TypeError, match="momentum"):
        kema.ema_flat_(t, s, True)
    with pytest.raises(ValueError, match="block"):
        kema.ema_flat_(t, s, 0.9, block=1000)
    with pytest.raises(ValueError, match="num_warps"):
        kema.ema_flat_(t, s, 0.9, num_warps=3)
    with pytest.raises(ValueError, match="same memory"):
        kema.ema_flat_(t, t, 0.9)
    empty = torch.empty(0)
    assert kema.ema_flat_(empty, torch.empty(0), 0.9) is empty


@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_without_spills(arch: int) -> None:
    from triton.runtime.jit import JITFunction

    from dino_fast.ops.compile_check import compile_for

    # Under TRITON_INTERPRET=1 @triton.jit returns an InterpretedFunction; compile the same
    # Python source as a JITFunction.
    fn = kema._ema_kernel
    if not isinstance(fn, JITFunction):
        fn = JITFunction(fn.fn)
    for n_type in ("i32", "i64"):
        res = compile_for(
            fn,
            {"teacher_ptr": "*fp32", "student_ptr": "*fp32", "n": n_type, "weight": "fp32", "BLOCK": "constexpr"},
            {"BLOCK": kema.DEFAULT_BLOCK},
            arch=arch, num_warps=kema.DEFAULT_NUM_WARPS,
        )
        assert res.arch == arch
        assert not res.spills, res
        assert 0 < res.registers <= 255, res

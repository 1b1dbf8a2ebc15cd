"""The row-aligned soft-target cross-entropy op (iBOT patch loss), every backend against the
float64 reference: shapes, dtypes, poisoned gradient buffers, bytes counted under the
interpreter (S and T read once for the statistics and once for the gradient), launcher checks,
custom-op registration, and compilation for sm_80 / sm_90 with no spills."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import common  # noqa: E402
from dino_fast.ops.patch_ce import patch_ce_loss, patch_ce_loss_with_colsum  # noqa: E402
from dino_fast.ops.patch_ce.kernels import (  # noqa: E402
    patch_ce_backward_triton,
    patch_ce_forward_triton,
    patch_launch_config,
)
from dino_fast.reference.ibot import patch_ce_reference  # noqa: E402
from tests._loss_utils import rel  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}
TAU_S, TAU_T = 0.1, 0.04


def _inputs(R: int, K: int, dtype: torch.dtype):
    S = torch.randn(R, K).to(dtype)
    T = (torch.randn(R, K) + 0.3 * torch.randn(1, K)).to(dtype)
    c = 0.1 * torch.randn(K)
    w = torch.rand(R) + 0.01
    return S, T, c, w


def _ref64(S, T, c, w, tau_t=TAU_T):
    s = S.detach().double().requires_grad_()
    loss = patch_ce_reference(s, T.double(), c.double(), w.double(), student_temp=TAU_S, teacher_temp=tau_t)
    (g,) = torch.autograd.grad(loss, s)
    return loss.detach(), g


CASES = [  # (R, K, dtype); R > 32 spans several row groups, K > 1024 several tiles
    (1, 1, torch.float32),
    (3, 7, torch.float32),
    (33, 4099, torch.float32),
    (70, 1000, torch.float32),
    (2, 65536, torch.float32),
    (33, 4099, torch.bfloat16),
    (40, 300, torch.float16),
    (2, 65536, torch.bfloat16),
]


def _loss_close(loss: torch.Tensor, ref: torch.Tensor, S: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> bool:
    """|loss - ref| within TOL relative plus, below fp64, a few fp32 eps of the terms that cancel:
    the loss is sum_r w_r (lse_r - <q_r, s_r / tau_s>), terms of size ~max|s| / tau_s, so a small
    loss (0.059 at K = 7) shows their absolute rounding as a large relative error (1.7e-5 failed
    a fresh-clone CI run at 1e-5 flat)."""
    slack = 0.0 if dtype == torch.float64 else (
        8 * torch.finfo(torch.float32).eps * S.double().abs().max().item() / TAU_S * max(1.0, w.abs().sum().item()))
    return abs(float(loss) - float(ref)) <= TOL[dtype] * abs(float(ref)) + slack


def _grad_close(g: torch.Tensor, ref: torch.Tensor, S: torch.Tensor, T: torch.Tensor, c: torch.Tensor,
                w: torch.Tensor, up: float, dtype: torch.dtype) -> bool:
    """||g - ref|| within TOL of ||ref|| plus, below fp64, a few fp32 eps of the terms that cancel:
    the gradient is up * w_r (p_rk - q_rk) / tau_s with p and q each rounded in fp32 (about eps
    of p + q per element), so where student and teacher agree on a near one-hot row (p = 0.9955,
    q = 0.9998) the difference is small and that rounding is a large part of it (6.9e-5 relative
    failed a fresh-clone CI run at 1e-5 flat; a plain fp32 softmax difference gave 1.1e-5)."""
    err = (g.double() - ref.double()).norm().item()
    if dtype == torch.float64:
        return err <= TOL[dtype] * ref.norm().item()
    p = torch.softmax(S.double() / TAU_S, dim=-1)
    q = torch.softmax((T.double() - c.double()) / TAU_T, dim=-1)
    terms = (up * w.double()[:, None] / TAU_S * (p + q)).norm().item()
    return err <= TOL[dtype] * ref.norm().item() + 8 * torch.finfo(torch.float32).eps * terms


@pytest.mark.parametrize("R,K,dtype", CASES)
def test_kernels_match_float64_reference_with_poisoned_gradient(R, K, dtype):
    S, T, c, w = _inputs(R, K, dtype)
    up = float(torch.empty(()).uniform_(0.5, 2.0))
    ref_loss, ref_g = _ref64(S, T, c, w)
    loss, lse, tm, tz, colsum = patch_ce_forward_triton(S, T, c, w, student_temp=TAU_S, teacher_temp=TAU_T)
    out = torch.full_like(S, float("nan"))
    g = patch_ce_backward_triton(torch.tensor(up), S, T, c, w, lse, tm, tz, student_temp=TAU_S,
                                 teacher_temp=TAU_T, out=out)
    assert g is out and g.dtype == dtype and torch.isfinite(g).all(), "unwritten (NaN-poisoned) gradient elements"
    if K == 1:
        assert abs(loss.item()) < 1e-6 and g.float().abs().max().item() < 1e-6
    else:
        assert _loss_close(loss, ref_loss, S, w, dtype), (loss.item(), ref_loss.item())
        assert _grad_close(g, up * ref_g, S, T, c, w, up, dtype), rel(g, up * ref_g)
    assert rel(lse, torch.logsumexp(S.double() / TAU_S, dim=-1)) < 1e-6
    assert rel(colsum, T.double().sum(0)) < 1e-6
    x = (T.double() - c.double()) / TAU_T
    assert rel(tm, x.amax(-1)) < 1e-6
    assert rel(tz, torch.exp(x - x.amax(-1, keepdim=True)).sum(-1)) < 1e-5


@pytest.mark.parametrize("R,K,dtype", CASES + [(17, 3001, torch.float64)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autograd_backends_match_float64_reference(backend, R, K, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the kernels take fp32/bf16/fp16")
    S, T, c, w = _inputs(R, K, dtype)
    ref_loss, ref_g = _ref64(S, T, c, w)
    s = S.clone().requires_grad_()
    loss, colsum = patch_ce_loss_with_colsum(s, T, c, w, student_temp=TAU_S, teacher_temp=TAU_T, backend=backend)
    up = float(torch.empty(()).uniform_(0.5, 2.0))
    (loss * up).backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    if K > 1:
        assert _loss_close(loss.detach(), ref_loss, S, w, dtype), (loss.item(), ref_loss.item())
        assert _grad_close(s.grad, up * ref_g, S, T, c, w, up, dtype), rel(s.grad, up * ref_g)
    assert rel(colsum, T.double().sum(0)) < (1e-12 if dtype == torch.float64 else 1e-6)
    assert torch.equal(S, s.detach())  # inputs untouched


def test_sinkhorn_style_targets_and_large_logits():
    """Teacher given as log-probabilities at temperature 1 with a zero center (the SK entry), and
    student logits / tau_s far above exp's fp32 range: no overflow on either path."""
    R, K = 9, 2000
    S = torch.randn(R, K) * 30
    logq = torch.log_softmax(torch.randn(R, K) * 3, dim=-1)
    zero, w = torch.zeros(K), torch.rand(R)
    s64 = S.double().requires_grad_()
    ref = patch_ce_reference(s64, logq.double(), zero.double(), w.double(), student_temp=TAU_S, teacher_temp=1.0)
    ref.backward()
    # the Triton kernel rounds s / tau_s (here up to ~1300) in fp32 before exp, so its gradient
    # error scales with eps * max|s / tau_s|: over 200 seeds the worst was 3.0e-5 (torch's
    # log_softmax path 3.2e-7), against 1.5e-4 for eps * max|s / tau_s|; a flat 1e-5 failed a CI run
    grad_tol = {"torch": 1e-5, "triton": max(1e-5, torch.finfo(torch.float32).eps * S.abs().max().item() / TAU_S)}
    for backend in ("torch", "triton"):
        s = S.clone().requires_grad_()
        loss = patch_ce_loss(s, logq, zero, w, student_temp=TAU_S, teacher_temp=1.0, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and rel(loss.detach(), ref.detach()) < 1e-5, backend
        assert rel(s.grad, s64.grad) < grad_tol[backend], (backend, rel(s.grad, s64.grad), grad_tol[backend])


def test_zero_rows_and_zero_weights():
    K = 50
    s = torch.randn(0, K, requires_grad=True)
    loss, colsum = patch_ce_loss_with_colsum(s, torch.randn(0, K), torch.zeros(K), torch.zeros(0),
                                             student_temp=TAU_S, teacher_temp=TAU_T, backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, K) and not colsum.any()
    S, T, c, w = _inputs(6, K, torch.float32)
    w[::2] = 0
    for backend in ("torch", "triton"):
        s = S.clone().requires_grad_()
        patch_ce_loss(s, T, c, w, student_temp=TAU_S, teacher_temp=TAU_T, backend=backend).backward()
        assert not s.grad[::2].any() and s.grad[1::2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_input_read_once_for_the_statistics_and_once_for_the_gradient(dtype):
    """Counted under the interpreter: the forward kernels load S and T once (plus the center
    once per program, the per-tile partials and the weights) and the gradient kernel loads them
    once more and writes dS once; the exact formula."""
    R, K = int(torch.randint(40, 100, ())), int(torch.randint(2000, 6000, ()))
    S, T, c, w = _inputs(R, K, dtype)
    E = S.element_size()
    res = {}
    fwd = common.count_triton_traffic(lambda: res.setdefault("f", patch_ce_forward_triton(
        S, T, c, w, student_temp=TAU_S, teacher_temp=TAU_T)))
    _, lse, tm, tz, _ = res["f"]
    bwd = common.count_triton_traffic(lambda: patch_ce_backward_triton(
        torch.tensor(1.0), S, T, c, w, lse, tm, tz, student_temp=TAU_S, teacher_temp=TAU_T))
    cfg = patch_launch_config(R, K, E)
    n, G = cfg.fwd_tiles, cfg.n_groups
    assert fwd["launches"] == 2 and bwd["launches"] == 1
    assert fwd["bytes_loaded"] + fwd["bytes_stored"] + bwd["bytes_loaded"] + bwd["bytes_stored"] == _traffic(R, K, E)
    assert fwd["bytes_loaded"] == 2 * R * K * E + G * K * 4 + 5 * R * n * 4 + R * 4
    assert fwd["bytes_stored"] == 5 * R * n * 4 + G * K * 4 + 4 * R * 4
    assert bwd["bytes_loaded"] == 2 * R * K * E + G * K * 4 + 4 * R * cfg.bwd_tiles * 4 + cfg.bwd_tiles * G * 4
    assert bwd["bytes_stored"] == R * K * E
    # the floor: read S, read T, write dS. Two passes over S and T are 5/3 of it; the center and
    # the per-tile partials add O(groups x K + rows x tiles), which at these small random sizes can
    # reach 1.76x (bf16, 40 rows). At the benchmark's sizes (B=64 x 2 crops x ~36 masked tokens,
    # K = 65536 and 131072) the exact formula, checked above against the count, stays below 1.75x.
    for rows, k in ((4608, 65536), (4608, 131072)):
        assert _traffic(rows, k, E) / (3 * rows * k * E) < 1.75, (rows, k)


def _traffic(R: int, K: int, E: int) -> int:
    """Bytes the three iBOT kernels move for R rows of K logits of E bytes (the counted formula)."""
    cfg = patch_launch_config(R, K, E)
    n, G = cfg.fwd_tiles, cfg.n_groups
    return (2 * R * K * E + G * K * 4 + 5 * R * n * 4 + R * 4) + (5 * R * n * 4 + G * K * 4 + 4 * R * 4) + (
        2 * R * K * E + G * K * 4 + 4 * R * cfg.bwd_tiles * 4 + cfg.bwd_tiles * G * 4) + R * K * E


def _good(R=5, K=64):
    S, T, c, w = _inputs(R, K, torch.float32)
    return S, T, c, w


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda S, T, c, w: (S.to(torch.int32), T, c, w), TypeError, r"student: expected a float32/bfloat16/float16/float64"),
    (lambda S, T, c, w: (S[:, None], T, c, w), ValueError, r"student: expected a 2-D \(rows, K\) tensor"),
    (lambda S, T, c, w: (S, T[:4], c, w), ValueError, r"teacher: expected shape \(5, 64\)"),
    (lambda S, T, c, w: (S, T, c[:3], w), ValueError, r"center: expected shape \(1, 64\) or \(64,\)"),
    (lambda S, T, c, w: (S, T, c, w[:2]), ValueError, r"weights: expected shape \(5,\)"),
    (lambda S, T, c, w: (S, T, c, w.to("meta")), ValueError, r"one device"),
    (lambda S, T, c, w: (S[:, :0], T[:, :0], c[:0], w), ValueError, r"K >= 1"),
])
def test_functional_rejects_bad_inputs(mutate, exc, match):
    S, T, c, w = mutate(*_good())
    with pytest.raises(exc, match=match):
        patch_ce_loss(S, T, c, w, student_temp=TAU_S, teacher_temp=TAU_T, backend="torch")


def test_launchers_reject_bad_inputs():
    S, T, c, w = _good()
    kw = dict(student_temp=TAU_S, teacher_temp=TAU_T)
    with pytest.raises(TypeError, match="S: expected float32, bfloat16 or float16, got torch.float64"):
        patch_ce_forward_triton(S.double(), T, c, w, **kw)
    with pytest.raises(ValueError, match="w: expected a contiguous float32"):
        patch_ce_forward_triton(S, T, c, w.double(), **kw)
    with pytest.raises(ValueError, match="S: expected unit stride along K"):
        patch_ce_forward_triton(S.t().contiguous().t(), T, c, w, **kw)
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        patch_ce_forward_triton(S, T, c, w, student_temp=0.0, teacher_temp=TAU_T)
    with pytest.raises(ValueError, match="student_temp must be a positive finite float"):
        patch_ce_loss(S, T, c, w, student_temp=-1.0, teacher_temp=TAU_T)
    _, lse, tm, tz, _ = patch_ce_forward_triton(S, T, c, w, **kw)
    with pytest.raises(ValueError, match=r"lse: expected float32 \(5,\)"):
        patch_ce_backward_triton(torch.tensor(1.0), S, T, c, w, lse[:2], tm, tz, **kw)
    with pytest.raises(ValueError, match=r"out: expected torch.float32 \(5, 64\)"):
        patch_ce_backward_triton(torch.tensor(1.0), S, T, c, w, lse, tm, tz, out=torch.empty(5, 63), **kw)


def test_custom_ops_pass_opcheck():
    """The torch.library registrations (schema, fake implementation, autograd) are consistent."""
    S, T, c, w = _good(4, 40)
    S.requires_grad_()
    torch.library.opcheck(torch.ops.dino_fast.patch_ce_fwd, (S, T, c, w, TAU_S, TAU_T, True, "torch"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    s = S.detach().clone().requires_grad_()
    out = torch.ops.dino_fast.patch_ce_fwd(s, T, c, w, TAU_S, TAU_T, True, "triton")
    out[0].backward()
    _, ref_g = _ref64(S, T, c, w)
    assert rel(s.grad, ref_g) < 1e-5


_COMPILE_SCRIPT = r"""
import json, warnings
warnings.filterwarnings("ignore")
from dino_fast.ops.compile_check import compile_for
from dino_fast.ops.patch_ce.kernels import (_patch_fwd_kernel, _patch_bwd_kernel, _patch_combine_kernel,
    patch_launch_config, combine_rows, COMBINE_NUM_WARPS)
import triton
out = []
def rec(r, dt, arch, bk):
    out.append(dict(kernel=r.name, dtype=dt, arch=arch, block_k=bk, registers=r.registers, stack=r.stack,
                    local=r.local, spill_stores=r.spill_stores, spill_loads=r.spill_loads, spills=r.spills))
for K in (65536, 131072):
    for dt in ("fp32", "bf16"):
        cfg = patch_launch_config(4900, K, 4 if dt == "fp32" else 2)
        sig_f = {"S": f"*{dt}", "T": f"*{dt}", "C": "*fp32", **{n: "*fp32" for n in
                 ["SMAX", "SSUM", "TMAX", "TSUM", "DOT", "COLSUM"]}, "R": "i32", "K": "i32", "stride_s": "i32",
                 "stride_t": "i32", "n_tiles": "i32", "rows_per_group": "i32", "inv_tau_s": "fp32",
                 "inv_tau_t": "fp32", "BLOCK_K": "constexpr", "WITH_COLSUM": "constexpr"}
        sig_b = {"S": f"*{dt}", "T": f"*{dt}", "C": "*fp32", "G": f"*{dt}", "GOUT": "*fp32", "W": "*fp32",
                 "LSE": "*fp32", "TMAX": "*fp32", "TZINV": "*fp32", "R": "i32", "K": "i32", "stride_s": "i32",
                 "stride_t": "i32", "stride_g": "i32", "rows_per_group": "i32", "inv_tau_s": "fp32",
                 "inv_tau_t": "fp32", "BLOCK_K": "constexpr"}
        for arch in (80, 90):
            for wc in (True, False):
                r = compile_for(_patch_fwd_kernel, sig_f, {"BLOCK_K": cfg.fwd_block_k, "WITH_COLSUM": wc},
                                arch=arch, num_warps=cfg.num_warps)
                rec(r, dt, arch, cfg.fwd_block_k)
            r = compile_for(_patch_bwd_kernel, sig_b, {"BLOCK_K": cfg.bwd_block_k}, arch=arch, num_warps=cfg.num_warps)
            rec(r, dt, arch, cfg.bwd_block_k)
        if dt == "fp32":
            n = cfg.fwd_tiles
            sig_c = {n_: "*fp32" for n_ in ["SMAX", "SSUM", "TMAX", "TSUM", "DOT", "W", "LSE", "TMOUT", "TZOUT",
                                             "LOSS_ROW"]}
            sig_c.update({"R": "i32", "n_tiles": "i32", "N_P2": "constexpr", "ROWS": "constexpr"})
            for arch in (80, 90):
                r = compile_for(_patch_combine_kernel, sig_c, {"N_P2": triton.next_power_of_2(n),
                                "ROWS": combine_rows(n)}, arch=arch, num_warps=COMBINE_NUM_WARPS)
                rec(r, "fp32", arch, n)
# every int argument specialised to the constant 1, as the JIT does for such values
for fn, sig, extra in ((_patch_fwd_kernel, sig_f, dict(BLOCK_K=128, WITH_COLSUM=True)),
                       (_patch_bwd_kernel, sig_b, dict(BLOCK_K=128)),
                       (_patch_combine_kernel, sig_c, dict(N_P2=1, ROWS=16))):
    sig1 = {k: ("constexpr" if v == "i32" else v) for k, v in sig.items()}
    const = {k: 1 for k, v in sig.items() if v == "i32"}
    const.update(extra)
    r = compile_for(fn, sig1, const, arch=90, num_warps=4)
    rec(r, "ints=1", 90, 128)
print(json.dumps(out))
"""


def test_kernels_compile_for_sm80_sm90_without_spills():
    """The three kernels at the launcher's sizes for DINOv2's iBOT shapes (about 4900 masked rows,
    K = 65536 and 131072), fp32 and bf16, with and without the column sum, and with every int
    argument specialised to 1. A subprocess: compiling needs the real JIT, not the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * (2 * 2 * 3) + 2 * 2 + 3
    for r in results:
        print(r)
        assert not r["spills"], r
        assert r["registers"] > 0

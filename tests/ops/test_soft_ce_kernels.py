"""Triton DINO-loss kernels under TRITON_INTERPRET=1 against the float64 reference, launcher
checks, and compilation for sm_80 / sm_90 with no spills."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dino_fast.ops.soft_ce.function import dino_loss
from dino_fast.ops.soft_ce.kernels import (
    dino_loss_backward_triton,
    dino_loss_forward_triton,
    launch_config,
)
from tests._loss_utils import check_kernels_against_float64, make_inputs, reference64, rel

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

CASES = [  # (B, K, ncrops, n_teacher, dtype): a subset of the cartesian product, interpreter-sized
    (1, 1, 2, 2, torch.float32),
    (3, 7, 4, 2, torch.float32),
    (32, 7, 10, 2, torch.float32),
    (3, 4099, 12, 2, torch.float32),
    (1, 65536, 4, 2, torch.float32),
    (3, 1000, 5, 3, torch.float32),
    (3, 1000, 4, 1, torch.float32),
    (3, 4099, 10, 2, torch.bfloat16),
    (32, 300, 4, 2, torch.float16),
    (1, 65536, 2, 2, torch.bfloat16),
]


@pytest.mark.parametrize("B,K,ncrops,n_teacher,dtype", CASES)
def test_kernels_match_float64_reference(B, K, ncrops, n_teacher, dtype):
    S, T, c = make_inputs(B, K, ncrops, n_teacher, dtype)
    g, _ = check_kernels_against_float64(S, T, c, ncrops, n_teacher, TOL[dtype])
    if K == 1:
        assert g.float().abs().max().item() < 1e-6


def test_large_k_262144_through_autograd():
    S, T, c = make_inputs(1, 262144, 2)
    ref_loss, ref_g = reference64(S, T, c, 2, 2, 0.1, 0.07)
    s = S.clone().requires_grad_()
    loss = dino_loss(s, T, c, ncrops=2, student_temp=0.1, teacher_temp=0.07, backend="triton")
    loss.backward()
    assert rel(loss.detach(), ref_loss) < 1e-5
    assert rel(s.grad, ref_g) < 1e-5


def test_inplace_grad_through_triton():
    S, T, c = make_inputs(2, 3000, 4)
    _, ref_g = reference64(S, T, c, 4, 2, 0.1, 0.04)
    leaf = S.clone().requires_grad_()
    s = leaf * 1.0
    loss = dino_loss(s, T, c, ncrops=4, student_temp=0.1, teacher_temp=0.04, backend="triton", inplace_grad=True)
    loss.backward()
    assert rel(leaf.grad, ref_g) < 1e-5
    assert rel(s.detach(), ref_g) < 1e-5


def test_triton_and_torch_backends_agree_in_dinoloss():
    from dino_fast.losses.dino import DINOLoss

    B, K, ncrops = 4, 2050, 6
    a = DINOLoss(K, ncrops, 0.04, 0.07, 2, 4, backend="triton")
    b = DINOLoss(K, ncrops, 0.04, 0.07, 2, 4, backend="torch")
    for epoch in range(3):
        S, T, _ = make_inputs(B, K, ncrops)
        sa, sb = S.clone().requires_grad_(), S.clone().requires_grad_()
        la, lb = a(sa, T, epoch), b(sb, T, epoch)
        la.backward()
        lb.backward()
        assert rel(la.detach(), lb.detach()) < 1e-5
        assert rel(sa.grad, sb.grad) < 1e-5
        assert rel(a.center, b.center) < 1e-6


def _good(B=2, K=64, ncrops=4):
    S, T, c = make_inputs(B, K, ncrops)
    return S, T, c.reshape(-1).contiguous()


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda S, T, c: (S.double(), T, c), TypeError, r"S: expected float32, bfloat16 or float16, got torch.float64"),
    (lambda S, T, c: (S, T.to(torch.int32), c), TypeError, r"T: expected float32.*torch.int32"),
    (lambda S, T, c: (S.t().contiguous().t(), T, c), ValueError, r"S: expected unit stride along K"),
    (lambda S, T, c: (S[:7], T, c), ValueError, r"S: expected \(ncrops\*B, K\) with ncrops=4"),
    (lambda S, T, c: (S, T[:3], c), ValueError, r"T: expected shape \(4, 64\)"),
    (lambda S, T, c: (S, T, c[:10]), ValueError, r"c: expected a contiguous float32 \(64,\)"),
    (lambda S, T, c: (S, T, c.double()), ValueError, r"c: expected a contiguous float32"),
    (lambda S, T, c: (S, T, c.to("meta")), ValueError, r"one device"),
    (lambda S, T, c: (S[:, None], T, c), ValueError, r"S: expected a 2-D tensor"),
])
def test_launcher_rejects_bad_inputs(mutate, exc, match):
    S, T, c = mutate(*_good())
    with pytest.raises(exc, match=match):
        dino_loss_forward_triton(S, T, c, ncrops=4, n_teacher=2, student_temp=0.1, teacher_temp=0.04)


def test_backward_launcher_rejects_bad_statistics():
    S, T, c = _good()
    loss, lse, tmax, tsum, _ = dino_loss_forward_triton(S, T, c, ncrops=4, student_temp=0.1, teacher_temp=0.04)
    kw = dict(ncrops=4, student_temp=0.1, teacher_temp=0.04)
    with pytest.raises(ValueError, match=r"lse: expected float32 \(8,\)"):
        dino_loss_backward_triton(torch.tensor(1.0), S, T, c, lse[:5], tmax, tsum, **kw)
    with pytest.raises(ValueError, match=r"out: expected torch.float32 \(8, 64\)"):
        dino_loss_backward_triton(torch.tensor(1.0), S, T, c, lse, tmax, tsum, out=torch.empty(8, 63), **kw)
    with pytest.raises(ValueError, match=r"grad: expected a 0-dim tensor"):
        dino_loss_backward_triton(torch.ones(2), S, T, c, lse, tmax, tsum, **kw)
    with pytest.raises(ValueError, match=r"temperatures must be > 0"):
        dino_loss_forward_triton(S, T, c, ncrops=4, student_temp=0.0, teacher_temp=0.04)


_COMPILE_SCRIPT = r"""
import json, warnings
warnings.filterwarnings("ignore")
from dino_fast.ops.compile_check import compile_for
from dino_fast.ops.soft_ce.kernels import _dino_fwd_kernel, _dino_bwd_kernel, launch_config
ints = ["B", "K", "NCROPS", "NTEACH", "stride_s", "stride_t"]
out = []
for dt in ("fp32", "bf16"):
    cfg = launch_config(64, 65536, 2, 4 if dt == "fp32" else 2)
    fwd = {n: "*fp32" for n in ["SMAX", "SSUM", "TMAX", "TSUM", "DOT", "COLSUM"]}
    sig_f = {"S": f"*{dt}", "T": f"*{dt}", "C": "*fp32", **fwd, **{n: "i32" for n in ints},
             "n_tiles": "i32", "imgs_per_group": "i32", "inv_tau_s": "fp32", "inv_tau_t": "fp32",
             "BLOCK_K": "constexpr", "NT_P2": "constexpr"}
    sig_b = {"S": f"*{dt}", "T": f"*{dt}", "C": "*fp32", "G": f"*{dt}", "GOUT": "*fp32", "LSE": "*fp32",
             "TMAX": "*fp32", "TZINV": "*fp32", "W": "*fp32", **{n: "i32" for n in ints}, "stride_g": "i32",
             "imgs_per_group": "i32", "inv_tau_s": "fp32", "inv_tau_t": "fp32", "grad_scale": "fp32",
             "BLOCK_K": "constexpr", "NT_P2": "constexpr"}
    for arch in (80, 90):
        for fn, sig, bk in ((_dino_fwd_kernel, sig_f, cfg.fwd_block_k), (_dino_bwd_kernel, sig_b, cfg.bwd_block_k)):
            r = compile_for(fn, sig, {"BLOCK_K": bk, "NT_P2": cfg.nt_p2}, arch=arch, num_warps=cfg.num_warps)
            out.append(dict(kernel=r.name, dtype=dt, arch=arch, block_k=bk, num_warps=r.num_warps,
                            registers=r.registers, stack=r.stack, local=r.local,
                            spill_stores=r.spill_stores, spill_loads=r.spill_loads, spills=r.spills))
from dino_fast.ops.soft_ce.kernels import _dino_combine_kernel
sig_c = {n: "*fp32" for n in ["SMAX", "SSUM", "TMAX", "TSUM", "DOT", "W", "LSE", "TMOUT", "TZOUT", "LOSS_PART"]}
sig_c.update({"B": "i32", "NCROPS": "i32", "NTEACH": "i32", "n_tiles": "i32", "inv_terms": "fp32",
              "N_P2": "constexpr", "NT_P2": "constexpr"})
from dino_fast.ops.soft_ce.kernels import COMBINE_NUM_WARPS
for arch, n_p2 in ((80, 64), (90, 64), (80, 256), (90, 256)):
    r = compile_for(_dino_combine_kernel, sig_c, {"N_P2": n_p2, "NT_P2": 2}, arch=arch, num_warps=COMBINE_NUM_WARPS)
    out.append(dict(kernel=r.name, dtype="fp32", arch=arch, block_k=n_p2, num_warps=r.num_warps,
                    registers=r.registers, stack=r.stack, local=r.local, spill_stores=r.spill_stores,
                    spill_loads=r.spill_loads, spills=r.spills))
# the JIT passes an int argument equal to 1 as a constant (no .to, no tensor methods): compile with
# every int argument so specialised (B = K = 1, one teacher crop, unit strides, one tile / group)
for fn, sig, extra in ((_dino_fwd_kernel, sig_f, dict(BLOCK_K=128, NT_P2=1)),
                       (_dino_bwd_kernel, sig_b, dict(BLOCK_K=128, NT_P2=1)),
                       (_dino_combine_kernel, sig_c, dict(N_P2=1, NT_P2=1))):
    sig1 = {k: ("constexpr" if v == "i32" else v) for k, v in sig.items()}
    const = {k: 1 for k, v in sig.items() if v == "i32"}
    const.update(extra)
    r = compile_for(fn, sig1, const, arch=90, num_warps=4)
    out.append(dict(kernel=r.name + "[ints=1]", dtype=dt, arch=90, block_k=128, num_warps=r.num_warps,
                    registers=r.registers, stack=r.stack, local=r.local, spill_stores=r.spill_stores,
                    spill_loads=r.spill_loads, spills=r.spills))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm80_sm90_without_spills():
    """Compile both kernels at the launcher's sizes for B=64, K=65536, and with every int argument
    specialised to the constant 1 as the JIT does for such values (n_teacher=1 once failed to
    compile on a GPU while passing under the interpreter). A subprocess: compilation needs the
    real JIT, not the interpreter this test session runs under."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 15
    for r in results:
        print(r)  # registers and spills, reported with -s
        assert not r["spills"], r
        assert r["registers"] > 0
    for el in (4, 2):
        cfg = launch_config(64, 65536, 2, el)
        assert cfg.fwd_tiles * cfg.fwd_block_k >= 65536 and cfg.bwd_tiles * cfg.bwd_block_k >= 65536
        assert cfg.fwd_block_k * el == 4096 and cfg.n_groups == 32


@pytest.mark.parametrize("B,ncrops,n_teacher,n", [(1, 2, 2, 1), (3, 4, 2, 5), (8, 12, 2, 64), (5, 6, 3, 33),
                                                  (4, 5, 1, 7), (2, 10, 2, 256)])
def test_combine_kernel_matches_the_eager_formula(B, ncrops, n_teacher, n):
    """The forward's last step (per-tile partials -> loss, lse, teacher max / sum-exp) in one
    Triton launch, against combine_partials_reference in float64, on fresh random partials."""
    import triton

    from dino_fast.ops.soft_ce.kernels import _dino_combine_kernel
    from dino_fast.reference.loss import combine_partials_reference

    smax = torch.randn(ncrops * B, n) * 5
    ssum = torch.rand(ncrops * B, n) * 100 + 1
    tmax = torch.randn(n_teacher * B, n) * 5
    tsum = torch.rand(n_teacher * B, n) * 100 + 1
    dots = torch.randn(ncrops * B, n_teacher, n) * 50
    want = combine_partials_reference(smax.double().view(ncrops, B, n), ssum.double().view(ncrops, B, n),
                                      tmax.double().view(n_teacher, B, n), tsum.double().view(n_teacher, B, n),
                                      dots.double().view(ncrops, B, n_teacher, n), n_teacher)
    lse, TM, TZ, part = (torch.full((k,), float("nan")) for k in (ncrops * B, n_teacher * B, n_teacher * B, B))
    n_terms = n_teacher * ncrops - n_teacher
    _dino_combine_kernel[(B,)](smax, ssum, tmax, tsum, dots, torch.ones(ncrops), lse, TM, TZ, part, B, ncrops,
                               n_teacher, n,
                               1.0 / (B * n_terms), N_P2=triton.next_power_of_2(n),
                               NT_P2=triton.next_power_of_2(n_teacher))
    assert rel(part.sum(), want[0]) < 1e-5
    for got, ref in zip((lse, TM, TZ), want[1:]):
        assert torch.isfinite(got).all() and rel(got, ref) < 1e-6

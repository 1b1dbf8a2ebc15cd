"""The Triton Sinkhorn-Knopp passes under TRITON_INTERPRET=1 against DINOv2's formula in float64,
the eager CPU path, overflow safety, 2 ranks (gloo) = 1 process, and sm_80 / sm_90 builds
without spills."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast.losses.sinkhorn import sinkhorn_knopp_log_targets
from dino_fast.ops.sinkhorn.function import sinkhorn_log_targets_triton
from dino_fast.reference.sinkhorn import sinkhorn_knopp_reference


@pytest.mark.parametrize("R,K,dtype", [(1, 1, torch.float32), (5, 7, torch.float32), (300, 3000, torch.float32),
                                       (130, 1030, torch.float32), (40, 65536, torch.float32),
                                       (64, 2049, torch.bfloat16), (33, 500, torch.float16)])
def test_matches_dinov2_formula_in_float64(R, K, dtype):
    T = (3 * torch.randn(R, K)).to(dtype)
    tau = float(torch.empty(()).uniform_(0.04, 0.1))
    logq = sinkhorn_knopp_log_targets(T, tau, backend="triton")
    assert logq.dtype == torch.float32 and logq.shape == (R, K) and torch.isfinite(logq).all()
    ref = sinkhorn_knopp_reference(T.double(), tau)
    torch.testing.assert_close(logq.exp().double(), ref, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(torch.logsumexp(logq.double(), 1), torch.zeros(R, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    eager = sinkhorn_knopp_log_targets(T, tau, backend="torch")
    torch.testing.assert_close(logq, eager, rtol=0, atol=2e-4)


def test_large_logits_stay_finite_and_match_the_log_domain_path():
    """T / tau up to ~4 * 10^4: DINOv2's exp overflows even in float64; the global column max taken
    before every exponent keeps the kernels finite and equal to the eager log-domain path."""
    T = torch.randn(20, 500) * 400
    tau = 0.04
    got = sinkhorn_log_targets_triton(T, tau)
    assert not torch.isfinite(sinkhorn_knopp_reference(T.double(), tau)).all()
    assert torch.isfinite(got).all()
    want = sinkhorn_knopp_log_targets(T.double(), tau)
    # The kernel forms log Q = X - a - b + log N in fp32 with X = T / tau, a and b of the size of
    # max|X|: each of those few roundings costs at most an ulp of max|X|, so the log-domain error
    # is a small multiple of eps32 * max|X| (about 5e-3 here); measured at most 2.2 such ulps over
    # 41 seeds, bound 8. In probability space that is a relative error below exp(8 ulp) - 1 on
    # every entry (a flat 1e-4 on probabilities failed CI: 1.14e-4 at seed 810370914).
    ulp = torch.finfo(torch.float32).eps * T.abs().max().item() / tau
    assert (got.double() - want).abs().max().item() <= 8 * ulp
    q, qw = got.double().exp(), want.exp()
    assert ((q - qw).abs() <= qw * (math.exp(8 * ulp) - 1) + 1e-300).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"non-empty \[rows, K\]"):
        sinkhorn_log_targets_triton(torch.randn(0, 4), 0.1)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        sinkhorn_log_targets_triton(torch.randn(2, 4).double(), 0.1)
    with pytest.raises(ValueError, match="unit stride along K"):
        sinkhorn_log_targets_triton(torch.randn(4, 3).t(), 0.1)
    with pytest.raises(ValueError, match="teacher_temp must be a positive float"):
        sinkhorn_log_targets_triton(torch.randn(2, 4), 0.0)
    with pytest.raises(ValueError, match="n_iterations must be an int >= 1"):
        sinkhorn_log_targets_triton(torch.randn(2, 4), 0.1, 0)


def _worker(rank, world, init, T, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        rows = T.shape[0] // world
        results[rank] = sinkhorn_log_targets_triton(T[rank * rows:(rank + 1) * rows], 0.07)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    T = 3 * torch.randn(12, 700)
    manager = mp.Manager()
    results = manager.dict()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", T, results), nprocs=2, join=True)
    got = torch.cat([results[0], results[1]])
    # log targets reach |T| / tau ~ 150: the ranks' all-reduced sums round in another order, a few
    # fp32 ulps of that scale on any element (a normalising term of that size is added to each), so
    # the absolute bound is 8 ulps of max|T| / tau (a flat 1e-5 failed two CI runs: 1.5e-5 at a
    # value of about 62, 1.43e-5 at a value of 3.9, seed 2516173638)
    atol = 8 * torch.finfo(torch.float32).eps * T.abs().max().item() / 0.07
    torch.testing.assert_close(got, sinkhorn_log_targets_triton(T, 0.07), rtol=1e-6, atol=atol)


_COMPILE_SCRIPT = r"""
import json, warnings
warnings.filterwarnings("ignore")
from dino_fast.ops.compile_check import compile_for
from dino_fast.ops.sinkhorn.kernels import _sk_col_kernel, _sk_row_kernel, _sk_out_kernel, SK_BLOCK_K
out = []
for dt in ("fp32", "bf16"):
    sigs = [
        (_sk_col_kernel, {"T": f"*{dt}", "B": "*fp32", "PMAX": "*fp32", "PSUM": "*fp32", "R": "i32", "K": "i32",
                          "stride_t": "i32", "rows_per_chunk": "i32", "inv_tau": "fp32", "BLOCK_K": "constexpr"}),
        (_sk_row_kernel, {"T": f"*{dt}", "A": "*fp32", "B_OUT": "*fp32", "K": "i32", "stride_t": "i32",
                          "inv_tau": "fp32", "log_n": "fp32", "BLOCK_K": "constexpr"}),
        (_sk_out_kernel, {"T": f"*{dt}", "A": "*fp32", "B": "*fp32", "OUT": "*fp32", "K": "i32", "stride_t": "i32",
                          "stride_o": "i32", "inv_tau": "fp32", "log_n": "fp32", "BLOCK_K": "constexpr"}),
    ]
    for arch in (80, 90):
        for fn, sig in sigs:
            r = compile_for(fn, sig, {"BLOCK_K": SK_BLOCK_K}, arch=arch, num_warps=4)
            out.append(dict(kernel=r.name, dtype=dt, arch=arch, registers=r.registers, spills=r.spills))
    for fn, sig in sigs:
        sig1 = {k: ("constexpr" if v == "i32" else v) for k, v in sig.items()}
        const = {k: 1 for k, v in sig.items() if v == "i32"}
        const["BLOCK_K"] = 128
        r = compile_for(fn, sig1, const, arch=90, num_warps=4)
        out.append(dict(kernel=r.name + "[ints=1]", dtype=dt, arch=90, registers=r.registers, spills=r.spills))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm80_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * (2 * 3 + 3)
    for r in results:
        print(r)
        assert not r["spills"] and r["registers"] > 0, r

"""The native CPU path of the log-domain Sinkhorn-Knopp targets (3 passes per iteration).

The iterates ``log Q = T / tau - u_k - v_r`` are never stored: per iteration the C++ kernels of
:mod:`dino_fast.ops.native` read T for the column maxima (all-reduced MAX across ranks), again
for the column sums of exponentials (all-reduced SUM), giving ``u = m + log s + log K``, and once
per row (the row in cache for its two sub-passes) for ``v_r = logsumexp_k(T_r / tau - u) + log N``;
a last pass writes ``T / tau - u - v + log N``. Same result as the eager log-domain code in
:mod:`dino_fast.losses.sinkhorn` (which remains the fp64 path and the fallback without a compiler),
one read of T per pass instead of several full-size temporaries per iteration.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from dino_fast.ops.native import load_native
from dino_fast.ops.soft_ce.native import DTYPE_CODES, _ptr
from dino_fast.utils.distributed import is_dist

__all__ = ["sinkhorn_log_targets_native"]



def sinkhorn_log_targets_native(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """``log`` of the Sinkhorn-Knopp targets, natively.

    Args:
        teacher_logits: ``[rows, K]`` CPU tensor, fp32/bf16/fp16, unit column stride (this rank's
            teacher logits; with a process group the prototype statistics and the sample count
            are all-reduced, as :func:`dino_fast.losses.sinkhorn.sinkhorn_knopp_log_targets`).
        teacher_temp: ``tau`` > 0; n_iterations: >= 1 (validated by the caller).

    Returns:
        ``[rows, K]`` fp32, every row's logsumexp 0.
    """
    lib = load_native()
    if lib is None:  # pragma: no cover - callers check native_supported first
        raise RuntimeError("the native CPU kernels are unavailable (dino_fast.ops.native.native_status says why)")
    T = teacher_logits.detach()
    R, K = T.shape
    code, stride = DTYPE_CODES[T.dtype], T.stride(0)
    inv_t = 1.0 / float(teacher_temp)
    threads = torch.get_num_threads()
    n_total = torch.tensor([float(R)], dtype=torch.float64)
    distributed = is_dist()
    if distributed:
        dist.all_reduce(n_total)
    log_n, log_k = math.log(float(n_total)), math.log(K)
    u = torch.zeros(K, dtype=torch.float32)
    v = torch.zeros(R, dtype=torch.float32)
    m = torch.empty(K, dtype=torch.float32)
    s = torch.empty(K, dtype=torch.float32)
    for _ in range(n_iterations):
        lib.dfn_sk_col_max(_ptr(T), stride, code, R, K, inv_t, _ptr(v), _ptr(m), threads)
        if distributed:
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
        lib.dfn_sk_col_sumexp(_ptr(T), stride, code, R, K, inv_t, _ptr(v), _ptr(m), _ptr(s), threads)
        if distributed:
            dist.all_reduce(s)
        torch.add(m, torch.log(s), out=u).add_(log_k)       # every prototype: mass 1/K
        if lib.dfn_sk_rows(_ptr(T), stride, code, R, K, inv_t, _ptr(u), _ptr(v), log_n, None, 0, threads) != 0:
            raise MemoryError(f"the native Sinkhorn-Knopp kernel could not allocate its buffers (K={K})")
    out = torch.empty((R, K), dtype=torch.float32)
    if lib.dfn_sk_rows(_ptr(T), stride, code, R, K, inv_t, _ptr(u), _ptr(v), log_n, _ptr(out), out.stride(0),
                       threads) != 0:
        raise MemoryError(f"the native Sinkhorn-Knopp kernel could not allocate its buffers (K={K})")
    return out

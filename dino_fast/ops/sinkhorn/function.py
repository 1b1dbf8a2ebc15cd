"""The Sinkhorn-Knopp driver over the Triton passes of :mod:`dino_fast.ops.sinkhorn.kernels`."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from dino_fast.utils.distributed import is_dist

__all__ = ["sinkhorn_log_targets_triton"]


@torch.no_grad()
def sinkhorn_log_targets_triton(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """``log`` of DINOv2's Sinkhorn-Knopp targets, ``[rows, K]`` fp32, each row's
    ``logsumexp`` = 0, from ``[rows, K]`` teacher logits (fp32/bf16/fp16, unit stride along K;
    CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Same result as :func:`dino_fast.losses.sinkhorn.sinkhorn_knopp_log_targets` (and DINOv2's
    formula): per iteration the prototype log-sums over every rank's rows (all-reduce MAX, then
    SUM of the rescaled sums) and the local row log-sums; the sample count is all-reduced.
    T is read twice per iteration and once for the output; no transposed copy is made.

    Raises:
        ValueError: a non-2-D or empty input, a dtype other than fp32/bf16/fp16, a non-unit
            stride along K, a non-positive temperature or iteration count.
    """
    from dino_fast.ops.sinkhorn.kernels import (
        SK_BLOCK_K,
        SK_ROWS_PER_CHUNK,
        _sk_col_kernel,
        _sk_out_kernel,
        _sk_row_kernel,
    )

    T = teacher_logits
    if not isinstance(T, Tensor) or T.dim() != 2 or T.numel() == 0:
        got = tuple(T.shape) if isinstance(T, Tensor) else type(T).__name__
        raise ValueError(f"teacher_logits must be a non-empty [rows, K] tensor, got {got}")
    if T.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"teacher_logits must be float32, bfloat16 or float16, got {T.dtype}")
    if T.stride(-1) != 1:
        raise ValueError(f"teacher_logits must have unit stride along K, got strides {T.stride()}")
    if isinstance(teacher_temp, bool) or not isinstance(teacher_temp, (int, float)) or not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be a positive float, got {teacher_temp!r}")
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")
    R, K = T.shape
    f32 = dict(dtype=torch.float32, device=T.device)
    distributed = is_dist()
    n_total = torch.tensor([float(R)], dtype=torch.float64, device=T.device)
    if distributed:
        dist.all_reduce(n_total)
    log_n, log_k = math.log(float(n_total.item())), math.log(K)
    inv_tau = 1.0 / float(teacher_temp)
    a = torch.zeros((K,), **f32)
    b = torch.zeros((R,), **f32)
    n_tiles = -(-K // SK_BLOCK_K)
    n_chunks = -(-R // SK_ROWS_PER_CHUNK)
    pmax = torch.empty((n_chunks, K), **f32)
    psum = torch.empty((n_chunks, K), **f32)
    for _ in range(n_iterations):
        _sk_col_kernel[(n_tiles, n_chunks)](T, b, pmax, psum, R, K, T.stride(0), SK_ROWS_PER_CHUNK, inv_tau,
                                            BLOCK_K=SK_BLOCK_K, num_warps=4)
        m = pmax.amax(0)
        if distributed:
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
        s = (psum * torch.exp(pmax - m)).sum(0)
        if distributed:
            dist.all_reduce(s)
        a = m + torch.log(s) + log_k
        _sk_row_kernel[(R,)](T, a, b, K, T.stride(0), inv_tau, log_n, BLOCK_K=SK_BLOCK_K, num_warps=4)
    out = torch.empty((R, K), **f32)
    _sk_out_kernel[(n_tiles, R)](T, a, b, out, K, T.stride(0), out.stride(0), inv_tau, log_n,
                                 BLOCK_K=SK_BLOCK_K, num_warps=4)
    return out

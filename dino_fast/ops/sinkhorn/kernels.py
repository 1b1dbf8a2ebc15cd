"""Sinkhorn-Knopp in the log domain without materialising the iterates: Triton kernels.

With ``X = T / tau`` (R, K), every normalisation of DINOv2's iteration subtracts a column or a
row vector, so the iterate is ``X - a[k] - b[r]`` and only ``a`` (K,) and ``b`` (R,) change:

    column pass:  a[k] = logsumexp_r(X[r, k] - b[r]) + log K     (over every rank's rows)
    row pass:     b[r] = logsumexp_k(X[r, k] - a[k]) + log N     (N = rows over all ranks)
    output:       log Q[r, k] = X[r, k] - a[k] - b[r] + log N    (each row's Q sums to 1)

The column pass reduces over rows without a transposed copy: a 2-D grid of (K tiles x row
chunks) keeps an online max / sum-exp per column over its chunk's rows, read row-major, and
stores one (max, sum) partial per chunk; the driver combines the chunks, and across ranks takes
the global max (an all-reduce MAX) before the sums are rescaled and summed (an all-reduce SUM),
so no exponent sees a value above 0 and fp32 cannot overflow. The row pass is one program per
row looping over K tiles; the output pass is elementwise. Bytes per iteration: T read twice.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_sk_col_kernel", "_sk_row_kernel", "_sk_out_kernel", "SK_BLOCK_K", "SK_ROWS_PER_CHUNK"]

SK_BLOCK_K = 1024
SK_ROWS_PER_CHUNK = 128


@triton.jit
def _sk_col_kernel(T, B, PMAX, PSUM, R, K, stride_t, rows_per_chunk, inv_tau, BLOCK_K: tl.constexpr):
    """Partials of logsumexp_r(X[r, k] - b[r]) over rows [chunk * rows_per_chunk, ...)."""
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_K], dtype=tl.float32)
    r0 = chunk * rows_per_chunk
    r1 = tl.minimum(r0 + rows_per_chunk, R)
    for r in range(r0, r1):
        r64 = (r0 * 0 + r).to(tl.int64)  # a tensor also under the interpreter (where r is an int)
        x = tl.load(T + r64 * stride_t + cols, mask=cmask, other=0.0).to(tl.float32) * inv_tau - tl.load(B + r64)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    off = chunk.to(tl.int64) * K + cols
    tl.store(PMAX + off, m, mask=cmask)
    tl.store(PSUM + off, s, mask=cmask)


@triton.jit
def _sk_row_kernel(T, A, B_OUT, K, stride_t, inv_tau, log_n, BLOCK_K: tl.constexpr):
    """b[r] = logsumexp_k(X[r, k] - a[k]) + log N for row r = program id."""
    r = tl.program_id(0).to(tl.int64)
    m = tl.full([BLOCK_K], -1.0e30, tl.float32)  # finite: no inf - inf for columns past K
    s = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        x = tl.load(T + r * stride_t + cols, mask=cmask, other=0.0).to(tl.float32) * inv_tau \
            - tl.load(A + cols, mask=cmask, other=0.0)
        x = tl.where(cmask, x, float("-inf"))
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    M = tl.max(m, axis=0)
    S = tl.sum(s * tl.exp(m - M), axis=0)
    tl.store(B_OUT + r, M + tl.log(S) + log_n)


@triton.jit
def _sk_out_kernel(T, A, B, OUT, K, stride_t, stride_o, inv_tau, log_n, BLOCK_K: tl.constexpr):
    """log Q[r, k] = X[r, k] - a[k] - b[r] + log N (grid: K tiles x rows)."""
    tile = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    x = tl.load(T + r * stride_t + cols, mask=cmask, other=0.0).to(tl.float32) * inv_tau
    y = x - tl.load(A + cols, mask=cmask, other=0.0) - tl.load(B + r) + log_n
    tl.store(OUT + r * stride_o + cols, y, mask=cmask)

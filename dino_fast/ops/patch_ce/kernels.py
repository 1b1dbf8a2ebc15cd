"""Row-aligned soft-target cross-entropy (the iBOT patch loss): Triton kernels and launchers.

Math (S, T (R, K) student and teacher logits, c (K,) center, w (R,) row weights):

    q_r   = softmax((T_r - c) / tau_t)          lse_r = logsumexp(S_r / tau_s)
    loss  = sum_r w_r (lse_r - <q_r, S_r / tau_s>)
    dS_r  = g w_r (softmax(S_r / tau_s) - q_r) / tau_s

Kernels (the forward and gradient kernels on a 2-D grid: K tiles x row groups; a program owns
BLOCK_K columns of ``rows_per_group`` rows and reads each of its S and T row tiles once):

- ``_patch_fwd_kernel``: per row and tile, the tile max and sum-exp of (T_r - c)/tau_t, the
  tile max and sum-exp of S_r/tau_s, and the dot <exp((T_r - c)/tau_t - tile max), S_r/tau_s>;
  with ``WITH_COLSUM`` the fp32 column sum of T over the group's rows (one partial row per group,
  for the center update, so T is not read a second time).
- ``_patch_combine_kernel``: one program per block of rows turns the per-tile partials into
  lse per row, the teacher max and sum-exp per row, and w_r (lse_r - <q_r, S_r/tau_s>).
- ``_patch_bwd_kernel``: recomputes q_r and softmax(S_r/tau_s) tile by tile from the saved
  per-row statistics (3 floats per row) and writes dS once, in S's dtype; the upstream gradient
  is read from device memory (no host sync).

Bytes: forward reads S and T once (plus c once per program, 5 fp32 partials per row and tile,
and the column-sum partials G*K*4, G = ceil(R / rows_per_group)); backward reads S, T once and
writes dS once: about 2|S| + 2|T| + |dS| against the floor |S| + |T| + |dS| (1.67x when S and T
have one dtype). No (R, K) temporary is created besides the gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from dino_fast.ops.soft_ce.checks import check_launch_logits, check_launch_temps, check_launch_vector

__all__ = ["PatchLaunchConfig", "patch_launch_config", "combine_rows", "patch_ce_forward_triton", "patch_ce_backward_triton",
           "_patch_fwd_kernel", "_patch_bwd_kernel", "_patch_combine_kernel"]

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
ROWS_PER_GROUP = 32          # rows per program: the column-sum partials are G*K*4 bytes, G = R / 32
COMBINE_ELEMS = 512          # rows x tiles per combine program (rows = 512 / next_pow2(tiles), 1..16)
COMBINE_NUM_WARPS = 2


@triton.jit
def _patch_fwd_kernel(
    S, T, C, SMAX, SSUM, TMAX, TSUM, DOT, COLSUM,
    R, K, stride_s, stride_t, n_tiles, rows_per_group, inv_tau_s, inv_tau_t,
    BLOCK_K: tl.constexpr, WITH_COLSUM: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    colacc = tl.zeros([BLOCK_K], dtype=tl.float32)
    r0 = group * rows_per_group
    r1 = tl.minimum(r0 + rows_per_group, R)
    for r in range(r0, r1):
        r64 = (r0 * 0 + r).to(tl.int64)  # a tensor also under the interpreter (where r is an int)
        t = tl.load(T + r64 * stride_t + cols, mask=cmask, other=0.0).to(tl.float32)
        if WITH_COLSUM:
            colacc += t
        x = tl.where(cmask, (t - c) * inv_tau_t, float("-inf"))
        tm = tl.max(x, axis=0)
        e = tl.exp(x - tm)                                                   # 0 where masked
        s = tl.load(S + r64 * stride_s + cols, mask=cmask, other=0.0).to(tl.float32)
        y = s * inv_tau_s
        ym = tl.where(cmask, y, float("-inf"))
        sm = tl.max(ym, axis=0)
        off = r64 * n_tiles + tile
        tl.store(TMAX + off, tm)
        tl.store(TSUM + off, tl.sum(e, axis=0))
        tl.store(DOT + off, tl.sum(e * y, axis=0))
        tl.store(SMAX + off, sm)
        tl.store(SSUM + off, tl.sum(tl.exp(ym - sm), axis=0))
    if WITH_COLSUM:
        tl.store(COLSUM + group.to(tl.int64) * K + cols, colacc, mask=cmask)


@triton.jit
def _patch_combine_kernel(
    SMAX, SSUM, TMAX, TSUM, DOT, W, LSE, TMOUT, TZOUT, LOSS_ROW,
    R, n_tiles,
    N_P2: tl.constexpr, ROWS: tl.constexpr,
):
    """Rows [pid * ROWS, (pid + 1) * ROWS): per-tile partials -> lse, teacher max and sum-exp,
    and the row's weighted loss w_r (lse_r - <q_r, S_r / tau_s>) (an online softmax across tiles)."""
    pid = tl.program_id(0)
    rr = pid * ROWS + tl.arange(0, ROWS)
    rvalid = rr < R
    t = tl.arange(0, N_P2)
    m2 = rvalid[:, None] & (t < n_tiles)[None, :]
    off = rr.to(tl.int64)[:, None] * n_tiles + t[None, :]
    tmx = tl.load(TMAX + off, mask=m2, other=float("-inf"))
    tsm = tl.load(TSUM + off, mask=m2, other=0.0)
    TM = tl.where(rvalid, tl.max(tmx, axis=1), 0.0)
    e = tl.where(m2, tl.exp(tmx - TM[:, None]), 0.0)
    TZ = tl.where(rvalid, tl.sum(tsm * e, axis=1), 1.0)
    dot = tl.sum(tl.load(DOT + off, mask=m2, other=0.0) * e, axis=1) / TZ
    smx = tl.load(SMAX + off, mask=m2, other=float("-inf"))
    ssm = tl.load(SSUM + off, mask=m2, other=0.0)
    SM = tl.where(rvalid, tl.max(smx, axis=1), 0.0)
    lse = SM + tl.log(tl.where(rvalid, tl.sum(tl.where(m2, ssm * tl.exp(smx - SM[:, None]), 0.0), axis=1), 1.0))
    w = tl.load(W + rr, mask=rvalid, other=0.0).to(tl.float32)
    tl.store(LSE + rr, lse, mask=rvalid)
    tl.store(TMOUT + rr, TM, mask=rvalid)
    tl.store(TZOUT + rr, TZ, mask=rvalid)
    tl.store(LOSS_ROW + rr, w * (lse - dot), mask=rvalid)


@triton.jit
def _patch_bwd_kernel(
    S, T, C, G, GOUT, W, LSE, TMAX, TZINV,
    R, K, stride_s, stride_t, stride_g, rows_per_group, inv_tau_s, inv_tau_t,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    g = tl.load(GOUT).to(tl.float32) * inv_tau_s
    r0 = group * rows_per_group
    r1 = tl.minimum(r0 + rows_per_group, R)
    for r in range(r0, r1):
        r64 = (r0 * 0 + r).to(tl.int64)  # a tensor also under the interpreter (where r is an int)
        t = tl.load(T + r64 * stride_t + cols, mask=cmask, other=0.0).to(tl.float32)
        q = tl.exp((t - c) * inv_tau_t - tl.load(TMAX + r)) * tl.load(TZINV + r)
        s = tl.load(S + r64 * stride_s + cols, mask=cmask, other=0.0).to(tl.float32)
        p = tl.exp(s * inv_tau_s - tl.load(LSE + r))
        ds = (p - q) * (g * tl.load(W + r).to(tl.float32))
        tl.store(G + r64 * stride_g + cols, ds.to(G.dtype.element_ty), mask=cmask)


@dataclass(frozen=True)
class PatchLaunchConfig:
    """Tile sizes and grids for (R, K): forward grid (fwd_tiles, n_groups) with BLOCK_K =
    fwd_block_k, gradient grid (bwd_tiles, n_groups) with bwd_block_k, ``rows_per_group`` rows
    per program, ``num_warps`` warps."""

    fwd_block_k: int
    bwd_block_k: int
    num_warps: int
    rows_per_group: int
    fwd_tiles: int
    bwd_tiles: int
    n_groups: int


def patch_launch_config(R: int, K: int, elem_size: int = 4) -> PatchLaunchConfig:
    """Forward tiles of 4 KB of a row (1024 fp32 / 2048 16-bit columns), gradient tiles of 1024
    columns, 32 rows per program, 4 warps (the DINO op's tile sizes, which compile without
    spills; not tuned on a GPU for this op)."""
    kmax = max(16, triton.next_power_of_2(K))
    fwd = min(max(128, 4096 // max(1, elem_size)), kmax)
    bwd = min(1024, kmax)
    rpg = ROWS_PER_GROUP
    return PatchLaunchConfig(fwd_block_k=fwd, bwd_block_k=bwd, num_warps=4, rows_per_group=rpg,
                             fwd_tiles=triton.cdiv(K, fwd), bwd_tiles=triton.cdiv(K, bwd),
                             n_groups=max(1, triton.cdiv(R, rpg)))


def combine_rows(n_tiles: int) -> int:
    """Rows per combine program for ``n_tiles`` forward tiles: ROWS * next_pow2(n_tiles) <= 512."""
    return max(1, min(16, COMBINE_ELEMS // triton.next_power_of_2(max(1, n_tiles))))


def _check(S: torch.Tensor, T: torch.Tensor, c: torch.Tensor, w: torch.Tensor,
           student_temp: float, teacher_temp: float) -> tuple[int, int]:
    """Launcher checks: shapes, dtypes, devices, strides, temperatures. Returns (R, K)."""
    check_launch_logits(("S", S), ("T", T), supported=_SUPPORTED)
    R, K = S.shape
    if K == 0 or R == 0:
        raise ValueError(f"S: expected (rows, K) with rows >= 1 and K >= 1, got shape {tuple(S.shape)}")
    if tuple(T.shape) != (R, K):
        raise ValueError(f"T: expected shape ({R}, {K}) (as S), got {tuple(T.shape)}")
    check_launch_vector("c", c, K)
    check_launch_vector("w", w, R)
    if not (S.device == T.device == c.device == w.device):
        raise ValueError(f"S, T, c and w must be on one device, got {S.device}, {T.device}, {c.device}, {w.device}")
    check_launch_temps(student_temp, teacher_temp)
    return R, K


def patch_ce_forward_triton(
    S: torch.Tensor, T: torch.Tensor, c: torch.Tensor, w: torch.Tensor, *, student_temp: float,
    teacher_temp: float, with_colsum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward statistics pass.

    Args:
        S, T: (R, K) fp32/bf16/fp16 with unit stride along K (R >= 1). c: (K,) contiguous fp32
        center. w: (R,) contiguous fp32 row weights. with_colsum: also the column sum of T.

    Returns (all fp32): loss (0-dim), lse of S/tau_s per row (R,), max and sum-exp of
    (T - c)/tau_t per row (R,) x 2, column sum of T (K,) (zeros without ``with_colsum``).
    """
    R, K = _check(S, T, c, w, student_temp, teacher_temp)
    cfg = patch_launch_config(R, K, S.element_size())
    f32 = dict(dtype=torch.float32, device=S.device)
    n = cfg.fwd_tiles
    parts = [torch.empty((R, n), **f32) for _ in range(5)]
    colsum_part = torch.empty((cfg.n_groups if with_colsum else 1, K), **f32)
    _patch_fwd_kernel[(n, cfg.n_groups)](
        S, T, c, *parts, colsum_part, R, K, S.stride(0), T.stride(0), n, cfg.rows_per_group,
        1.0 / student_temp, 1.0 / teacher_temp,
        BLOCK_K=cfg.fwd_block_k, WITH_COLSUM=bool(with_colsum), num_warps=cfg.num_warps,
    )
    lse, TM, TZ, loss_row = (torch.empty((R,), **f32) for _ in range(4))
    n_p2 = triton.next_power_of_2(n)
    rows = combine_rows(n)
    _patch_combine_kernel[(triton.cdiv(R, rows),)](
        *parts, w, lse, TM, TZ, loss_row, R, n,
        N_P2=n_p2, ROWS=rows, num_warps=COMBINE_NUM_WARPS,
    )
    if with_colsum:
        colsum = colsum_part[0] if cfg.n_groups == 1 else colsum_part.sum(0)
    else:
        colsum = torch.zeros((K,), **f32)
    return loss_row.sum(), lse, TM, TZ, colsum


def patch_ce_backward_triton(
    grad: torch.Tensor, S: torch.Tensor, T: torch.Tensor, c: torch.Tensor, w: torch.Tensor,
    lse: torch.Tensor, tmax: torch.Tensor, tsum: torch.Tensor, *, student_temp: float, teacher_temp: float,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient pass: dL/dS (R, K) in S's dtype (into ``out`` when given; it may be S itself:
    each element is read before it is written, by the same program).

    Args: grad the 0-dim upstream gradient; lse, tmax, tsum (R,) fp32 from
    :func:`patch_ce_forward_triton`; the other arguments as there.
    """
    R, K = _check(S, T, c, w, student_temp, teacher_temp)
    for name, x in (("lse", lse), ("tmax", tmax), ("tsum", tsum)):
        if x.dtype != torch.float32 or tuple(x.shape) != (R,) or x.device != S.device:
            raise ValueError(f"{name}: expected float32 ({R},) on {S.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
    if grad.numel() != 1 or grad.device != S.device:
        raise ValueError(f"grad: expected a 0-dim tensor on {S.device}, got shape {tuple(grad.shape)} on {grad.device}")
    if out is None:
        out = torch.empty_like(S, memory_format=torch.contiguous_format)
    elif out.shape != S.shape or out.dtype != S.dtype or out.stride(-1) != 1 or out.device != S.device:
        raise ValueError(f"out: expected {S.dtype} {tuple(S.shape)} with unit stride on {S.device}, "
                         f"got {out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
    cfg = patch_launch_config(R, K, S.element_size())
    _patch_bwd_kernel[(cfg.bwd_tiles, cfg.n_groups)](
        S, T, c, out, grad.reshape(()).float().contiguous(), w, lse.contiguous(), tmax.contiguous(),
        tsum.reciprocal(), R, K, S.stride(0), T.stride(0), out.stride(0), cfg.rows_per_group,
        1.0 / student_temp, 1.0 / teacher_temp,
        BLOCK_K=cfg.bwd_block_k, num_warps=cfg.num_warps,
    )
    return out

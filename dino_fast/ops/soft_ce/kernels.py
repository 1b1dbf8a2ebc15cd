"""Fused DINO loss: Triton kernels (forward statistics pass and gradient pass) and launchers.

Math (docs/DESIGN.md, "The DINO loss"). S (ncrops*B, K) student logits, T (NT*B, K) teacher logits, c (K,)
center, NT = n_teacher:

    q_i   = softmax((T_i - c) / tau_t)          lse_v = logsumexp(S_v / tau_s)
    loss  = 1/(B*n_terms) sum_{v,b} ( |Q_v| lse_vb - <Q_vb, S_vb / tau_s> ),  Q_v = sum_{i!=v} q_i
    dS_v  = g * ( |Q_v| softmax(S_v / tau_s) - Q_v ) / (tau_s * B * n_terms)

Kernels (both on a 2-D grid: K tiles x image groups; each program owns BLOCK_K columns of a
group of images and, per image, reads the NT teacher rows once and every student crop once):

- ``_dino_fwd_kernel`` (teacher pass and student pass fused into one read of S and T): per
  image b and tile, the tile max and sum-exp of (T_i - c)/tau_t, the tile max and sum-exp of
  S_v/tau_s, and the dots <exp((T_i - c)/tau_t - tile max_i), S_v/tau_s> for every (v, i); the
  fp32 column sum of T over the group's images (for the center update, no second read of T).
  Q_v is never materialised: its normaliser is global, so the dots are kept per teacher row and
  rescaled when the partials are combined (an online softmax across tiles, done once at the end
  over (rows, K/BLOCK_K) partials, a few KiB, by ``_dino_combine_kernel``: one program per image). Teacher and student statistics come from one read.
- ``_dino_bwd_kernel``: recomputes q_i and softmax(S_v/tau_s) tile by tile from the saved
  per-row statistics (lse per student row, max and sum-exp per teacher row; 3 floats per row)
  and writes dS once, in S's dtype. Reads the upstream gradient from device memory (no sync).

Bytes (per call, E = element size of S and T): forward reads S and T once (plus c once per
image group, and writes the per-group column sums of T: G*K*4 each, G = ceil(B / 2));
backward reads S and T once and writes dS once. Total about (2*|S| + 2*|T| + |dS|) against the
floor |S| + |T| + |dS|: 34 against 22 units of B*K*E at 2+10 crops, 1.55x. Counted under the
interpreter (bench/loss.py, B=64, K=65536, 2+10): 1.60x the floor in fp32 (1.554x with the
earlier 8-image groups, whose fewer center reads and column-sum partials cost GPU time instead).
Any design that needs the full-row logsumexp before it can write dS, and cannot hold a row's
crops on chip, reads S twice: 1.55x is that two-read bound.
No (rows, K) temporary is created besides the gradient.

Tiles (:func:`launch_config`): forward BLOCK_K = 4 KB of a row (1024 fp32 / 2048 bf16 columns),
gradient BLOCK_K = 1024 for NT <= 2 (the teacher tile (NT_P2, BLOCK_K) is held in registers while
the crops stream by, so BLOCK_K shrinks as NT grows), 4 warps, 2 images per program: for B=64,
K=65536 that is 2048 (fp32) forward and 2048 gradient programs, each streaming 2 x (2 + ncrops)
row tiles; 0 spills on sm_80 and sm_90. (Whole 65536-column rows, or 4096-column tiles with the
teacher tile, spill.) Chosen from a sweep on an H200 (see launch_config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from dino_fast.ops.soft_ce.checks import check_launch_logits, check_launch_temps, check_launch_vector

__all__ = [
    "LaunchConfig", "launch_config", "dino_loss_forward_triton", "dino_loss_backward_triton",
    "_dino_fwd_kernel", "_dino_bwd_kernel", "_dino_combine_kernel",
]

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
IMAGES_PER_PROGRAM = 2
# The combine kernel's few hundred partials per program: 2 warps (with 4, triton 3.7/3.8's ptxas
# put 8 bytes on the stack for sm_90 at 256 tiles; 2 warps compile clean on 3.7-3.9).
COMBINE_NUM_WARPS = 2


@triton.jit
def _dino_fwd_kernel(
    S, T, C, SMAX, SSUM, TMAX, TSUM, DOT, COLSUM,
    B, K, NCROPS, NTEACH, stride_s, stride_t, n_tiles, imgs_per_group,
    inv_tau_s, inv_tau_t,
    BLOCK_K: tl.constexpr, NT_P2: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    ti = tl.arange(0, NT_P2)
    tvalid = ti < NTEACH
    mask2 = tvalid[:, None] & cmask[None, :]
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    colacc = tl.zeros([BLOCK_K], dtype=tl.float32)
    b0 = group * imgs_per_group
    b1 = tl.minimum(b0 + imgs_per_group, B)
    for b in range(b0, b1):
        trow = ti * B + b                                                  # (NT_P2,)
        t = tl.load(T + trow.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=mask2,
                    other=0.0).to(tl.float32)
        colacc += tl.sum(t, axis=0)
        x = tl.where(mask2, (t - c[None, :]) * inv_tau_t, float("-inf"))
        tm = tl.max(x, axis=1)
        tm = tl.where(tvalid, tm, 0.0)
        e = tl.exp(x - tm[:, None])                                        # 0 where masked
        tl.store(TMAX + trow * n_tiles + tile, tm, mask=tvalid)
        tl.store(TSUM + trow * n_tiles + tile, tl.sum(e, axis=1), mask=tvalid)
        for v in range(0, NCROPS):
            srow = v * B + b
            s = tl.load(S + srow.to(tl.int64) * stride_s + cols, mask=cmask, other=0.0).to(tl.float32)
            y = s * inv_tau_s
            d = tl.sum(e * y[None, :], axis=1)                                # (NT_P2,)
            tl.store(DOT + (srow * NTEACH + ti) * n_tiles + tile, d, mask=tvalid)
            ym = tl.where(cmask, y, float("-inf"))
            sm = tl.max(ym, axis=0)
            tl.store(SMAX + srow * n_tiles + tile, sm)
            tl.store(SSUM + srow * n_tiles + tile, tl.sum(tl.exp(ym - sm), axis=0))
    tl.store(COLSUM + group * K + cols, colacc, mask=cmask)


@triton.jit
def _dino_bwd_kernel(
    S, T, C, G, GOUT, LSE, TMAX, TZINV, W,
    B, K, NCROPS, NTEACH, stride_s, stride_t, stride_g, imgs_per_group,
    inv_tau_s, inv_tau_t, grad_scale,
    BLOCK_K: tl.constexpr, NT_P2: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    ti = tl.arange(0, NT_P2)
    tvalid = ti < NTEACH
    mask2 = tvalid[:, None] & cmask[None, :]
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    g = tl.load(GOUT).to(tl.float32) * grad_scale
    b0 = group * imgs_per_group
    b1 = tl.minimum(b0 + imgs_per_group, B)
    for b in range(b0, b1):
        trow = ti * B + b
        t = tl.load(T + trow.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=mask2,
                    other=0.0).to(tl.float32)
        tm = tl.load(TMAX + trow, mask=tvalid, other=0.0)
        tzinv = tl.load(TZINV + trow, mask=tvalid, other=0.0)
        x = tl.where(mask2, (t - c[None, :]) * inv_tau_t, float("-inf"))
        q = tl.exp(x - tm[:, None]) * tzinv[:, None]                      # (NT_P2, BLOCK_K)
        # teacher crops: Q_v = sum of the other teachers' q, summed exactly (no "all - q_v").
        # |Q_v| as NTEACH * 1.0 (not NTEACH.to(...)): the JIT passes an int argument equal to 1
        # as a Python constant, which has no .to (n_teacher=1 failed to compile on a GPU)
        # W: per-crop pair weights relative to grad_scale's (all 1.0 for the uniform default:
        # multiplying by 1.0 is exact, so the default gives the unweighted kernel's bits)
        for v in range(0, NTEACH):
            qv = tl.sum(tl.where(ti[:, None] != v, q, 0.0), axis=0)
            _grad_row(S, G, LSE, v * B + b, cols, cmask, stride_s, stride_g, qv,
                      NTEACH * 1.0 - 1.0, inv_tau_s, g * tl.load(W + v))
        # other crops: Q_v = sum of all teachers' q, the same for every such crop
        qall = tl.sum(q, axis=0)
        for v in range(NTEACH, NCROPS):
            _grad_row(S, G, LSE, v * B + b, cols, cmask, stride_s, stride_g, qall,
                      NTEACH * 1.0, inv_tau_s, g * tl.load(W + v))


@triton.jit
def _grad_row(S, G, LSE, srow, cols, cmask, stride_s, stride_g, qv, nq, inv_tau_s, g):
    """dS row tile = g * (nq * softmax(S_row / tau_s) - Q_v) (g already holds 1/(tau_s B n_terms))."""
    s = tl.load(S + srow.to(tl.int64) * stride_s + cols, mask=cmask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + srow)
    p = tl.exp(s * inv_tau_s - lse)
    dsv = (nq * p - qv) * g
    tl.store(G + srow.to(tl.int64) * stride_g + cols, dsv.to(G.dtype.element_ty), mask=cmask)


@triton.jit
def _dino_combine_kernel(
    SMAX, SSUM, TMAX, TSUM, DOT, W, LSE, TMOUT, TZOUT, LOSS_PART,
    B, NCROPS, NTEACH, n_tiles, inv_terms,
    N_P2: tl.constexpr, NT_P2: tl.constexpr,
):
    """One program per image b: the forward's per-tile partials -> lse per student row, max and
    sum-exp per teacher row, and image b's share of the loss (an online softmax across tiles).
    W holds one pair weight per student crop (relative to inv_terms; all 1.0 by default)."""
    b = tl.program_id(0)
    t = tl.arange(0, N_P2)
    tmask = t < n_tiles
    ti = tl.arange(0, NT_P2)
    tvalid = ti < NTEACH
    m2 = tvalid[:, None] & tmask[None, :]
    trow = ti * B + b                                                       # (NT_P2,)
    tmx = tl.load(TMAX + trow[:, None] * n_tiles + t[None, :], mask=m2, other=float("-inf"))
    tsm = tl.load(TSUM + trow[:, None] * n_tiles + t[None, :], mask=m2, other=0.0)
    TM = tl.max(tmx, axis=1)
    TM = tl.where(tvalid, TM, 0.0)
    w = tl.where(m2, tl.exp(tmx - TM[:, None]), 0.0)                        # (NT_P2, N_P2)
    TZ = tl.sum(tsm * w, axis=1)
    tl.store(TMOUT + trow, TM, mask=tvalid)
    tl.store(TZOUT + trow, TZ, mask=tvalid)
    w = w / tl.where(tvalid, TZ, 1.0)[:, None]
    acc = (b * 0).to(tl.float32)
    for v in range(0, NCROPS):
        srow = v * B + b
        sm = tl.load(SMAX + srow * n_tiles + t, mask=tmask, other=float("-inf"))
        ss = tl.load(SSUM + srow * n_tiles + t, mask=tmask, other=0.0)
        SM = tl.max(sm, axis=0)
        lse = SM + tl.log(tl.sum(tl.where(tmask, ss * tl.exp(sm - SM), 0.0), axis=0))
        tl.store(LSE + srow, lse)
        d = tl.load(DOT + (srow * NTEACH + ti)[:, None] * n_tiles + t[None, :], mask=m2, other=0.0)
        qdot = tl.sum(d * w, axis=1)                                        # (NT_P2,)
        pair = tvalid & (ti != v)
        nq = tl.sum(pair.to(tl.float32), axis=0)
        acc += tl.load(W + v) * (nq * lse - tl.sum(tl.where(pair, qdot, 0.0), axis=0))
    tl.store(LOSS_PART + b, acc * inv_terms)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and grids the launchers use for given (B, K, n_teacher).

    Forward: grid (fwd_tiles, n_groups), BLOCK_K = fwd_block_k. Backward: grid (bwd_tiles,
    n_groups), BLOCK_K = bwd_block_k. Both with ``num_warps`` warps and ``imgs_per_group``
    images per program. Chosen so that neither kernel spills on sm_80 or sm_90 (see
    tests/ops/test_soft_ce_kernels.py): the teacher tile (NT_P2, BLOCK_K) stays in registers.
    """

    fwd_block_k: int
    bwd_block_k: int
    nt_p2: int
    num_warps: int
    imgs_per_group: int
    fwd_tiles: int
    bwd_tiles: int
    n_groups: int


def launch_config(B: int, K: int, n_teacher: int, elem_size: int = 4) -> LaunchConfig:
    """The launch configuration for B images, K columns, ``n_teacher`` teacher crops and logits of
    ``elem_size`` bytes (4: fp32, 2: bf16/fp16): forward tiles of 4 KB of a row (1024 fp32 or
    2048 16-bit columns at NT <= 2), gradient tiles of 1024 columns, 2 images per program, 4 warps.
    Measured on an H200 (B=64, K=65536, 2+10, 40 configurations, kernel time from the profiler):
    0.223 ms fp32 and 0.148 ms bf16 against 0.284 / 0.228 ms with the earlier 8 images per program
    and 2048-column forward tiles."""
    nt_p2 = triton.next_power_of_2(n_teacher)
    kmax = max(16, triton.next_power_of_2(K))
    fwd = min(max(128, (4096 // max(1, elem_size)) * 2 // nt_p2), kmax)
    bwd = min(max(64, 2048 // nt_p2), kmax)
    imgs = min(IMAGES_PER_PROGRAM, B)
    return LaunchConfig(fwd_block_k=fwd, bwd_block_k=bwd, nt_p2=nt_p2, num_warps=4, imgs_per_group=imgs,
                        fwd_tiles=triton.cdiv(K, fwd), bwd_tiles=triton.cdiv(K, bwd),
                        n_groups=triton.cdiv(B, imgs))


def _check(S: torch.Tensor, T: torch.Tensor, c: torch.Tensor, ncrops: int, n_teacher: int,
           student_temp: float, teacher_temp: float) -> tuple[int, int]:
    """Launcher checks: shapes, dtypes, devices, strides, temperatures. Returns (B, K)."""
    check_launch_logits(("S", S), ("T", T), supported=_SUPPORTED)
    if not isinstance(ncrops, int) or ncrops < 2:
        raise ValueError(f"ncrops: expected an int >= 2, got {ncrops!r}")
    if not isinstance(n_teacher, int) or not 1 <= n_teacher <= ncrops:
        raise ValueError(f"n_teacher: expected an int in [1, ncrops={ncrops}], got {n_teacher!r}")
    rows, K = S.shape
    if K == 0 or rows == 0 or rows % ncrops:
        raise ValueError(f"S: expected (ncrops*B, K) with ncrops={ncrops} and K >= 1, got shape {tuple(S.shape)}")
    B = rows // ncrops
    if tuple(T.shape) != (n_teacher * B, K):
        raise ValueError(f"T: expected shape ({n_teacher * B}, {K}) (n_teacher*B, K), got {tuple(T.shape)}")
    check_launch_vector("c", c, K)
    if not (S.device == T.device == c.device):
        raise ValueError(f"S, T and c must be on one device, got {S.device}, {T.device}, {c.device}")
    check_launch_temps(student_temp, teacher_temp)
    return B, K


def _weights(crop_weights: Optional[torch.Tensor], ncrops: int, B: int, n_terms: int,
             device: torch.device) -> tuple[torch.Tensor, int]:
    """(per-crop weights W (ncrops,) fp32, the pair count ``terms`` the common factors 1/(B terms)
    and 1/(tau_s B terms) divide by): all ones and n_terms for the uniform default (the same
    factors, hence the unweighted kernels' bits), else the given weights and 1."""
    if crop_weights is None:
        return torch.ones((ncrops,), dtype=torch.float32, device=device), n_terms
    if (not isinstance(crop_weights, torch.Tensor) or crop_weights.dtype != torch.float32
            or tuple(crop_weights.shape) != (ncrops,) or crop_weights.device != device):
        got = (f"{crop_weights.dtype} {tuple(crop_weights.shape)} on {crop_weights.device}"
               if isinstance(crop_weights, torch.Tensor) else type(crop_weights).__name__)
        raise ValueError(f"crop_weights: expected a float32 ({ncrops},) tensor on {device}, got {got}")
    return crop_weights.contiguous(), 1


def dino_loss_forward_triton(
    S: torch.Tensor, T: torch.Tensor, c: torch.Tensor, *, ncrops: int, n_teacher: int = 2,
    student_temp: float, teacher_temp: float, crop_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward statistics pass.

    Args:
        S: (ncrops*B, K) fp32/bf16/fp16, unit stride along K. T: (n_teacher*B, K), same rules.
        c: (K,) contiguous fp32 center.
        crop_weights: optional (ncrops,) fp32 weight of every pair (i, v != i) by student crop v
            (the loss is then sum_v w_v sum_{i != v} mean_b H); None: the uniform 1/n_terms.

    Returns (all fp32): loss (0-dim), lse of S/tau_s per student row (ncrops*B,), max and
    sum-exp of (T - c)/tau_t per teacher row (n_teacher*B,) x 2, column sum of T (K,).
    """
    B, K = _check(S, T, c, ncrops, n_teacher, student_temp, teacher_temp)
    cfg = launch_config(B, K, n_teacher, S.element_size())
    f32 = dict(dtype=torch.float32, device=S.device)
    n = cfg.fwd_tiles
    smax = torch.empty((ncrops * B, n), **f32)
    ssum = torch.empty((ncrops * B, n), **f32)
    tmax = torch.empty((n_teacher * B, n), **f32)
    tsum = torch.empty((n_teacher * B, n), **f32)
    dots = torch.empty((ncrops * B, n_teacher, n), **f32)
    colsum_part = torch.empty((cfg.n_groups, K), **f32)
    _dino_fwd_kernel[(n, cfg.n_groups)](
        S, T, c, smax, ssum, tmax, tsum, dots, colsum_part,
        B, K, ncrops, n_teacher, S.stride(0), T.stride(0), n, cfg.imgs_per_group,
        1.0 / student_temp, 1.0 / teacher_temp,
        BLOCK_K=cfg.fwd_block_k, NT_P2=cfg.nt_p2, num_warps=cfg.num_warps,
    )
    lse = torch.empty((ncrops * B,), **f32)
    TM = torch.empty((n_teacher * B,), **f32)
    TZ = torch.empty((n_teacher * B,), **f32)
    part = torch.empty((B,), **f32)
    n_terms = n_teacher * ncrops - n_teacher
    W, terms = _weights(crop_weights, ncrops, B, n_terms, S.device)
    _dino_combine_kernel[(B,)](
        smax, ssum, tmax, tsum, dots, W, lse, TM, TZ, part, B, ncrops, n_teacher, n,
        1.0 / (B * terms), N_P2=triton.next_power_of_2(n), NT_P2=cfg.nt_p2, num_warps=COMBINE_NUM_WARPS,
    )
    loss = part.sum()
    colsum = colsum_part[0] if cfg.n_groups == 1 else colsum_part.sum(0)
    return loss, lse, TM, TZ, colsum


def dino_loss_backward_triton(
    grad: torch.Tensor, S: torch.Tensor, T: torch.Tensor, c: torch.Tensor, lse: torch.Tensor,
    tmax: torch.Tensor, tsum: torch.Tensor, *, ncrops: int, n_teacher: int = 2, student_temp: float,
    teacher_temp: float, out: Optional[torch.Tensor] = None, crop_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient pass: dL/dS (ncrops*B, K) in S's dtype (written into ``out`` when given, which
    may be S itself: each element is read before it is written, by the same program).

    Args: grad the 0-dim upstream gradient; lse (ncrops*B,), tmax/tsum (n_teacher*B,) fp32 from
    :func:`dino_loss_forward_triton`; the other arguments (``crop_weights`` included) as there.
    """
    B, K = _check(S, T, c, ncrops, n_teacher, student_temp, teacher_temp)
    for name, x, n in (("lse", lse, ncrops * B), ("tmax", tmax, n_teacher * B), ("tsum", tsum, n_teacher * B)):
        if x.dtype != torch.float32 or tuple(x.shape) != (n,) or x.device != S.device:
            raise ValueError(f"{name}: expected float32 ({n},) on {S.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
    if grad.numel() != 1 or grad.device != S.device:
        raise ValueError(f"grad: expected a 0-dim tensor on {S.device}, got shape {tuple(grad.shape)} on {grad.device}")
    if out is None:
        out = torch.empty_like(S, memory_format=torch.contiguous_format)
    elif out.shape != S.shape or out.dtype != S.dtype or out.stride(-1) != 1 or out.device != S.device:
        raise ValueError(f"out: expected {S.dtype} {tuple(S.shape)} with unit stride on {S.device}, "
                         f"got {out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
    cfg = launch_config(B, K, n_teacher, S.element_size())
    n_terms = n_teacher * ncrops - n_teacher
    W, terms = _weights(crop_weights, ncrops, B, n_terms, S.device)
    _dino_bwd_kernel[(cfg.bwd_tiles, cfg.n_groups)](
        S, T, c, out, grad.reshape(()).contiguous(), lse.contiguous(), tmax.contiguous(),
        tsum.reciprocal(), W,
        B, K, ncrops, n_teacher, S.stride(0), T.stride(0), out.stride(0), cfg.imgs_per_group,
        1.0 / student_temp, 1.0 / teacher_temp, 1.0 / (student_temp * B * terms),
        BLOCK_K=cfg.bwd_block_k, NT_P2=cfg.nt_p2, num_warps=cfg.num_warps,
    )
    return out

"""The eager CPU fast path of the centered soft-target cross-entropy (``backend="torch"``).

Works on chunks of ~4 MiB (a few images, all K columns, buffers recycled through a
:class:`Workspace`): per chunk it soft-maxes the teacher rows of its images once, then for every
crop computes y = S_v/tau_s, its row max, <Q_v, y>, the softmax (one fused aten kernel, one exp
per element) written straight into the gradient's rows, lse = max - log(max softmax), and the
gradient ``|Q_v| scale p - scale Q_v`` in place. The gradient is thus produced in the forward
(one exp per element in all, where recomputing the softmax in the backward would cost a second
one); the backward returns it. No (rows, K) temporary exists other than the gradient.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from dino_fast.ops.soft_ce.checks import math_dtype
from dino_fast.ops.soft_ce.workspace import Workspace

__all__ = ["Workspace", "CPU_GROUP_BYTES", "soft_ce_forward_torch"]

# Bytes of one (images, K) fp32 chunk buffer: large enough that per-op dispatch cost is small
# against the arithmetic, small enough that the ~5 chunk buffers stay in the last-level cache.
CPU_GROUP_BYTES = 4 << 20
# Raise fp32 logits far below their row max before the softmax (see _torch_forward).
_SUBNORMAL_FLOOR = True


def _group_images(B: int, K: int) -> int:
    """Images per chunk of the eager fast path: one (images, K) fp32 buffer of ~CPU_GROUP_BYTES."""
    return max(1, min(B, CPU_GROUP_BYTES // (4 * K)))


def soft_ce_forward_torch(
    S: Tensor, T: Tensor, c: Tensor, ncrops: int, n_teacher: int, tau_s: float, tau_t: float,
    out: Optional[Tensor] = None, workspace: Optional["Workspace"] = None,
    crop_weights: Optional[Sequence[float]] = None, native: Optional[bool] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eager fast-path forward with the gradient computed in the same pass.

    ``native``: None (default) runs the native C++ kernel
    (:func:`~dino_fast.ops.soft_ce.native.soft_ce_forward_native`, same contract) when it takes
    the tensors (CPU, fp32/bf16/fp16) and its library loads, else the torch composition below;
    False forces the composition; True requires the native kernel (``RuntimeError`` otherwise).

    Args: S (ncrops*B, K) and T (n_teacher*B, K) with unit column stride, c (K,), ``out`` an
    optional (ncrops*B, K) tensor of S's dtype to receive the gradient (may be S itself),
    ``workspace`` an optional :class:`Workspace` that recycles the gradient and chunk buffers
    between calls (see there), ``crop_weights`` optional per-student-crop pair weights (validated
    floats, see :func:`~dino_fast.ops.soft_ce.checks.check_crop_weights`; None: ``1/n_terms``).

    Returns: loss (0-dim), colsum of T (K,), lse of S/tau_s per row (ncrops*B,), all fp32 (fp64
    for fp64 inputs), and G = dLoss/dS for an upstream gradient of 1, in S's dtype.

    Per chunk of images (a ~CPU_GROUP_BYTES = 4 MiB buffer), per crop: y = S_v/tau_s; m = max(y); p = softmax(y)
    (one fused aten kernel, one exp per element) written straight into the gradient rows;
    lse = m - log(max(p)); <Q_v, y>; then G_v = |Q_v| * scale * p - scale * Q_v in one pass.
    The teacher rows of the chunk's images are soft-maxed once and reused by all crops.

    With ``crop_weights`` w, crop v's gradient and loss share are scaled by ``w_v``: the shared
    teacher sum is pre-scaled for the weight ``w_ref`` of the last crop (a local crop in Mugs), so
    only crops of another weight pay one extra in-place multiply of their gradient rows.
    """
    from dino_fast.ops.soft_ce.native import soft_ce_forward_native, use_native

    if use_native(native, *((S, T) if out is None else (S, T, out))):
        return soft_ce_forward_native(S, T, c, ncrops, n_teacher, tau_s, tau_t, out=out, workspace=workspace,
                                      crop_weights=crop_weights)
    rows_s, K = S.shape
    B = rows_s // ncrops
    NT = n_teacher
    dt = math_dtype(S, T)
    dev = S.device
    ws = workspace if workspace is not None else Workspace(enabled=False)
    G = ws.get("grad", S.shape, S.dtype, dev) if out is None else out
    r = _group_images(B, K)
    n_terms = NT * ncrops - NT
    scale = 1.0 / (tau_s * B * n_terms)
    alpha: Optional[list[float]] = None              # per-crop multiplier of the gradient rows
    if crop_weights is not None:
        w_ref = crop_weights[-1] if crop_weights[-1] > 0 else max(crop_weights)
        scale = w_ref / (tau_s * B)
        alpha = [w / w_ref for w in crop_weights]
    inv_s, inv_t = 1.0 / tau_s, 1.0 / tau_t
    S3 = S.unflatten(0, (ncrops, B))
    T3 = T.unflatten(0, (NT, B))
    G3 = G.unflatten(0, (ncrops, B))
    # half-precision T: the column sum is accumulated per chunk from the fp32 copy the loop makes
    # anyway (a separate half -> fp32 column reduction of T is several times slower on CPU)
    fused_colsum = T.dtype != dt
    colsum = torch.zeros((K,), dtype=dt, device=dev) if fused_colsum else T.sum(0, dtype=dt)
    cf = c.reshape(-1).to(dt)
    tflat = ws.get("t", (NT * r * K,), dt, dev)
    yflat = ws.get("y", (r * K,), dt, dev)
    Qflat = ws.get("Q", (r * K,), dt, dev) if ncrops > NT else None
    pflat = ws.get("p", (r * K,), dt, dev) if G.dtype != dt else None
    oflat = ws.get("o", (r * K,), dt, dev) if NT > 2 else None
    lse = torch.zeros((ncrops, B), dtype=dt, device=dev)
    # the loss needs only the sum of <Q_v, y> over crops and rows: one BLAS dot per (crop, chunk)
    dots = torch.zeros((ncrops, -(-B // r)), dtype=dt, device=dev)
    same_s = S.dtype == dt
    # fp32: logits more than `floor` below their row max are raised to max - floor before the
    # softmax, so that no probability (nor probability times `scale`) is subnormal: subnormal
    # arithmetic is 2-4x slower on x86 and such probabilities are below 1e-25 of the row's mass
    # (the effect on the loss and on the gradient's norm is < 1e-20 relative). fp64 needs none.
    floor: Optional[float] = None
    if dt == torch.float32 and _SUBNORMAL_FLOOR:
        smallest = scale if alpha is None else scale * min([a for a in alpha if a > 0] + [1.0])
        floor = max(30.0, 87.0 - math.log(K) - max(0.0, math.log(1.0 / smallest)) - 3.0)
    for ci, b0 in enumerate(range(0, B, r)):
        b1 = min(B, b0 + r)
        w = b1 - b0
        q = tflat[: NT * w * K].view(NT, w, K)
        if fused_colsum:
            q.copy_(T3[:, b0:b1])
            colsum.add_(q.view(NT * w, K).sum(0))
            q.sub_(cf)
        else:
            torch.sub(T3[:, b0:b1], cf, out=q)
        q.mul_(inv_t)
        if floor is not None:
            torch.maximum(q, q.amax(-1, keepdim=True).sub_(floor), out=q)
        torch.ops.aten._softmax.out(q, -1, False, out=q)
        q.mul_(-scale)                                        # q <- -scale * q_i
        Qn = None
        if Qflat is not None:
            Qn = Qflat[: w * K].view(w, K)
            torch.sum(q, 0, out=Qn)                           # -scale * sum_i q_i
        y = yflat[: w * K].view(w, K)
        for v in range(ncrops):
            g_rows = G3[v, b0:b1]
            if v < NT:
                others = [i for i in range(NT) if i != v]
                if not others:                                # n_teacher = 1: crop 0 has no term
                    g_rows.zero_()
                    continue
                if len(others) == 1:
                    Qv = q[others[0]]
                else:                                         # summed exactly, no "all - q_v"
                    Qv = oflat[: w * K].view(w, K)
                    torch.sum(q[others], 0, out=Qv)
                nq = NT - 1
            else:
                Qv, nq = Qn, NT
            if same_s:
                torch.mul(S3[v, b0:b1], inv_s, out=y)
            else:
                y.copy_(S3[v, b0:b1]).mul_(inv_s)
            m = lse[v, b0:b1]
            torch.amax(y, 1, out=m)
            # -scale * sum_rows <Q_v, y>, before the floor (vecdot would write the (w, K) product
            # to a temporary and reduce it: a second pass over the chunk)
            torch.dot(y.view(-1), Qv.reshape(-1), out=dots[v, ci])
            if floor is not None:
                torch.maximum(y, (m - floor).unsqueeze(1), out=y)
            p = g_rows if pflat is None else pflat[: w * K].view(w, K)
            torch.ops.aten._softmax.out(y, -1, False, out=p)
            m.sub_(p.amax(1).log_())                          # lse = max - log(max softmax)
            a_v = 1.0 if alpha is None else alpha[v]
            if pflat is None:
                torch.add(Qv, p, alpha=nq * scale, out=g_rows)
                if a_v != 1.0:
                    g_rows.mul_(a_v)
            else:  # half-precision gradient: fp32 in place, then one rounding copy (the same bits
                # as a mixed-dtype add into g_rows, which takes about 1.5x as long on CPU)
                torch.add(Qv, p, alpha=nq * scale, out=p)
                if a_v != 1.0:
                    p.mul_(a_v)
                g_rows.copy_(p)
    v = torch.arange(ncrops, device=dev)
    nq_v = (NT - (v < NT).to(torch.int64)).to(dt)
    if crop_weights is None:
        loss = ((nq_v.unsqueeze(1) * lse).sum() + dots.sum() / scale) / (B * n_terms)
    else:  # sum_v w_v / B * (|Q_v| sum_b lse_vb - sum_b <Q_vb, y_vb>); dots hold -scale * <Q, y>
        wv = torch.tensor(crop_weights, dtype=dt, device=dev)
        loss = (wv * (nq_v * lse.sum(1) + dots.sum(1) / scale)).sum() / B
    return loss, colsum, lse.reshape(-1), G



"""The eager CPU fast path of the row-aligned soft-target cross-entropy (``backend="torch"``).

    q_r  = softmax((T_r - c) / tau_t)        lse_r = logsumexp(S_r / tau_s)
    loss = sum_r w_r (lse_r - <q_r, S_r / tau_s>)
    dS_r = w_r (softmax(S_r / tau_s) - q_r) / tau_s

Works on chunks of rows of ~4 MiB (:data:`dino_fast.ops.soft_ce.eager.CPU_GROUP_BYTES`, buffers
recycled through a :class:`~dino_fast.ops.soft_ce.eager.Workspace`). Per chunk: the teacher
rows are centered, scaled and soft-maxed in one buffer and pre-multiplied by ``-w_r / tau_s``;
``y = S / tau_s``, its row max and the chunk's ``sum_r <q'_r, y_r>`` (one BLAS dot); the
softmax of ``y`` written straight into the gradient's rows (one exp per element);
``lse = max - log(max softmax)``; then ``dS = (w_r / tau_s) p + q'`` in place. The gradient is
produced in the forward (the backward returns it). S and T are each read once from memory (the
teacher column sum for the center is taken from the chunk while it is in cache); no (rows, K)
temporary exists other than the gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from dino_fast.ops.soft_ce.eager import CPU_GROUP_BYTES, Workspace

__all__ = ["patch_ce_forward_torch"]


def _chunk_rows(rows: int, K: int) -> int:
    return max(1, min(rows, CPU_GROUP_BYTES // (4 * K)))


def patch_ce_forward_torch(
    S: Tensor, T: Tensor, c: Tensor, w: Tensor, tau_s: float, tau_t: float, *, with_colsum: bool = True,
    workspace: Optional[Workspace] = None, native: Optional[bool] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eager forward with the gradient computed in the same pass.

    ``native``: None (default) runs the native C++ kernel
    (:func:`~dino_fast.ops.patch_ce.native.patch_ce_forward_native`, same contract) when it
    takes the tensors (CPU, fp32/bf16/fp16) and its library loads, else the torch composition
    below; False forces the composition; True requires the native kernel (``RuntimeError``).

    Args:
        S, T: (rows, K) student and teacher logits (fp32/bf16/fp16/fp64), unit column stride.
        c: (K,) center; w: (rows,) per-row weights; tau_s, tau_t > 0.
        with_colsum: also return the column sum of the raw T (for the center update).
        workspace: recycles the gradient and chunk buffers between calls.

    Returns:
        loss (0-dim), colsum of T (K,) (zeros when ``with_colsum`` is False), lse of S/tau_s per
        row (rows,), all fp32 (fp64 for fp64 inputs), and G = dLoss/dS (rows, K) in S's dtype for
        an upstream gradient of 1.
    """
    from dino_fast.ops.patch_ce.native import patch_ce_forward_native
    from dino_fast.ops.soft_ce.native import use_native

    if use_native(native, S, T):
        return patch_ce_forward_native(S, T, c, w, tau_s, tau_t, with_colsum=with_colsum, workspace=workspace)
    rows, K = S.shape
    dt = torch.float64 if torch.float64 in (S.dtype, T.dtype) else torch.float32
    dev = S.device
    ws = workspace if workspace is not None else Workspace(enabled=False)
    G = ws.get("patch_grad", S.shape, S.dtype, dev)
    colsum = torch.zeros((K,), dtype=dt, device=dev)
    lse = torch.zeros((rows,), dtype=dt, device=dev)
    if rows == 0:
        return torch.zeros((), dtype=dt, device=dev), colsum, lse, G
    r = _chunk_rows(rows, K)
    inv_s, inv_t = 1.0 / tau_s, 1.0 / tau_t
    cf = c.reshape(-1).to(dt)
    wf = w.to(dt)
    ws_all = wf * inv_s                                       # w_r / tau_s
    tflat = ws.get("patch_t", (r * K,), dt, dev)
    yflat = ws.get("patch_y", (r * K,), dt, dev)
    pflat = ws.get("patch_p", (r * K,), dt, dev) if G.dtype != dt else None
    n_chunks = -(-rows // r)
    dots = torch.zeros((n_chunks,), dtype=dt, device=dev)
    floor: Optional[float] = None
    if dt == torch.float32:  # keep probabilities (times the weights) out of the subnormal range
        wmax = float(ws_all.abs().max()) if rows else 1.0
        floor = max(30.0, 87.0 - math.log(K) - max(0.0, math.log(1.0 / wmax)) - 3.0) if wmax > 0 else 30.0
    for ci, r0 in enumerate(range(0, rows, r)):
        r1 = min(rows, r0 + r)
        n = r1 - r0
        q = tflat[: n * K].view(n, K)
        if T.dtype != dt:
            q.copy_(T[r0:r1])
            if with_colsum:
                colsum.add_(q.sum(0))
            q.sub_(cf)
        else:
            if with_colsum:
                colsum.add_(T[r0:r1].sum(0))
            torch.sub(T[r0:r1], cf, out=q)
        q.mul_(inv_t)
        if floor is not None:
            torch.maximum(q, q.amax(-1, keepdim=True).sub_(floor), out=q)
        torch.ops.aten._softmax.out(q, -1, False, out=q)
        wr = ws_all[r0:r1].unsqueeze(1)
        q.mul_(-wr)                                           # q' = -(w_r / tau_s) q_r
        y = yflat[: n * K].view(n, K)
        if S.dtype == dt:
            torch.mul(S[r0:r1], inv_s, out=y)
        else:
            y.copy_(S[r0:r1]).mul_(inv_s)
        m = lse[r0:r1]
        torch.amax(y, 1, out=m)
        torch.dot(y.view(-1), q.view(-1), out=dots[ci])       # sum_r -(w_r/tau_s) <q_r, y_r>
        if floor is not None:
            torch.maximum(y, (m - floor).unsqueeze(1), out=y)
        g_rows = G[r0:r1]
        p = g_rows if pflat is None else pflat[: n * K].view(n, K)
        torch.ops.aten._softmax.out(y, -1, False, out=p)
        m.sub_(p.amax(1).log_())                              # lse = max - log(max softmax)
        if pflat is None:
            torch.addcmul(q, p, wr, out=g_rows)
        else:
            torch.addcmul(q, p, wr, out=p)
            g_rows.copy_(p)
    loss = (wf * lse).sum() + dots.sum() * tau_s
    return loss, colsum, lse, G

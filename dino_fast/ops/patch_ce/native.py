"""The native CPU path of the row-aligned soft-target cross-entropy (iBOT's patch loss).

The C++ kernel of :mod:`dino_fast.ops.native` (``dfn_patch_ce_fwd``): per row, the teacher row
centered, scaled and soft-maxed into a thread buffer, then the student row in three passes in
cache (max and ``<q, S>``; exponentials; the gradient ``w_r / tau_s (softmax - q)`` written
once). S and T are read from memory once, the gradient written once; rows are split over
``torch.get_num_threads()`` threads. Same contract as
:func:`dino_fast.ops.patch_ce.eager.patch_ce_forward_torch` (the path for fp64 and where no
compiler is available).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dino_fast.ops.native import load_native
from dino_fast.ops.soft_ce.native import DTYPE_CODES, _ptr
from dino_fast.ops.soft_ce.workspace import Workspace

__all__ = ["patch_ce_forward_native"]


def patch_ce_forward_native(
    S: Tensor, T: Tensor, c: Tensor, w: Tensor, tau_s: float, tau_t: float, *, with_colsum: bool = True,
    out: Optional[Tensor] = None, workspace: Optional[Workspace] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward with the gradient, natively.

    Args:
        S, T: (rows, K) CPU student and teacher logits, fp32/bf16/fp16, unit column stride
            (:func:`dino_fast.ops.soft_ce.native.native_supported`).
        c: (K,) center; w: (rows,) per-row weights; tau_s, tau_t > 0.
        with_colsum: also return the column sum of the raw T (zeros otherwise).
        out: optional (rows, K) gradient buffer of S's dtype with unit column stride.
        workspace: recycles the gradient buffer between calls (when ``out`` is None).

    Returns:
        loss (0-dim), colsum (K,), lse of S/tau_s per row (rows,), all fp32, and
        G = dLoss/dS (rows, K) in S's dtype for an upstream gradient of 1.
    """
    lib = load_native()
    if lib is None:  # pragma: no cover - callers check native_supported first
        raise RuntimeError("the native CPU kernels are unavailable (dino_fast.ops.native.native_status says why)")
    rows, K = S.shape
    ws = workspace if workspace is not None else Workspace(enabled=False)
    G = ws.get("patch_grad", S.shape, S.dtype, S.device) if out is None else out
    if G.stride(-1) != 1 or G.dtype != S.dtype or G.shape != S.shape:
        raise ValueError(f"out must be {tuple(S.shape)} of S's dtype {S.dtype} with unit column stride, got "
                         f"{tuple(G.shape)} {G.dtype}, strides {tuple(G.stride())}")
    if rows == 0:
        return (torch.zeros((), dtype=torch.float32), torch.zeros((K,), dtype=torch.float32),
                torch.zeros((0,), dtype=torch.float32), G)
    loss = ws.get("patch_loss64", (), torch.float64, S.device)
    lse = ws.get("patch_lse", (rows,), torch.float32, S.device)
    colsum = ws.get("patch_colsum", (K,), torch.float32, S.device)
    if not with_colsum:
        colsum.zero_()
    cf = c.reshape(-1).to(torch.float32).contiguous()
    wf = w.reshape(-1).to(torch.float32).contiguous()
    rc = lib.dfn_patch_ce_fwd(
        _ptr(S), S.stride(0), DTYPE_CODES[S.dtype], _ptr(T), T.stride(0), DTYPE_CODES[T.dtype], _ptr(cf), _ptr(wf),
        rows, K, 1.0 / tau_s, 1.0 / tau_t, _ptr(G), G.stride(0), DTYPE_CODES[G.dtype], _ptr(loss), _ptr(lse),
        _ptr(colsum) if with_colsum else None, torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"the native iBOT-loss kernel could not allocate its thread buffers (K={K})")
    return loss.float(), colsum, lse, G

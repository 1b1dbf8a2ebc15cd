"""The native CPU path of the centered soft-target cross-entropy (the default on CPU tensors).

One C++ kernel (:mod:`dino_fast.ops.native`, ``soft_ce_cpu.cpp``) per call: per image, the
teacher rows are soft-maxed once into a thread buffer; per student row, one pass for the max and
``<Q_v, S_v>``, one for the exponentials (kept in the core's cache) and one that writes the
gradient ``g_v (|Q_v| softmax(S_v / tau_s) - Q_v)``. The student logits are read from memory
once and the gradient written once; nothing else of (rows, K) is allocated. Images are split
over ``torch.get_num_threads()`` threads. Same contract as
:func:`dino_fast.ops.soft_ce.eager.soft_ce_forward_torch` (which remains the path for fp64, for
non-CPU tensors and where no compiler is available).
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import torch
from torch import Tensor

from dino_fast.ops.native import load_native
from dino_fast.ops.soft_ce.workspace import Workspace

__all__ = ["DTYPE_CODES", "native_supported", "soft_ce_forward_native", "use_native"]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def native_supported(*tensors: Tensor) -> bool:
    """True when the native kernel can take these tensors (CPU, fp32/bf16/fp16, unit column
    stride) and the library loads."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in DTYPE_CODES or t.dim() != 2 or t.stride(-1) != 1:
            return False
    return load_native() is not None


def use_native(native: Optional[bool], *tensors: Tensor) -> bool:
    """The CPU entry points' choice: ``native`` None takes the native kernel when
    :func:`native_supported` says it can, False never does, True must (``RuntimeError`` saying
    why not, otherwise). ``tensors``: the call's inputs (and output buffer, if any)."""
    if native is False:
        return False
    if native_supported(*tensors):
        return True
    if native:
        from dino_fast.ops.native import native_status

        t0 = tensors[0]
        raise RuntimeError(f"native=True but the native kernel cannot take these tensors ({t0.device}, "
                           f"{'/'.join(str(t.dtype) for t in tensors[:2])}) or is unavailable: "
                           f"{native_status()[1] or 'unsupported tensors'}")
    return False


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def soft_ce_forward_native(
    S: Tensor, T: Tensor, c: Tensor, ncrops: int, n_teacher: int, tau_s: float, tau_t: float,
    out: Optional[Tensor] = None, workspace: Optional[Workspace] = None,
    crop_weights: Optional[Sequence[float]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward with the gradient, natively.

    Args: S (ncrops*B, K) and T (n_teacher*B, K) CPU tensors, fp32/bf16/fp16, unit column
    stride (:func:`native_supported`); c (K,) center; ``out`` an optional (ncrops*B, K) tensor
    of S's dtype (unit column stride) for the gradient, may be S itself; ``workspace`` recycles
    the gradient buffer between calls; ``crop_weights`` validated per-crop pair weights or None
    (``1/n_terms`` for every pair).

    Returns: loss (0-dim fp32), colsum of T (K,) fp32, lse of S/tau_s per row (ncrops*B,) fp32,
    and G = dLoss/dS (ncrops*B, K) in S's dtype for an upstream gradient of 1.
    """
    lib = load_native()
    if lib is None:  # pragma: no cover - callers check native_supported first
        raise RuntimeError("the native CPU kernels are unavailable (dino_fast.ops.native.native_status says why)")
    rows_s, K = S.shape
    B = rows_s // ncrops
    ws = workspace if workspace is not None else Workspace(enabled=False)
    G = ws.get("grad", S.shape, S.dtype, S.device) if out is None else out
    if G.stride(-1) != 1 or G.dtype != S.dtype:
        raise ValueError(f"out must have S's dtype {S.dtype} and unit column stride, got {G.dtype}, "
                         f"strides {tuple(G.stride())}")
    n_terms = n_teacher * ncrops - n_teacher
    if crop_weights is None:
        coef = [1.0 / (B * n_terms)] * ncrops
    else:
        coef = [float(w) / B for w in crop_weights]
    coef_t = torch.tensor(coef, dtype=torch.float64)
    gscale = (coef_t / tau_s).float()
    cf = c.reshape(-1).to(torch.float32).contiguous()
    # outputs from the workspace too: a fresh (K,) buffer per call costs its first-touch page
    # faults on every call (a fresh 84 MB buffer: 23 ms here, ten times its fill)
    loss = ws.get("loss64", (), torch.float64, S.device)
    lse = ws.get("lse", (rows_s,), torch.float32, S.device)
    colsum = ws.get("colsum", (K,), torch.float32, S.device)
    rc = lib.dfn_soft_ce_fwd(
        _ptr(S), S.stride(0), DTYPE_CODES[S.dtype], _ptr(T), T.stride(0), DTYPE_CODES[T.dtype],
        _ptr(cf), B, K, ncrops, n_teacher, 1.0 / tau_s, 1.0 / tau_t, _ptr(coef_t), _ptr(gscale),
        _ptr(G), G.stride(0), DTYPE_CODES[G.dtype], _ptr(loss), _ptr(lse), _ptr(colsum), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"the native DINO-loss kernel could not allocate its thread buffers (K={K})")
    return loss.float(), colsum, lse, G

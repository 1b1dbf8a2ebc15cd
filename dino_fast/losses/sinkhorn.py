"""Sinkhorn-Knopp teacher targets (DINOv2's centering alternative, after SwAV).

Given teacher logits ``T`` (rows, K) and a temperature ``tau``, three Sinkhorn-Knopp iterations
make the matrix ``exp(T / tau)`` doubly normalised over the global batch (all ranks): every
prototype (column) carries mass 1/K, every sample (row) 1/B_total; the returned targets are
scaled back so that each row sums to 1. Per iteration the column sums are all-reduced across
ranks (each rank's rows are its own samples, so row sums stay local), as DINOv2 computes it.

Unlike DINOv2, the iterations run in the log domain: each normalisation subtracts a
log-sum-exp (over the global batch for the prototype sums: a MAX then a SUM all-reduce of K
values) instead of dividing by a sum of exponentials. The result is the same, but fp32 can
neither overflow (DINOv2's ``exp(T / tau)`` is inf above ``88 * tau``) nor lose a prototype whose
logits all lie far below the others (a column of underflowed zeros divided by its zero sum gives
NaN when a global maximum is subtracted instead). The constant first normalisation of DINOv2
(by the total) is absorbed by the first prototype normalisation and skipped.

Backends: on CUDA tensors (``backend="auto"``, or ``"triton"`` under ``TRITON_INTERPRET=1``) the
iterations run as Triton passes that never materialise the iterates nor a transposed copy
(:mod:`dino_fast.ops.sinkhorn`); on CPU tensors in fp32/bf16/fp16 the native kernels
(:mod:`dino_fast.ops.sinkhorn.native`: three passes over T per iteration, no full-size
temporary); the eager torch code below is the fallback (``"torch"`` without a C++ compiler),
and fp64 inputs always take it.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from dino_fast.ops.backend import resolve_backend
from dino_fast.utils.distributed import is_dist

__all__ = ["sinkhorn_knopp_log_targets", "sinkhorn_knopp_targets"]



def _check(teacher_logits: Tensor, teacher_temp: float, n_iterations: int) -> None:
    if not isinstance(teacher_logits, Tensor) or teacher_logits.dim() != 2 or teacher_logits.numel() == 0:
        got = tuple(teacher_logits.shape) if isinstance(teacher_logits, Tensor) else type(teacher_logits).__name__
        raise ValueError(f"teacher_logits must be a non-empty [rows, K] tensor, got {got}")
    if not teacher_logits.is_floating_point():
        raise ValueError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
    if isinstance(teacher_temp, bool) or not isinstance(teacher_temp, (int, float)) or not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be a positive float, got {teacher_temp!r}")
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")


@torch.no_grad()
def sinkhorn_knopp_log_targets(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3, *,
                               backend: str = "auto") -> Tensor:
    """``log`` of :func:`sinkhorn_knopp_targets`, finite everywhere (same arguments and errors;
    ``backend``: ``auto | triton | torch | cpu``, see the module doc).

    Returns:
        ``[rows, K]`` fp32 (fp64 for fp64 input), ``logsumexp`` of every row = 0, no gradient.
    """
    _check(teacher_logits, teacher_temp, n_iterations)
    impl = resolve_backend(backend, teacher_logits.device)
    if impl == "reference":
        raise ValueError("backend='reference' is not available here; use dino_fast.reference.sinkhorn")
    if impl == "triton" and teacher_logits.dtype != torch.float64:
        from dino_fast.ops.sinkhorn.function import sinkhorn_log_targets_triton

        return sinkhorn_log_targets_triton(teacher_logits.contiguous(), float(teacher_temp), n_iterations)
    if impl == "torch" and teacher_logits.device.type == "cpu" and teacher_logits.stride(-1) == 1:
        from dino_fast.ops.soft_ce.native import native_supported

        if native_supported(teacher_logits):
            from dino_fast.ops.sinkhorn.native import sinkhorn_log_targets_native

            return sinkhorn_log_targets_native(teacher_logits, float(teacher_temp), n_iterations)
    dt = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    x = teacher_logits.to(dt) / float(teacher_temp)
    rows, K = x.shape
    distributed = is_dist()
    n_total = torch.tensor([float(rows)], dtype=dt, device=x.device)
    if distributed:
        dist.all_reduce(n_total)
    log_k, log_n = math.log(K), torch.log(n_total)
    for _ in range(n_iterations):
        m = x.amax(dim=0, keepdim=True)                      # prototype log-mass over the global batch
        if distributed:
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
        s = torch.exp(x - m).sum(dim=0, keepdim=True)
        if distributed:
            dist.all_reduce(s)
        x -= m + torch.log(s) + log_k                        # every prototype: mass 1/K
        x -= torch.logsumexp(x, dim=1, keepdim=True) + log_n  # every sample: mass 1/N (local rows)
    return x + log_n                                         # each row sums to 1


@torch.no_grad()
def sinkhorn_knopp_targets(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Teacher target distributions by Sinkhorn-Knopp over the global batch.

    Args:
        teacher_logits: ``[rows, K]`` float (any float dtype; computed in fp32, fp64 for fp64
            input), this rank's teacher head outputs (all global crops together, as DINOv2).
        teacher_temp: ``tau`` > 0.
        n_iterations: Sinkhorn-Knopp iterations (DINOv2: 3), >= 1.

    Returns:
        ``[rows, K]`` targets in fp32 (fp64 for fp64 input), each row summing to 1, no gradient.
        With a process group the prototype sums and the sample count are reduced over ranks
        (every rank must call this with the same K).

    Raises:
        ValueError: a non-2-D or empty input, a non-positive temperature or iteration count.
    """
    return torch.exp(sinkhorn_knopp_log_targets(teacher_logits, teacher_temp, n_iterations))

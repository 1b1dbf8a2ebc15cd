"""Teacher centering shared by every loss that centers (DINO, the group loss of Mugs, iBOT).

The center is an EMA of the batch mean of the raw teacher logits over every rank:
``c <- m * c + (1 - m) * sum_rows(T) / (rows * world_size)``. :func:`update_center` is the
functional form (synchronous all-reduce); :class:`CenterEMA` is what the loss modules hold: it
updates a center buffer from the column sum their fused op already computed (no second read of
T), optionally starting the all-reduce asynchronously and applying it at the next call (DINOv2
style: the reduce overlaps the backward).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dino_fast.ops.soft_ce.checks import TensorOrCrops, as_2d, math_dtype

__all__ = ["update_center", "CenterEMA", "apply_center"]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def apply_center(center: Tensor, batch_sum: Tensor, count: int, momentum: float) -> None:
    """center <- m*center + (1-m) * batch_sum / count, in place."""
    center.mul_(momentum).add_(batch_sum.reshape(center.shape).to(center.dtype), alpha=(1.0 - momentum) / count)


@torch.no_grad()
def update_center(center: Tensor, teacher_output: TensorOrCrops, momentum: float) -> None:
    """In-place center update ``c <- m*c + (1-m) * sum_rows(T) / (rows * world_size)``.

    Args:
        center: (1, K) or (K,) float tensor, updated in place.
        teacher_output: (rows, K) raw teacher logits (or a list of (B, K) crops).
        momentum: m in [0, 1].

    The column sum is accumulated in fp32 and all-reduced (sum) over ranks when
    ``torch.distributed`` is initialised; without a process group it is the local sum.
    """
    T = as_2d(teacher_output, "teacher_output")
    if not isinstance(center, Tensor) or not center.is_floating_point():
        raise TypeError(f"center: expected a float tensor, got {type(center).__name__}"
                        f"{'' if not isinstance(center, Tensor) else ' of dtype ' + str(center.dtype)}")
    if T.dim() != 2 or T.shape[1] != center.numel():
        raise ValueError(f"teacher_output: expected (rows, {center.numel()}) to match center "
                         f"{tuple(center.shape)}, got {tuple(T.shape)}")
    if not T.is_floating_point():
        raise TypeError(f"teacher_output: expected a float tensor, got dtype {T.dtype}")
    if T.device != center.device:
        raise ValueError(f"teacher_output and center must be on one device, got {T.device} and {center.device}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    batch = T.sum(0, dtype=math_dtype(T, center))
    world = _world_size()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch)
    apply_center(center, batch, T.shape[0] * world, float(momentum))




class CenterEMA:
    """EMA center update of one center buffer, synchronous or with an asynchronous all-reduce.

    Args:
        momentum: m in [0, 1].
        async_reduce: start the all-reduce of the column sum asynchronously in :meth:`update`
            and apply it in :meth:`flush` (the owner calls ``flush`` before its next use of the
            center and before ``state_dict()``). Eager mode only.

    The center buffer is owned by the loss module (its state-dict key stays the module's own);
    this object only holds the pending update.
    """

    def __init__(self, momentum: float, async_reduce: bool = False) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center_momentum must be a float in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.async_reduce = bool(async_reduce)
        self._pending: Optional[tuple[object, Tensor, Tensor, int]] = None

    @property
    def pending(self) -> bool:
        """True while an asynchronous update waits for :meth:`flush`."""
        return self._pending is not None

    @torch.no_grad()
    def update(self, center: Tensor, colsum: Tensor, rows: int) -> None:
        """Fold a batch into ``center`` (in place): ``colsum`` (K,) is the column sum of this
        rank's ``rows`` raw teacher rows (fp32 or fp64); the sums are all-reduced over ranks."""
        batch = colsum.detach()
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        if self.async_reduce:
            self.flush(center)
            handle = dist.all_reduce(batch, async_op=True) if distributed else None
            self._pending = (handle, center, batch, rows * world)
            return
        if distributed:
            dist.all_reduce(batch)
        apply_center(center, batch, rows * world, self.momentum)

    @torch.no_grad()
    def flush(self, center: Optional[Tensor] = None) -> None:
        """Apply a pending asynchronous update (waits for its all-reduce); no-op if none.

        ``center`` is accepted for symmetry with :meth:`update`; the pending update applies to
        the buffer it was started on."""
        pending = self._pending
        if pending is None:
            return
        handle, target, batch, count = pending
        if handle is not None:
            handle.wait()
        apply_center(target, batch, count, self.momentum)
        self._pending = None

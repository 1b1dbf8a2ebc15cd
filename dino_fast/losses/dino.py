"""The DINO loss module: a drop-in ``DINOLoss`` over the fused soft-target cross-entropy op.

The math and the backends are those of :mod:`dino_fast.ops.soft_ce.function`; the center update
is :class:`dino_fast.losses.centering.CenterEMA`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dino_fast.losses.centering import CenterEMA
from dino_fast.losses.sinkhorn import sinkhorn_knopp_log_targets
from dino_fast.ops.backend import check_backend
from dino_fast.ops.soft_ce.checks import TensorOrCrops, as_2d, check_crop_weights, check_int, check_temp
from dino_fast.ops.soft_ce.eager import Workspace
from dino_fast.ops.soft_ce.function import dino_loss, dino_loss_with_colsum
from dino_fast.utils.finite import check_finite
from dino_fast.utils.schedules import teacher_temp_schedule

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Drop-in replacement for the official DINO ``DINOLoss``, fused.

    Same constructor (plus keyword-only options), state (a (1, out_dim) fp32 ``center`` buffer,
    ``teacher_temp_schedule``) and ``forward(student_output, teacher_output, epoch)``.

    Args:
        out_dim: K. ncrops: student crops (2 global + local). warmup_teacher_temp, teacher_temp,
        warmup_teacher_temp_epochs, nepochs: the per-epoch teacher temperature schedule
        (``np.linspace(warmup, final, warmup_epochs)`` then constant). student_temp: tau_s.
        center_momentum: m of the center EMA.
        backend: "auto" | "triton" | "torch" ("cpu") | "reference".
        n_teacher: teacher crops (2 in DINO); they are the first ``n_teacher`` student crops.
        async_center: start the center all-reduce asynchronously and apply it at the next call
            (DINOv2 style; overlaps the reduce with the backward). A pending update is applied
            by :meth:`flush_center`, automatically before ``state_dict()`` and at the next
            ``forward``; call ``flush_center()`` yourself before reading ``center`` directly.
            Eager mode only (its Python-side state does not trace under torch.compile).
        check_finite: check both inputs for NaN/inf and raise :class:`NonFiniteError` naming the
            crop and row (costs a read of the inputs and a host sync).
        crop_weights: optional weight of every pair (teacher i, student v != i) by student crop v
            (``ncrops`` floats; Mugs' group loss passes :func:`dino_fast.losses.mugs.mugs_crop_weights`);
            None: the official uniform ``1/n_terms``.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        *,
        backend: str = "auto",
        n_teacher: int = 2,
        async_center: bool = False,
        check_finite: bool = False,
        crop_weights: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        out_dim = check_int("out_dim", out_dim, 1)
        self.ncrops = check_int("ncrops", ncrops, 2)
        self.n_teacher = check_int("n_teacher", n_teacher, 1)
        if self.n_teacher > self.ncrops:
            raise ValueError(f"n_teacher must be <= ncrops, got n_teacher={n_teacher}, ncrops={ncrops}")
        self.student_temp = check_temp("student_temp", student_temp)
        check_temp("warmup_teacher_temp", warmup_teacher_temp)
        check_temp("teacher_temp", teacher_temp)
        warm = check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0)
        nepochs = check_int("nepochs", nepochs, 1)
        if warm > nepochs:
            raise ValueError(f"warmup_teacher_temp_epochs ({warm}) must be <= nepochs ({nepochs})")
        self._centering = CenterEMA(center_momentum, async_reduce=async_center)
        self.center_momentum = self._centering.momentum
        self.backend = check_backend(backend)
        self.async_center = bool(async_center)
        self.check_finite = bool(check_finite)
        self.crop_weights = check_crop_weights(crop_weights, self.ncrops)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warm, nepochs)
        self._temps = [float(t) for t in self.teacher_temp_schedule]
        self._workspace = Workspace()
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.flush_center())

    def teacher_temp_at(self, epoch: int) -> float:
        """Teacher temperature of ``epoch`` (0-based) from the schedule."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__} {epoch!r}")
        if not 0 <= epoch < len(self._temps):
            raise ValueError(f"epoch must be in [0, {len(self._temps)}) (nepochs), got {epoch}")
        return self._temps[int(epoch)]

    def forward(self, student_output: TensorOrCrops, teacher_output: TensorOrCrops, epoch: int) -> Tensor:
        """Loss of one step (0-dim fp32 tensor), then the center update.

        student_output: (ncrops*B, out_dim) crop-major, or a list of ``ncrops`` (B, out_dim);
        teacher_output: (n_teacher*B, out_dim), or a list of ``n_teacher`` (B, out_dim).
        """
        if self.check_finite:
            rows = (student_output.shape[0] // self.ncrops if isinstance(student_output, Tensor)
                    else student_output[0].shape[0])
            check_finite(student_output, "student_output", max(rows, 1))
            check_finite(teacher_output, "teacher_output", max(rows, 1))
        self.flush_center()
        temp = self.teacher_temp_at(epoch)
        T = as_2d(teacher_output, "teacher_output")
        loss, colsum = dino_loss_with_colsum(
            student_output, T, self.center, ncrops=self.ncrops, student_temp=self.student_temp,
            teacher_temp=temp, backend=self.backend, n_teacher=self.n_teacher, workspace=self._workspace,
            crop_weights=self.crop_weights,
        )
        self._centering.update(self.center, colsum, T.shape[0])
        return loss

    def sinkhorn_forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        """The same pair loss with Sinkhorn-Knopp teacher targets Q (DINOv2) instead of the center
        (0-dim fp32 tensor; the center is neither read nor updated).

        The fused op reads ``log Q`` (:func:`~dino_fast.losses.sinkhorn.sinkhorn_knopp_log_targets`
        of the detached ``teacher_output`` at this epoch's temperature) as teacher logits at
        temperature 1 with a zero center, so its teacher softmax returns Q (rows sum to 1). The
        pairs are weighted as in :meth:`forward` (``crop_weights``: Mugs' group loss; None: the
        official uniform ``1/n_terms``).
        student_output: (ncrops*B, out_dim) crop-major; teacher_output: (n_teacher*B, out_dim).
        """
        logq = sinkhorn_knopp_log_targets(teacher_output.detach(), self.teacher_temp_at(epoch))
        zero = torch.zeros(logq.shape[1], dtype=torch.float32, device=logq.device)
        return dino_loss(student_output, logq, zero, ncrops=self.ncrops, student_temp=self.student_temp,
                         teacher_temp=1.0, backend=self.backend, n_teacher=self.n_teacher,
                         crop_weights=self.crop_weights)

    @torch.no_grad()
    def flush_center(self) -> None:
        """Apply a pending asynchronous center update (waits for its all-reduce); no-op if none."""
        self._centering.flush(self.center)

    def extra_repr(self) -> str:  # noqa: D102
        return (f"out_dim={self.center.shape[1]}, ncrops={self.ncrops}, n_teacher={self.n_teacher}, "
                f"student_temp={self.student_temp}, center_momentum={self.center_momentum}, "
                f"backend={self.backend!r}, async_center={self.async_center}")

"""Eager reference of the official DINO loss, op by op (tests and benchmarks only).

This follows facebookresearch/dino's ``DINOLoss`` exactly: the student logits are divided by
``student_temp`` and chunked per crop, the teacher logits are centered, sharpened and
soft-maxed, and the cross-entropy ``sum(-q * log_softmax(s))`` is averaged over every
(teacher crop i, student crop v != i) pair. The center is updated afterwards with an
all-reduce over ranks (only when a process group is initialised).

It is deliberately unfused: training never uses it; every fast path is compared with it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["dino_loss_reference", "update_center_reference", "DINOLossReference", "combine_partials_reference",
           "koleo_loss_reference"]


def dino_loss_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    *,
    ncrops: int,
    student_temp: float,
    teacher_temp: float,
    n_teacher: int = 2,
    crop_weights: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """The DINO loss as a loop over crop pairs (the official algorithm).

    Args:
        student: (ncrops*B, K) student logits, crop-major, any float dtype (the arithmetic is
            done in the input dtype, as in the official code; pass float64 for a ground truth).
        teacher: (n_teacher*B, K) teacher logits, crop-major (no gradient flows into it).
        center: (1, K) or (K,) center.
        ncrops: number of student crops; n_teacher: number of teacher crops (2 in DINO).
        student_temp / teacher_temp: temperatures tau_s, tau_t.
        crop_weights: optional weight per student crop v of each pair (i, v != i); the loss is
            then the weighted sum of the pair terms instead of their mean (Mugs' group loss).

    Returns:
        0-dim tensor of ``student``'s dtype: mean over pairs of mean over images of
        ``H(q_i, p_v)`` (or ``sum w_v * mean_b H(q_i, p_v)`` over the pairs with crop weights).
    """
    student_out = student / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher - center.reshape(1, -1)) / teacher_temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(n_teacher)
    total_loss = student.new_zeros(())
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            if crop_weights is None:
                total_loss = total_loss + loss.mean()
            else:
                total_loss = total_loss + crop_weights[v] * loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms if crop_weights is None else total_loss


def dino_loss_dinov2_composition(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    *,
    ncrops: int,
    student_temp: float,
    teacher_temp: float,
    n_teacher: int = 2,
) -> torch.Tensor:
    """The same loss as :func:`dino_loss_reference`, composed as DINOv2's DINO loss module does:
    the teacher soft-maxed once, one log-softmax per student crop (not one per pair), then the
    pairs (teacher crop i, student crop v != i) of ``-sum(q_i * log p_v)`` averaged.

    Same arguments and result; the arithmetic is in float32 for half inputs (as DINOv2 runs its
    loss), else in the input dtype. A peer for the benchmarks (eager and under torch.compile).
    """
    dt = torch.float32 if student.dtype in (torch.bfloat16, torch.float16) else student.dtype
    q = F.softmax((teacher.to(dt) - center.reshape(1, -1).to(dt)) / teacher_temp, dim=-1).detach().chunk(n_teacher)
    logp = F.log_softmax(student.to(dt) / student_temp, dim=-1).chunk(ncrops)
    total = student.new_zeros((), dtype=dt)
    n = 0
    for iq, qi in enumerate(q):
        for v, lp in enumerate(logp):
            if v != iq:
                total = total - torch.sum(qi * lp, dim=-1).mean()
                n += 1
    return total / n


@torch.no_grad()
def update_center_reference(center: torch.Tensor, teacher_output: torch.Tensor, momentum: float) -> torch.Tensor:
    """Return the updated center ``m*c + (1-m) * sum_rows(T) / (rows * world_size)``.

    Args:
        center: (1, K) current center.
        teacher_output: (rows, K) raw teacher logits (before centering).
        momentum: m.

    Returns:
        (1, K) new center (a new tensor, as in the official code). The column sum is
        all-reduced over ranks when ``torch.distributed`` is initialised.
    """
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_center)
        world_size = dist.get_world_size()
    batch_center = batch_center / (len(teacher_output) * world_size)
    return center * momentum + batch_center * (1 - momentum)


class DINOLossReference(nn.Module):
    """The official ``DINOLoss`` module (same constructor, state and forward), op by op.

    ``forward(student_output (ncrops*B, K), teacher_output (n_teacher*B, K), epoch: int)``
    returns a 0-dim tensor and updates the (1, K) ``center`` buffer.
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
        n_teacher: int = 2,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.n_teacher = n_teacher
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Loss of one step, then the center update (see :func:`dino_loss_reference`)."""
        temp = float(self.teacher_temp_schedule[epoch])
        loss = dino_loss_reference(
            student_output, teacher_output, self.center,
            ncrops=self.ncrops, student_temp=self.student_temp, teacher_temp=temp, n_teacher=self.n_teacher,
        )
        self.center = update_center_reference(self.center, teacher_output, self.center_momentum)
        return loss


def combine_partials_reference(
    smax: Tensor, ssum: Tensor, tmax: Tensor, tsum: Tensor, dots: Tensor, n_teacher: int,
    crop_weights: Optional[Sequence[float]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Turn per-chunk partials into the loss and the per-row statistics the backward needs: the
    eager formula of the Triton forward's last step (dino_fast/ops/soft_ce/kernels.py ``_dino_combine_kernel``,
    which the kernel tests check against this).

    Args (all fp32 or fp64, n = number of column chunks):
        smax, ssum: (ncrops, B, n) chunk max of S/tau_s and sum of exp(S/tau_s - chunk max).
        tmax, tsum: (n_teacher, B, n) the same for (T - c)/tau_t.
        dots: (ncrops, B, n_teacher, n): sum_k exp((T_i - c)/tau_t - chunk max_i) * S_v/tau_s.
        crop_weights: optional pair weight per student crop (default: 1/n_terms each).

    Returns:
        loss (0-dim), lse (ncrops*B,), teacher max (n_teacher*B,), teacher sum-exp (n_teacher*B,).
    """
    ncrops, B, _ = smax.shape
    TM = tmax.amax(dim=-1)                                    # (NT, B)
    w = torch.exp(tmax - TM.unsqueeze(-1))                    # (NT, B, n)
    TZ = (tsum * w).sum(-1)                                   # (NT, B)
    qdot = (dots * w.permute(1, 0, 2).unsqueeze(0)).sum(-1) / TZ.t().unsqueeze(0)  # (ncrops, B, NT)
    SM = smax.amax(dim=-1)                                    # (ncrops, B)
    lse = SM + torch.log((ssum * torch.exp(smax - SM.unsqueeze(-1))).sum(-1))
    v = torch.arange(ncrops, device=smax.device).unsqueeze(1)
    i = torch.arange(n_teacher, device=smax.device).unsqueeze(0)
    pair = (v != i).to(smax.dtype)                            # (ncrops, NT): 1 where (i, v) is a term
    nq = pair.sum(1)                                          # |Q_v|
    n_terms = n_teacher * ncrops - n_teacher
    per_crop = (nq.unsqueeze(1) * lse).sum(1) - (qdot * pair.unsqueeze(1)).sum((1, 2))   # (ncrops,)
    if crop_weights is None:
        loss = per_crop.sum() / (B * n_terms)
    else:
        loss = (torch.tensor(crop_weights, dtype=per_crop.dtype, device=per_crop.device) * per_crop).sum() / B
    return loss, lse.reshape(-1), TM.reshape(-1), TZ.reshape(-1)


def koleo_loss_reference(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (DINOv2) by its definition, for tests: all pairwise Euclidean distances of the
    L2-normalised rows, each row's smallest distance to another row, ``-mean log(d + eps)``.

    Args:
        features: ``[N, D]`` float, N >= 2 (computed in float64).
    Returns:
        scalar float64, differentiable in ``features``.
    """
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    n = x.shape[0]
    d2 = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    d2 = d2 + torch.diag(torch.full((n,), float("inf"), dtype=d2.dtype, device=d2.device))  # not its own neighbour
    return -torch.log(d2.min(dim=1).values.sqrt() + eps).mean()

"""DINOv2's iBOT patch loss restated op by op (tests and benchmarks only; arithmetic in the
input dtype, so pass float64 for a ground truth).

- :func:`patch_ce_reference`: ``-sum_r w_r sum_k q_rk log_softmax(S_r / tau_s)_k`` with
  ``q_r = softmax((T_r - c) / tau_t)``: the generic row-aligned op.
- :func:`ibot_patch_loss_reference`: DINOv2's ``forward_masked``: student and teacher rows of the
  masked tokens (flattened crop-major, row-major over the patch grid), teacher softmax with the
  patch center, weights ``1 / max(1, #masked of the crop)`` per token, summed and divided by the
  number of crops (masked or not), negated.
- :func:`ibot_patch_loss_dense_reference`: DINOv2's dense ``forward`` over every token with the
  boolean masks: per crop the mean over its masked tokens, then the mean over crops (equal to
  the masked form).
- :func:`ibot_center_update_reference`: DINOv2's update, ``c <- m c + (1 - m) mean(masked
  teacher rows)`` (per rank; DINOv2 averages the per-rank means over ranks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["patch_ce_reference", "ibot_patch_loss_reference", "ibot_patch_loss_dense_reference",
           "ibot_center_update_reference", "ibot_masks_weight_reference"]


def patch_ce_reference(student: Tensor, teacher: Tensor, center: Tensor, weights: Tensor, *, student_temp: float,
                       teacher_temp: float) -> Tensor:
    """``-sum_r w_r <softmax((T_r - c)/tau_t), log_softmax(S_r/tau_s)>``; (R, K) inputs, (R,) weights."""
    q = F.softmax((teacher - center.reshape(1, -1)) / teacher_temp, dim=-1)
    per_row = torch.sum(q * F.log_softmax(student / student_temp, dim=-1), dim=-1)
    return -(per_row * weights.to(per_row.dtype)).sum()


def ibot_masks_weight_reference(masks: Tensor) -> Tensor:
    """DINOv2's ``masks_weight``: ``1 / max(1, #masked of the crop)`` for every masked token,
    flattened in the order of ``masks [n_crops, N].flatten().nonzero()``; float64 here (DINOv2's
    are float32)."""
    return (1 / masks.sum(-1).to(torch.float64).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]


def ibot_patch_loss_reference(student_masked: Tensor, teacher_masked: Tensor, masks: Tensor, center: Tensor, *,
                              student_temp: float, teacher_temp: float) -> Tensor:
    """DINOv2's ``forward_masked`` with centered, sharpened teacher targets.

    Args: student_masked / teacher_masked (n_masked, K) rows of the masked tokens; masks bool
    (n_crops, N); center (K,) or (1, 1, K).
    """
    t = F.softmax((teacher_masked - center.reshape(1, -1)) / teacher_temp, dim=-1)
    loss = torch.sum(t * F.log_softmax(student_masked / student_temp, dim=-1), dim=-1)
    w = ibot_masks_weight_reference(masks).to(loss.dtype)
    return -(loss * w).sum() / masks.shape[0]


def ibot_patch_loss_dense_reference(student_patches: Tensor, teacher_patches: Tensor, masks: Tensor,
                                    center: Tensor, *, student_temp: float, teacher_temp: float) -> Tensor:
    """DINOv2's dense ``forward``: (n_crops, N, K) logits of every token, bool masks (n_crops, N)."""
    t = F.softmax((teacher_patches - center.reshape(1, 1, -1)) / teacher_temp, dim=-1)
    loss = torch.sum(t * F.log_softmax(student_patches / student_temp, dim=-1), dim=-1)
    loss = torch.sum(loss * masks.to(loss.dtype), dim=-1) / masks.sum(dim=-1).to(loss.dtype).clamp(min=1.0)
    return -loss.mean()


@torch.no_grad()
def ibot_center_update_reference(center: Tensor, teacher_masked: Tensor, momentum: float) -> Tensor:
    """The new center (single process): ``m c + (1 - m) mean_rows(teacher_masked)``."""
    return center * momentum + teacher_masked.mean(0).reshape(center.shape) * (1 - momentum)

"""DINO (Caron et al. 2021): self-distillation with no labels, on the fused loss and EMA ops.

Student and teacher are :class:`~dino_fast.models.MultiCropWrapper` s (backbone + DINO head);
the teacher sees the global crops, the student every crop; the loss is the official
:class:`~dino_fast.losses.DINOLoss` (centered, sharpened teacher; all pairs of a teacher crop and
a different student crop). ``loss.koleo_weight > 0`` adds DINOv2's KoLeo term on the student's
global-crop CLS features (one term per global crop, per rank, as DINOv2);
``loss.centering: sinkhorn_knopp`` replaces the centered teacher softmax by DINOv2's
Sinkhorn-Knopp targets (:mod:`dino_fast.losses.sinkhorn`; the center then stays unused).

Loss terms: ``dino`` (weight 1) and, with KoLeo, ``koleo`` (weight ``loss.koleo_weight``).
Method state: ``dino_loss.center``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor, nn

from dino_fast.config import TrainConfig
from dino_fast.losses.dino import DINOLoss
from dino_fast.losses.koleo import koleo_loss
from dino_fast.methods.base import LossTerm, Method, StepOutput, build_backbone, head_collapse_inputs
from dino_fast.methods.registry import register_method
from dino_fast.models.heads import DINOHead
from dino_fast.models.multicrop import MultiCropWrapper

__all__ = ["DINO", "build_student_teacher"]


def build_student_teacher(cfg: TrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher :class:`MultiCropWrapper` s with DINO heads; the teacher starts as a
    copy of the student and never receives gradients (its backbone has no drop path)."""

    def head() -> nn.Module:
        return DINOHead(
            embed_dim, cfg.model.out_dim, use_bn=cfg.model.use_bn_in_head,
            norm_last_layer=cfg.model.norm_last_layer, hidden_dim=cfg.model.head_hidden_dim,
            bottleneck_dim=cfg.model.head_bottleneck_dim,
        )

    s_backbone = build_backbone(cfg, teacher=False)
    t_backbone = build_backbone(cfg, teacher=True)
    embed_dim = s_backbone.embed_dim
    fused = cfg.model.fused_multicrop_attention
    student = MultiCropWrapper(s_backbone, head(), fused_attention=fused)
    teacher = MultiCropWrapper(t_backbone, head(), fused_attention=fused)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@register_method("dino")
class DINO(Method):
    """DINO from a :class:`TrainConfig` (``model.*``, ``data.*`` crop counts, ``loss.*``)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.student, self.teacher = build_student_teacher(cfg)
        self.n_global = cfg.data.global_crops_number
        ncrops = cfg.data.global_crops_number + cfg.data.local_crops_number
        self.koleo_weight = float(cfg.loss.koleo_weight)
        self.centering = cfg.loss.centering
        self._last_teacher_features: Optional[Tensor] = None
        self.dino_loss = DINOLoss(
            cfg.model.out_dim, ncrops, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
            cfg.loss.warmup_teacher_temp_epochs, cfg.train.epochs, student_temp=cfg.loss.student_temp,
            center_momentum=cfg.loss.center_momentum, backend=cfg.loss.backend,
            async_center=cfg.loss.async_center, check_finite=False,  # the trainer checks, on all ranks
        )

    def forward_step(self, crops: Sequence[Tensor], epoch: int, it: int) -> StepOutput:
        """DINO loss (and KoLeo) of one batch; see :meth:`Method.forward_step`."""
        with self.autocast():
            teacher_out, teacher_features = self.teacher(crops[: self.n_global], return_features=True)
            if self.koleo_weight > 0:
                student_out, student_features = self.student_forward(crops, return_features=True)
            else:
                student_out = self.student_forward(crops)
        B = crops[0].shape[0]
        if self.centering == "sinkhorn_knopp":
            terms = {"dino": LossTerm(self.dino_loss.sinkhorn_forward(student_out, teacher_out, epoch), 1.0)}
        else:
            terms = {"dino": LossTerm(self.dino_loss(student_out, teacher_out, epoch), 1.0)}
        if self.koleo_weight > 0:  # DINOv2: one KoLeo term per global crop, on the backbone CLS features
            n_rows = self.n_global * B
            koleo = sum(koleo_loss(f) for f in student_features[:n_rows].chunk(self.n_global))
            terms["koleo"] = LossTerm(koleo, self.koleo_weight)
        out = StepOutput(terms, {"student_output": (student_out, B), "teacher_output": (teacher_out, B)})
        self._last_teacher_features = teacher_features
        return out

    def collapse_inputs(self, out: StepOutput, epoch: int) -> Optional[dict[str, Any]]:
        """Teacher and student head outputs of the step, the loss center, the temperatures and
        the teacher's backbone CLS features (see :meth:`Method.collapse_inputs`)."""
        return head_collapse_inputs(out, self.dino_loss, epoch, features=self._last_teacher_features)

    def scalars(self, epoch: int, it: int) -> dict[str, float]:
        """The teacher temperature of ``epoch`` (logged beside the loss terms)."""
        return {"teacher_temp": float(self.dino_loss.teacher_temp_schedule[epoch])}

    @classmethod
    def legacy_method_state(cls, checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Format-1 checkpoints (and the official ones) hold the loss center under ``dino_loss``."""
        old = checkpoint.get("dino_loss")
        if not isinstance(old, dict):
            return None
        return {f"dino_loss.{k}": v for k, v in old.items()}

"""Mugs (Zhou et al. 2022, "Mugs: A Multi-Granular Self-Supervised Learning Framework"), with the
semantics of the official code (sail-sg/mugs), on the fused DINO-loss op.

Crops: the teacher sees the 2 teacher global crops, the student 2 *separate* global crops (the
loader's extra global crops, :meth:`Mugs.extra_global_crops`) and the local crops; they never
see the same crop. Networks (:class:`~dino_fast.models.mugs.MugsNetwork`): the ViT, one relation
block fed by a top-k memory lookup, and three heads; the student adds predictors to the instance
and local-group projectors; the teacher EMA covers backbone, relation block and heads (not the
predictors, :meth:`Mugs.ema_modules`). Losses, each ``1/2 (mean over the global pairs + mean
over the local pairs)`` of the (teacher t, student s != t) pairs:

- ``instance``: queue InfoNCE (:mod:`dino_fast.losses.infonce`) of the student's instance
  predictions against the teacher's instance keys, tau ``mugs.temperature``;
- ``local_group``: the same on the relation-block tokens, with its own queue;
- ``group``: DINO's centered, sharpened soft cross-entropy (:class:`~dino_fast.losses.DINOLoss`,
  the fused op with per-crop pair weights), temperatures and center from ``loss.*``;
  ``loss.centering: sinkhorn_knopp`` replaces the centered teacher softmax by DINOv2's
  Sinkhorn-Knopp targets over the teacher's group logits (the same pair weights; the center then
  stays unused), as the DINO method does;
- ``koleo`` (not in Mugs; only with ``loss.koleo_weight > 0``): DINOv2's KoLeo term on the
  student's global-crop CLS features, one term per student global crop, per rank, as the DINO
  method adds it.

Terms are logged unweighted; the three Mugs terms' trainer weights are the official combination
(the enabled losses added and divided by the sum of their weights,
:func:`dino_fast.losses.mugs.mugs_loss_scales`); KoLeo is added on top with weight
``loss.koleo_weight`` (DINOv2's ``total + koleo_weight x KoLeo``).
After the losses, every queue gets this step's teacher keys (all-gathered: crop 0 then crop 1), the
teacher memory the teacher's first crop's mean patch tokens and the student memory the student's
first global crop's (only for images whose student crops were weakly augmented: with
``mugs.strong_p`` > 0 the trainer's augmentation makes an image's student global crops strong
together, and each local crop independently, RandAugment + RandomErasing). Queues and memories are buffers of the
method (checkpointed, exact resume).

Method state: ``instance_loss.queue(_ptr)``, ``local_group_loss.queue(_ptr)``,
``group_loss.center``, ``student_memory.memory/ptr``, ``teacher_memory.memory/ptr``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from dino_fast.config import TrainConfig
from dino_fast.losses.dino import DINOLoss
from dino_fast.losses.infonce import QueueInfoNCE
from dino_fast.losses.koleo import koleo_loss
from dino_fast.losses.mugs import mugs_crop_weights, mugs_loss_scales
from dino_fast.methods.base import LossTerm, Method, StepOutput, build_backbone, head_collapse_inputs
from dino_fast.methods.registry import register_method
from dino_fast.models.heads import DINOHead
from dino_fast.models.mugs import MugsMemory, MugsNetwork
from dino_fast.utils.distributed import all_gather_rows

__all__ = ["Mugs"]


class _EMAView(nn.Module):
    """The student's EMA-covered part (backbone, relation blocks, heads), sharing its modules, in
    the teacher's parameter order."""

    def __init__(self, net: MugsNetwork) -> None:
        super().__init__()
        self.backbone = net.backbone
        self.relation_blocks = net.relation_blocks
        self.head = net.head


@register_method("mugs")
class Mugs(Method):
    """Mugs from a :class:`TrainConfig` (``model.*``, ``data.*``, ``loss.*`` for the group loss,
    ``mugs.*``; module doc)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        m = cfg.mugs.resolved(cfg.model)
        self.mcfg = m
        self.n_teacher = cfg.data.global_crops_number
        self.ncrops = m.student_global_crops + cfg.data.local_crops_number

        def net(teacher: bool) -> MugsNetwork:
            backbone = build_backbone(cfg, teacher=teacher)
            head = DINOHead(backbone.embed_dim, cfg.model.out_dim, use_bn=cfg.model.use_bn_in_head,
                            norm_last_layer=cfg.model.norm_last_layer, hidden_dim=cfg.model.head_hidden_dim,
                            bottleneck_dim=cfg.model.head_bottleneck_dim)
            return MugsNetwork(backbone, head, proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim,
                               pred_hidden_dim=None if teacher else m.pred_hidden_dim)

        self.student = net(teacher=False)
        self.teacher = net(teacher=True)
        self.teacher.load_state_dict(_EMAView(self.student).state_dict())
        self.teacher.requires_grad_(False)
        dim = self.student.backbone.embed_dim
        weights = mugs_crop_weights(self.ncrops, self.n_teacher)
        self.loss_weights = {"instance": m.instance_weight, "local_group": m.local_group_weight,
                             "group": m.group_weight}
        self.loss_scales = dict(zip(self.loss_weights, mugs_loss_scales(list(self.loss_weights.values()))))
        kw = dict(temperature=m.temperature, ncrops=self.ncrops, n_teacher=self.n_teacher, crop_weights=weights)
        self.instance_loss = QueueInfoNCE(m.proj_dim, m.queue_size, **kw)
        self.local_group_loss = QueueInfoNCE(m.proj_dim, m.queue_size, **kw)
        self.group_loss = DINOLoss(
            cfg.model.out_dim, self.ncrops, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
            cfg.loss.warmup_teacher_temp_epochs, cfg.train.epochs, student_temp=cfg.loss.student_temp,
            center_momentum=cfg.loss.center_momentum, backend=cfg.loss.backend, n_teacher=self.n_teacher,
            async_center=cfg.loss.async_center, crop_weights=weights,
        )
        self.centering = cfg.loss.centering
        self.koleo_weight = float(cfg.loss.koleo_weight)
        self._last_teacher_features: Optional[Tensor] = None
        self.student_memory = MugsMemory(m.memory_size, dim, m.topk, faithful_pointer=m.faithful_pointer)
        self.teacher_memory = MugsMemory(m.memory_size, dim, m.topk, faithful_pointer=m.faithful_pointer)
        self._weak: Optional[Tensor] = None

    @classmethod
    def extra_global_crops(cls, cfg: TrainConfig) -> int:
        """The student's own global crops (``mugs.student_global_crops``, 2)."""
        return cfg.mugs.student_global_crops

    @classmethod
    def strong_augmentation(cls, cfg: TrainConfig) -> tuple[float, int]:
        """``(mugs.strong_p, 2)``: the student's global crops (crops 2, 3) and the local crops."""
        return cfg.mugs.strong_p, cfg.data.global_crops_number

    def set_weak_flags(self, weak: Optional[Tensor]) -> None:
        """The next step's weak flags (only weak images enter the student memory)."""
        self._weak = weak

    def ema_modules(self) -> tuple[nn.Module, nn.Module]:
        """Teacher against the student's backbone, relation block and heads (not the predictors)."""
        return self.teacher, _EMAView(self.student)

    def forward_step(self, crops: Sequence[Tensor], epoch: int, it: int,
                     weak: Optional[Tensor] = None) -> StepOutput:
        """The three Mugs losses of one batch, then the queue and memory writes.

        Args:
            crops: ``n_teacher`` teacher global crops, the student's global crops, then the local
                crops (float ``[B, 3, H, W]`` each).
            weak: optional bool ``[B]``: images whose student global crops were weakly augmented
                (only those enter the student memory); default: the flags the trainer set through
                :meth:`set_weak_flags` for this step, else all.
        """
        if weak is None:
            weak, self._weak = self._weak, None
        nt = self.n_teacher
        ng = self.mcfg.student_global_crops
        if len(crops) != nt + self.ncrops:
            raise ValueError(f"mugs expects {nt} teacher + {ng} student global + "
                             f"{self.ncrops - ng} local crops = {nt + self.ncrops}, got {len(crops)}")
        B = crops[0].shape[0]
        with self.autocast():
            with torch.no_grad():
                t = self.teacher(list(crops[:nt]), self.teacher_memory)
            s = self.student_forward(list(crops[nt:]), self.student_memory)
        terms: dict[str, LossTerm] = {}
        if self.loss_scales["instance"] > 0:
            terms["instance"] = LossTerm(self.instance_loss(s["instance"], t["instance"]), self.loss_scales["instance"])
        if self.loss_scales["local_group"] > 0:
            terms["local_group"] = LossTerm(self.local_group_loss(s["local_group"], t["local_group"]),
                                            self.loss_scales["local_group"])
        if self.loss_scales["group"] > 0:
            if self.centering == "sinkhorn_knopp":  # SK targets, the Mugs pair weights, no center
                group = self.group_loss.sinkhorn_forward(s["group"], t["group"], epoch)
            else:  # the center update follows the loss inside DINOLoss
                group = self.group_loss(s["group"], t["group"], epoch)
            terms["group"] = LossTerm(group, self.loss_scales["group"])
        if self.koleo_weight > 0:  # DINOv2: one KoLeo term per (student) global crop, backbone CLS features
            koleo = sum(koleo_loss(f) for f in s["cls"][: ng * B].chunk(ng))
            terms["koleo"] = LossTerm(koleo, self.koleo_weight)
        self._last_teacher_features = t["cls"]
        self._write_state(t, s, B, weak)
        outputs = {"student_group": (s["group"], B), "teacher_group": (t["group"], B),
                   "student_instance": (s["instance"], B), "student_local_group": (s["local_group"], B)}
        return StepOutput(terms, outputs)

    @torch.no_grad()
    def _write_state(self, t: dict[str, Tensor], s: dict[str, Tensor], B: int, weak: Optional[Tensor]) -> None:
        """Enqueue the teacher keys (gathered crop 0, then gathered crop 1, as the official loop)
        and write both memories (gathered; the weak filter applied after the gather)."""
        for loss, key in ((self.instance_loss, "instance"), (self.local_group_loss, "local_group")):
            z = t[key].detach().float()
            loss.enqueue(torch.cat([all_gather_rows(c.contiguous()) for c in z.chunk(self.n_teacher)]))
        flags = torch.ones(B, dtype=torch.bool, device=s["mean_patch"].device) if weak is None else weak.bool()
        self.student_memory.write(all_gather_rows(s["mean_patch"]),
                                  all_gather_rows(flags.to(torch.uint8)).bool())
        self.teacher_memory.write(all_gather_rows(t["mean_patch"]))

    def collapse_inputs(self, out: StepOutput, epoch: int) -> Optional[dict[str, Any]]:
        """The group head's teacher and student logits, its center (zero, unused, with
        Sinkhorn-Knopp targets) and temperatures, and the teacher's backbone CLS features
        (``[n_teacher*B, D]``, for the feature-collapse checks)."""
        return head_collapse_inputs(out, self.group_loss, epoch, teacher_key="teacher_group",
                                    student_key="student_group", features=self._last_teacher_features)

    def scalars(self, epoch: int, it: int) -> dict[str, float]:
        """The group loss's teacher temperature of ``epoch``."""
        return {"teacher_temp": self.group_loss.teacher_temp_at(epoch)}

"""DINOv2 (Oquab et al. 2023): DINO's CLS loss, the iBOT masked-patch loss and KoLeo, on the
fused ops.

One step (as DINOv2's ``SSLMetaArch.forward_backward``):

- masks: :func:`dino_fast.data.masking.global_crop_masks` for the rank's global crops, a pure
  function of (seed, epoch, batch, sample id, global position), so 2 ranks = 1 process and
  exact resume hold (``dinov2.mask_*``);
- teacher (no gradient): the unmasked global crops through ``forward_features``; its CLS tokens
  through the DINO head, its patch tokens at the masked positions through the iBOT head (or the
  DINO head when ``dinov2.ibot_separate_head`` is false, DINOv2's default);
- student: the **masked** global crops (mask token in place of the masked patch embeddings) and
  the local crops; CLS tokens through the DINO head, the masked patch tokens through the iBOT head;
- ``dino``: :class:`~dino_fast.losses.DINOLoss` over ``2 + L`` student crops against the 2
  teacher crops: every (teacher i, student v != i) pair, ``1 / (2 + 2L)`` each, which is
  DINOv2's ``dino_local_crops_loss + dino_global_crops_loss`` (the global term's
  ``loss_scales = 2`` over its two swapped pairs); weight ``dinov2.dino_loss_weight``;
- ``ibot``: :class:`~dino_fast.losses.iBOTPatchLoss` (per masked crop the mean over its masked
  tokens, averaged over all global crops; DINOv2's ``loss_scales * ibot_loss_scale = 1``); weight
  ``dinov2.ibot_loss_weight``;
- ``koleo``: one KoLeo term per global crop on the student's (masked) global CLS backbone
  features, per rank, summed; weight ``loss.koleo_weight`` (DINOv2: 0.1).

``loss.centering: sinkhorn_knopp`` gives both terms DINOv2's Sinkhorn-Knopp targets (the CLS
rows of both global crops; the masked patch rows of every rank), ``center`` the centered,
sharpened softmax with one EMA center per term. Both terms use the DINO loss's teacher
temperature schedule (per epoch; DINOv2 warms it up per iteration).

Method state: ``dino_loss.center`` and ``ibot_loss.center``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dino_fast.config import ConfigError, TrainConfig
from dino_fast.data.masking import global_crop_masks
from dino_fast.losses.dino import DINOLoss
from dino_fast.losses.ibot import iBOTPatchLoss, masks_weight
from dino_fast.losses.koleo import koleo_loss
from dino_fast.methods.base import LossTerm, Method, StepOutput, build_backbone, head_collapse_inputs
from dino_fast.methods.registry import register_method
from dino_fast.models.heads import DINOHead
from dino_fast.models.multicrop import MultiCropWrapper, group_by_resolution

__all__ = ["DINOv2", "DINOv2Wrapper"]


class DINOv2Wrapper(MultiCropWrapper):
    """Backbone + DINO head (+ optional iBOT head) with DINOv2's forward.

    Keeps :class:`MultiCropWrapper`'s ``backbone`` / ``head`` layout (official keys; the
    trainer exports ``teacher.backbone``); the iBOT head, when separate, is ``ibot_head``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, ibot_head: Optional[nn.Module] = None) -> None:
        super().__init__(backbone, head)
        self.ibot_head = ibot_head

    def forward(  # type: ignore[override]
        self, crops: Sequence[Tensor], masks: Optional[Tensor] = None, *, n_global: int = 2,
        apply_masks: bool = True,
    ) -> dict[str, Tensor]:
        """DINOv2's network pass.

        Args:
            crops: float ``[B, 3, H, W]`` tensors, the ``n_global`` global crops first (one
                resolution), then any local crops.
            masks: bool ``[n_global * B, N]`` (crop-major) or None. With ``apply_masks`` (the
                student) the masked patches of the global crops are replaced by the mask token;
                either way the patch tokens at the masked positions go through the iBOT head.
            n_global: the number of global crops.

        Returns a dict:
            ``cls_logits`` ``[len(crops) * B, K]`` DINO-head logits of every crop's CLS token
            (crop-major); ``cls_features`` ``[len(crops) * B, D]`` their backbone CLS features;
            ``patch_logits`` ``[n_masked, K_ibot]`` head logits of the masked patch tokens in
            ``masks.flatten().nonzero()`` order (absent without masks).
        """
        crops = self._check_crops(list(crops))
        if not 1 <= n_global <= len(crops):
            raise ValueError(f"n_global must be in [1, {len(crops)}], got {n_global}")
        g = torch.cat(crops[:n_global]) if n_global > 1 else crops[0]
        ff = self.backbone.forward_features(g, masks if (apply_masks and masks is not None) else None)
        feats = [ff["x_norm_clstoken"]]
        rest = crops[n_global:]
        for s, e in group_by_resolution(rest):
            batch = rest[s] if e - s == 1 else torch.cat(rest[s:e])
            feats.append(self.backbone(batch))
        cls_features = feats[0] if len(feats) == 1 else torch.cat(feats)
        out: dict[str, Tensor] = {"cls_features": cls_features}
        if masks is None:
            out["cls_logits"] = self.head(cls_features)
            return out
        if masks.dtype != torch.bool or tuple(masks.shape) != tuple(ff["x_norm_patchtokens"].shape[:2]):
            raise ValueError(f"masks must be bool {tuple(ff['x_norm_patchtokens'].shape[:2])}, "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        patches = ff["x_norm_patchtokens"][masks]
        if self.ibot_head is None:  # shared head: one head call over CLS and masked patch rows
            logits = self.head(torch.cat([cls_features, patches]))
            out["cls_logits"], out["patch_logits"] = logits[: cls_features.shape[0]], logits[cls_features.shape[0]:]
        else:
            out["cls_logits"] = self.head(cls_features)
            out["patch_logits"] = self.ibot_head(patches)
        return out


@register_method("dinov2")
class DINOv2(Method):
    """DINOv2 from a :class:`TrainConfig` (``model.*``, ``data.*``, ``loss.*``, ``dinov2.*``)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        d, m = cfg.dinov2, cfg.model
        if cfg.model.fused_multicrop_attention:
            raise ConfigError("model.fused_multicrop_attention is not supported by method dinov2")
        self.n_global = cfg.data.global_crops_number
        ncrops = self.n_global + cfg.data.local_crops_number
        if cfg.data.global_crops_size % m.patch_size:
            raise ConfigError(f"data.global_crops_size={cfg.data.global_crops_size} is not a multiple of "
                              f"model.patch_size={m.patch_size}")
        side = cfg.data.global_crops_size // m.patch_size
        self.grid = (side, side)
        ibot_dim = d.ibot_out_dim or m.out_dim

        def dino_head() -> DINOHead:
            return DINOHead(embed_dim, m.out_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
                            hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim)

        def ibot_head() -> Optional[DINOHead]:
            if not d.ibot_separate_head:
                return None
            return DINOHead(embed_dim, ibot_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
                            hidden_dim=d.ibot_head_hidden_dim or m.head_hidden_dim,
                            bottleneck_dim=d.ibot_head_bottleneck_dim or m.head_bottleneck_dim)

        s_backbone = build_backbone(cfg, teacher=False, mask_token=True)
        t_backbone = build_backbone(cfg, teacher=True, mask_token=True)
        embed_dim = s_backbone.embed_dim
        self.student = DINOv2Wrapper(s_backbone, dino_head(), ibot_head())
        self.teacher = DINOv2Wrapper(t_backbone, dino_head(), ibot_head())
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.centering = cfg.loss.centering
        self.koleo_weight = float(cfg.loss.koleo_weight)
        self.dino_weight = float(d.dino_loss_weight)
        self.ibot_weight = float(d.ibot_loss_weight)
        self._last_teacher_features: Optional[Tensor] = None
        self.dino_loss = DINOLoss(
            m.out_dim, ncrops, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
            cfg.loss.warmup_teacher_temp_epochs, cfg.train.epochs, student_temp=cfg.loss.student_temp,
            center_momentum=cfg.loss.center_momentum, backend=cfg.loss.backend,
            async_center=cfg.loss.async_center, check_finite=False,
        )
        self.ibot_loss = iBOTPatchLoss(ibot_dim, cfg.loss.student_temp, cfg.loss.center_momentum,
                                       centering=cfg.loss.centering, backend=cfg.loss.backend)

    # ------------------------------------------------------------------ masks
    def masks_for(self, B: int, it: int, epoch: int) -> np.ndarray:
        """The step's bool ``[n_global * B, N]`` masks (see :mod:`dino_fast.data.masking`), from
        the trainer's :class:`~dino_fast.methods.base.BatchInfo`; without one (a direct call),
        the batch is taken as samples ``it * B .. it * B + B - 1`` of one process."""
        d = self.cfg.dinov2
        info = self.batch_info
        if info is not None and info.sample_ids is not None:
            ids = np.asarray(info.sample_ids, dtype=np.int64)
            seed, ep, batch, rank, world = info.seed, info.epoch, info.batch, info.rank, info.world_size
        else:
            ids = np.arange(it * B, (it + 1) * B, dtype=np.int64)
            seed, ep, batch, rank, world = self.cfg.train.seed, epoch, it, 0, 1
        if ids.size != B:
            raise ValueError(f"batch info has {ids.size} sample ids for a batch of {B}")
        return global_crop_masks(
            seed=seed, epoch=ep, batch=batch, sample_ids=ids, rank=rank, world_size=world, n_global=self.n_global,
            grid=self.grid, mask_probability=d.mask_sample_probability, ratio_min_max=tuple(d.mask_ratio_min_max),
            max_patches_fraction=d.mask_max_patches_fraction)

    # ------------------------------------------------------------------ step
    def forward_step(self, crops: Sequence[Tensor], epoch: int, it: int) -> StepOutput:
        """DINO, iBOT and KoLeo terms of one batch; see :meth:`Method.forward_step`."""
        B = crops[0].shape[0]
        masks = torch.from_numpy(self.masks_for(B, it, epoch)).to(crops[0].device)
        with self.autocast():
            with torch.no_grad():
                t = self.teacher(crops[: self.n_global], masks, n_global=self.n_global, apply_masks=False)
            s = self.student_forward(crops, masks, n_global=self.n_global, apply_masks=True)
        temp = self.dino_loss.teacher_temp_at(epoch)
        t_cls, s_cls = t["cls_logits"], s["cls_logits"]
        if self.centering == "sinkhorn_knopp":
            dino = self.dino_loss.sinkhorn_forward(s_cls, t_cls, epoch)
        else:
            dino = self.dino_loss(s_cls, t_cls, epoch)
        terms = {"dino": LossTerm(dino, self.dino_weight)}
        ibot = self.ibot_loss(s["patch_logits"], t["patch_logits"], masks_weight(masks), self.n_global * B, temp)
        terms["ibot"] = LossTerm(ibot, self.ibot_weight)
        if self.koleo_weight > 0:  # one KoLeo term per (masked) global crop, on the backbone CLS features
            g = s["cls_features"][: self.n_global * B]
            terms["koleo"] = LossTerm(sum(koleo_loss(f) for f in g.chunk(self.n_global)), self.koleo_weight)
        outputs = {"student_output": (s_cls, B), "teacher_output": (t_cls, B)}
        n_masked = int(s["patch_logits"].shape[0])
        if n_masked:
            outputs["student_patch_output"] = (s["patch_logits"], n_masked)
            outputs["teacher_patch_output"] = (t["patch_logits"], n_masked)
        self._last_teacher_features = t["cls_features"]
        return StepOutput(terms, outputs)

    def collapse_inputs(self, out: StepOutput, epoch: int) -> Optional[dict[str, Any]]:
        """The DINO head's teacher and student CLS outputs, its center and temperatures, and the
        teacher's backbone CLS features (see :meth:`Method.collapse_inputs`)."""
        return head_collapse_inputs(out, self.dino_loss, epoch, features=self._last_teacher_features)

    def scalars(self, epoch: int, it: int) -> dict[str, float]:
        """The teacher temperature of ``epoch`` (both terms use it)."""
        return {"teacher_temp": float(self.dino_loss.teacher_temp_schedule[epoch])}

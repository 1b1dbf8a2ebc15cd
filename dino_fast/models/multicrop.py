"""Multi-crop wrapper: backbone over crops grouped by resolution, one head pass for all.

Semantics of the official ``MultiCropWrapper``: the crops are a list of image batches
``[B, C, H_i, W_i]`` (crop-major: all images' first crop, then all images' second crop, ...);
consecutive crops of the same resolution are concatenated and go through the backbone in one
pass; the features of all crops are concatenated in crop order and go through the head once.
Output ``[len(crops) * B, out_dim]`` with row ``i * B + b`` = crop ``i`` of image ``b``.

With ``fused_attention=True`` (CUDA tensors and xformers only) the backbone runs all crops of
all resolutions through each block at once: tokens of every crop are packed into one sequence
and each block's attention is one ``memory_efficient_attention`` call with a
``BlockDiagonalMask``, so the two resolutions no longer need two passes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def group_by_resolution(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Index ranges ``[(start, end), ...]`` of consecutive crops with the same ``(H, W)``.

    ``[224, 224, 96 x 8]`` -> ``[(0, 2), (2, 10)]``; ``[224, 96, 224]`` -> three groups (the
    official wrapper groups consecutive runs too).
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops (official DINO ``MultiCropWrapper``).

    Args:
        backbone: maps images ``[B, C, H, W]`` to features ``[B, D]`` (its ``fc`` and ``head``
            attributes are replaced by ``nn.Identity``, as the official wrapper does).
        head: maps features ``[n, D]`` to ``[n, out_dim]``.
        fused_attention: run all crops through each attention block in one xformers call with a
            block-diagonal mask; needs a :class:`~dino_fast.models.vit.VisionTransformer` backbone,
            CUDA tensors and xformers (``ValueError`` at forward otherwise).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, fused_attention: bool = False) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module):
            raise TypeError(
                f"backbone and head must be nn.Module, got {type(backbone).__name__} and {type(head).__name__}"
            )
        if fused_attention and not hasattr(backbone, "forward_packed"):
            raise TypeError(
                "fused_attention=True needs a backbone with forward_packed (dino_fast VisionTransformer), "
                f"got {type(backbone).__name__}"
            )
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head
        self.fused_attention = bool(fused_attention)

    def _check_crops(self, x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            x = [x]
        if not isinstance(x, (list, tuple)) or len(x) == 0:
            raise TypeError(f"expected a tensor or a non-empty list of tensors [B, C, H, W], got {type(x).__name__}"
                            + (" (empty)" if isinstance(x, (list, tuple)) else ""))
        for i, t in enumerate(x):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"crop {i} must be a tensor [B, C, H, W], got {got}")
            if t.shape[:2] != x[0].shape[:2]:
                raise ValueError(
                    f"all crops must share batch size and channels; crop 0 is {tuple(x[0].shape)}, "
                    f"crop {i} is {tuple(t.shape)}"
                )
        return list(x)

    def forward(
        self, x: torch.Tensor | Sequence[torch.Tensor], return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Crops (one tensor ``[B, C, H, W]`` or a list of them) -> logits ``[ncrops * B, out_dim]``,
        crop-major; with ``return_features=True`` also the backbone features ``[ncrops * B, D]``
        (same order, the head's input: e.g. for a KoLeo term on the CLS features)."""
        crops = self._check_crops(x)
        groups = group_by_resolution(crops)
        batches = [crops[s] if e - s == 1 else torch.cat(crops[s:e]) for s, e in groups]
        if self.fused_attention:
            backend = self.backbone.resolve_attn_backend(crops[0].device)
            if backend != "xformers":
                raise ValueError(
                    "fused_attention=True runs all crops in one xformers call with a BlockDiagonalMask and needs "
                    f"CUDA tensors with xformers installed; for {crops[0].device.type} tensors and "
                    f"attn_backend={self.backbone.attn_backend!r} the backend is {backend!r}. "
                    "Use fused_attention=False."
                )
            features = self.backbone.forward_packed(batches, backend="xformers")
        else:
            outs = []
            for batch in batches:
                out = self.backbone(batch)
                if isinstance(out, tuple):  # XCiT-style backbones return a tuple
                    out = out[0]
                outs.append(out)
            features = outs[0] if len(outs) == 1 else torch.cat(outs)
        logits = self.head(features)
        return (logits, features) if return_features else logits

"""dino_fast.models: ViT backbones, DINO head and multi-crop wrapper (official DINO layout).

- :func:`vit_tiny`, :func:`vit_small`, :func:`vit_base`, :func:`vit_large` -> :class:`VisionTransformer`
- :class:`DINOHead` (weight-normalised last layer with the official ``weight_g``/``weight_v`` keys)
- :class:`MultiCropWrapper` (crops grouped by resolution; optional one-call xformers attention)
- :func:`create_backbone` / :func:`register_backbone`: the backbone registry (``model.arch``)
- attention backends ``"auto" | "xformers" | "sdpa" | "math"``: :mod:`dino_fast.models.attention`
"""
from .attention import ATTN_BACKENDS, Attention, resolve_attn_backend, xformers_status
from .heads import DINOHead, WeightNormLinear
from .multicrop import MultiCropWrapper, group_by_resolution
from .registry import BACKBONES, backbone_names, create_backbone, register_backbone
from .vit import Block, VisionTransformer, vit_base, vit_large, vit_small, vit_tiny

__all__ = [
    "BACKBONES",
    "backbone_names",
    "create_backbone",
    "register_backbone",
    "ATTN_BACKENDS",
    "Attention",
    "Block",
    "DINOHead",
    "MultiCropWrapper",
    "VisionTransformer",
    "WeightNormLinear",
    "group_by_resolution",
    "resolve_attn_backend",
    "vit_base",
    "vit_large",
    "vit_small",
    "vit_tiny",
    "xformers_status",
]

"""Backbone registry: a name -> constructor table that config validation and the methods read.

A backbone constructor takes ``patch_size``, ``img_size``, ``drop_path_rate``, ``attn_backend``
(and optional architecture keywords such as ``depth``) and returns an ``nn.Module`` with an
``embed_dim`` attribute, ``forward(images) -> [B, embed_dim]`` and
``forward_features(images, masks=None) -> dict`` (see :meth:`VisionTransformer.forward_features`).
Register a new one with :func:`register_backbone` (see docs/DESIGN.md, "Adding a backbone").
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .vit import vit_base, vit_large, vit_small, vit_tiny

__all__ = ["BACKBONES", "register_backbone", "create_backbone", "backbone_names"]

BackboneFactory = Callable[..., nn.Module]
BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``fn`` as backbone ``name`` (a ``model.arch`` value).

    Raises:
        ValueError: ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty str, got {name!r}")

    def deco(fn: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES and BACKBONES[name] is not fn:
            raise ValueError(f"backbone {name!r} is already registered ({BACKBONES[name].__module__})")
        BACKBONES[name] = fn
        return fn

    return deco


def backbone_names() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(BACKBONES)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` with ``kwargs``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    fn = BACKBONES.get(name)
    if fn is None:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(backbone_names())}")
    return fn(**kwargs)


for _name, _fn in (("vit_tiny", vit_tiny), ("vit_small", vit_small), ("vit_base", vit_base),
                  ("vit_large", vit_large)):
    register_backbone(_name)(_fn)

"""dino-fast: fast DINO self-supervised pretraining.

Public API (imported lazily so that ``import dino_fast`` stays cheap and never imports Triton
before a caller had the chance to set ``TRITON_INTERPRET``):

- losses: :class:`DINOLoss` (``dino_fast.losses.dino``), :func:`update_center`
  (``dino_fast.losses.centering``), :func:`koleo_loss` (``dino_fast.losses.koleo``)
- ops: :func:`dino_loss` (``dino_fast.ops.soft_ce``)
- :class:`TeacherEMA`, :func:`ema_update_` (``dino_fast.ops.ema.teacher``)
- :func:`momentum_schedule`, :func:`cosine_scheduler`, :func:`teacher_temp_schedule` (``dino_fast.utils.schedules``)
- models: :func:`vit_tiny`, :func:`vit_small`, :func:`vit_base`, :class:`DINOHead`,
  :class:`MultiCropWrapper` (``dino_fast.models``)
- data: :class:`MultiCropAugment` (``dino_fast.data``)
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DINOLoss": "dino_fast.losses.dino",
    "dino_loss": "dino_fast.ops.soft_ce.function",
    "update_center": "dino_fast.losses.centering",
    "koleo_loss": "dino_fast.losses.koleo",
    "TeacherEMA": "dino_fast.ops.ema.teacher",
    "ema_update_": "dino_fast.ops.ema.teacher",
    "momentum_schedule": "dino_fast.utils.schedules",
    "cosine_scheduler": "dino_fast.utils.schedules",
    "teacher_temp_schedule": "dino_fast.utils.schedules",
    "vit_tiny": "dino_fast.models",
    "vit_small": "dino_fast.models",
    "vit_base": "dino_fast.models",
    "VisionTransformer": "dino_fast.models",
    "DINOHead": "dino_fast.models",
    "MultiCropWrapper": "dino_fast.models",
    "MultiCropAugment": "dino_fast.data",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import public names on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dino_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""dino-fast: fast DINO self-supervised pretraining.

Public API (imported lazily so that ``import dino_fast`` stays cheap and never imports Triton
before a caller had the chance to set ``TRITON_INTERPRET``):

- :class:`DINOLoss`, :func:`dino_loss`, :func:`update_center`, :func:`koleo_loss` (``dino_fast.loss``)
- :class:`TeacherEMA`, :func:`ema_update_` (``dino_fast.ema``)
- :func:`momentum_schedule`, :func:`cosine_scheduler`, :func:`teacher_temp_schedule` (``dino_fast.train.schedules``)
- models: :func:`vit_tiny`, :func:`vit_small`, :func:`vit_base`, :class:`DINOHead`,
  :class:`MultiCropWrapper` (``dino_fast.models``)
- data: :class:`MultiCropAugment` (``dino_fast.data``)
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DINOLoss": "dino_fast.loss",
    "dino_loss": "dino_fast.loss",
    "update_center": "dino_fast.loss",
    "koleo_loss": "dino_fast.loss",
    "TeacherEMA": "dino_fast.ema",
    "ema_update_": "dino_fast.ema",
    "momentum_schedule": "dino_fast.train.schedules",
    "cosine_scheduler": "dino_fast.train.schedules",
    "teacher_temp_schedule": "dino_fast.train.schedules",
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

"""Self-supervised methods: each owns its student, teacher, losses and state.

- :mod:`.base`: the :class:`Method` contract, :class:`LossTerm`, :class:`StepOutput`;
- :mod:`.registry`: ``method.name`` -> class (:func:`build_method`, :func:`register_method`);
- :mod:`.dino`: DINO (Caron et al. 2021), with DINOv2's optional KoLeo term;
- :mod:`.dinov2`: DINOv2 (Oquab et al. 2023): DINO + iBOT masked-patch loss + KoLeo.
"""
from dino_fast.methods.base import BatchInfo, LossTerm, Method, StepOutput, build_backbone
from dino_fast.methods.registry import METHODS, build_method, get_method, method_names, register_method

__all__ = ["BatchInfo", "LossTerm", "METHODS", "Method", "StepOutput", "build_backbone", "build_method", "get_method",
           "method_names", "register_method"]

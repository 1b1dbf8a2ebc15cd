"""Self-supervised methods: each owns its student, teacher, losses and state.

- :mod:`.base`: the :class:`Method` contract, :class:`LossTerm`, :class:`StepOutput`;
- :mod:`.registry`: ``method.name`` -> class (:func:`build_method`, :func:`register_method`);
- :mod:`.dino`: DINO (Caron et al. 2021), with DINOv2's optional KoLeo term.
"""
from dino_fast.methods.base import LossTerm, Method, StepOutput, build_backbone
from dino_fast.methods.registry import METHODS, build_method, get_method, method_names, register_method

__all__ = ["LossTerm", "METHODS", "Method", "StepOutput", "build_backbone", "build_method", "get_method",
           "method_names", "register_method"]

"""Reference gradient clipping: the official DINO ``utils.clip_gradients`` (tests and benchmarks only).

Official ``utils.py``::

    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)

One norm, one host sync and possibly one scale per parameter tensor.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["clip_gradients_reference"]


@torch.no_grad()
def clip_gradients_reference(params: Iterable[torch.Tensor], clip: float) -> list[float]:
    """Per parameter: ``norm = ||grad||_2`` (read to the host with ``.item()``), then
    ``grad *= clip / (norm + 1e-6)`` when that factor is < 1; parameters without a gradient are
    skipped.

    Args:
        params: parameters (any shapes, floating dtypes); their ``.grad`` is scaled in place.
        clip: the per-parameter maximum norm (> 0).

    Returns the norms before clipping (Python floats, one per parameter with a gradient, in order).
    """
    norms = []
    for p in params:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms

"""The Mugs loss weighting (Zhou et al. 2022, official sail-sg/mugs semantics).

Every Mugs loss (instance, local-group, group) averages its (teacher crop t, student crop s != t)
pair terms as ``1/2 (mean over the large pairs + mean over the small pairs)``, a pair being large
when its student crop is a global one (``s < n_teacher``), not uniformly as DINO does.
:func:`mugs_crop_weights` writes that as one weight per student crop, the form the fused DINO-loss
op (``crop_weights=``) and :func:`dino_fast.losses.infonce.queue_infonce_loss` take, so the group
loss runs on the fused DINO kernels. :func:`mugs_total` is the official combination of the three
losses: the enabled losses (weight > 0) are added *unweighted* and divided by the sum of their
weights, so weights ``[1, 1, 2]`` divide the sum by 4 rather than doubling the group loss.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from dino_fast.ops.soft_ce.checks import check_int

__all__ = ["mugs_crop_weights", "mugs_total", "mugs_loss_scales"]


def mugs_crop_weights(ncrops: int, n_teacher: int = 2) -> list[float]:
    """Per-student-crop pair weights of ``1/2 (mean_large + mean_small)``.

    Args:
        ncrops: student crops (``n_teacher`` global + local), ``> n_teacher``.
        n_teacher: teacher crops (2 in Mugs), ``>= 2`` (one teacher crop leaves no large pair).

    Returns:
        ``ncrops`` floats: ``1/(2 n_large)`` for the global crops (``n_large = n_teacher^2 -
        n_teacher`` pairs), ``1/(2 n_small)`` for the local ones (``n_small = n_teacher (ncrops -
        n_teacher)``); with 2 + 10 crops 1/4 and 1/40. They sum over the pairs to 1.
    """
    ncrops = check_int("ncrops", ncrops, 2)
    n_teacher = check_int("n_teacher", n_teacher, 2)
    if ncrops <= n_teacher:
        raise ValueError(f"the Mugs weighting needs local crops: ncrops ({ncrops}) must exceed n_teacher "
                         f"({n_teacher}); the official code divides by zero there")
    n_large = n_teacher * n_teacher - n_teacher
    n_small = n_teacher * (ncrops - n_teacher)
    return [0.5 / n_large] * n_teacher + [0.5 / n_small] * (ncrops - n_teacher)


def mugs_loss_scales(weights: Sequence[float]) -> list[float]:
    """The factor of each loss in :func:`mugs_total`: ``[w > 0] / sum_{w > 0} w`` (the weights of the
    trainer's :class:`~dino_fast.methods.LossTerm` s, so that their weighted sum is the official total)."""
    ws = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in ws) or not any(w > 0 for w in ws):
        raise ValueError(f"loss weights must be finite, >= 0 and not all 0, got {list(weights)}")
    total = sum(w for w in ws if w > 0)
    return [(1.0 / total if w > 0 else 0.0) for w in ws]


def mugs_total(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_{w_i > 0} loss_i / sum_{w_i > 0} w_i`` (the official ``main.py`` combination).

    Args:
        losses: 0-dim tensors; weights: one finite float >= 0 per loss, not all 0.
    """
    if len(losses) != len(weights):
        raise ValueError(f"expected one weight per loss, got {len(losses)} losses and {len(weights)} weights")
    scales = mugs_loss_scales(weights)
    terms = [v * s for v, s in zip(losses, scales) if s > 0]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out

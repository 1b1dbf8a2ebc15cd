"""KoLeo regulariser (DINOv2; Sablayrolles et al. 2019) on a batch of features."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["koleo_loss"]


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo regulariser (DINOv2; Sablayrolles et al. 2019): ``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)``.

    Args:
        features: ``[N, D]`` float (any float dtype; computed in fp32, or fp64 for fp64 input),
            N >= 2; rows are L2-normalised here first. Per rank: the nearest neighbour is
            searched within this tensor only, as DINOv2 does.
        eps: added to the distance (and the normalisation's norm) so identical rows give a finite
            loss (``-log(eps)``) instead of infinity.

    Returns:
        scalar fp32 (fp64 for fp64 input). Differentiable in ``features``; the neighbour choice
        is not (arg-max under no_grad).

    Raises:
        ValueError: ``features`` is not 2-D with N >= 2 rows, or not floating point.
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] < 2:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"koleo_loss expects features [N, D] with N >= 2, got {got}")
    if not features.is_floating_point():
        raise ValueError(f"koleo_loss expects floating-point features, got {features.dtype}")
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    with torch.autocast(features.device.type, enabled=False):
        x = nn.functional.normalize(features.to(dtype), p=2.0, dim=1, eps=eps)
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
            nn_index = sim.argmax(dim=1)
        dist_nn = (x - x[nn_index]).norm(dim=1)
        return -torch.log(dist_nn + eps).mean()


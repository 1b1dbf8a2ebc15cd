"""Image statistics every pipeline normalises with (ImageNet mean and std, RGB, in [0, 1] units)
and the luma weights every grey conversion uses."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LUMA_WEIGHTS", "normalized_to_grayscale"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as PIL's convert('L')
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


def normalized_to_grayscale(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The grey version of normalised RGB images, normalised again.

    ``x`` is ``[B, 3, H, W]`` floating point, ``(img - mean) / std`` per channel for an RGB image
    ``img`` in [0, 1]. Returns a tensor of the same shape and dtype holding ``(L - mean) / std``
    per channel, ``L = LUMA_WEIGHTS . img`` (the same luma in all three channels): what
    normalising the grey image would have given. One affine map per pixel, no clamping.

    Raises:
        ValueError: ``x`` is not ``[B, 3, H, W]`` floating point, or ``mean``/``std`` do not hold
            three values (``std`` positive).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected floating-point normalised RGB images [B, 3, H, W], got {got}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std must hold 3 values (std > 0), got {tuple(mean)!r} and {tuple(std)!r}")
    # L = sum_c w_c (std_c x_c + mean_c) = sum_c (w_c std_c) x_c + (w . mean); Python scalars
    # only, so no constant tensor is made (or copied to the device) on every forward
    a = [w * sd for w, sd in zip(LUMA_WEIGHTS, std)]
    luma = x[:, 0:1] * a[0] + x[:, 1:2] * a[1] + x[:, 2:3] * a[2] + sum(w * m for w, m in zip(LUMA_WEIGHTS, mean))
    return torch.cat([(luma - m) / sd for m, sd in zip(mean, std)], dim=1)

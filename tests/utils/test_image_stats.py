"""normalized_to_grayscale against the grey image normalised directly (float64), and its errors."""
from __future__ import annotations

import pytest
import torch

from dino_fast.data.augment import rgb_to_grayscale
from dino_fast.utils.image_stats import IMAGENET_MEAN, IMAGENET_STD, normalized_to_grayscale


def _norm(img: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(IMAGENET_MEAN, dtype=img.dtype).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD, dtype=img.dtype).view(1, 3, 1, 1)
    return (img - m) / s


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 8, 8), (3, 3, 5, 7)])
def test_matches_normalising_the_grey_image(shape):
    g = torch.Generator().manual_seed(sum(shape))
    img = torch.rand(shape, dtype=torch.float64, generator=g)
    grey = rgb_to_grayscale(img).expand(-1, 3, -1, -1)  # the augmentation's luma, the same in 3 channels
    out = normalized_to_grayscale(_norm(img))
    assert out.dtype == torch.float64 and out.shape == img.shape
    torch.testing.assert_close(out, _norm(grey), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_keeps_the_dtype(dtype, atol):
    img = torch.rand(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = normalized_to_grayscale(_norm(img))
    got = normalized_to_grayscale(_norm(img).to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


def test_a_grey_image_is_a_fixed_point_and_colour_is_lost():
    img = torch.rand(1, 1, 4, 4, dtype=torch.float64).expand(-1, 3, -1, -1)
    torch.testing.assert_close(normalized_to_grayscale(_norm(img)), _norm(img), rtol=0, atol=1e-12)
    red = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    red[:, 0] = 1.0
    out = normalized_to_grayscale(_norm(red))
    lum = torch.full((1, 3, 2, 2), 0.299, dtype=torch.float64)
    torch.testing.assert_close(out, _norm(lum), rtol=0, atol=1e-12)


def test_bad_input_says_what_was_expected():
    with pytest.raises(ValueError, match=r"normalised RGB images \[B, 3, H, W\], got torch.float32 \(2, 1, 4, 4\)"):
        normalized_to_grayscale(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="got torch.int64"):
        normalized_to_grayscale(torch.zeros(1, 3, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="got list"):
        normalized_to_grayscale([0.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="std > 0"):
        normalized_to_grayscale(torch.zeros(1, 3, 2, 2), std=(0.2, 0.0, 0.2))

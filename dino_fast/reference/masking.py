"""DINOv2's mask generation restated op by op (tests only): its block ``MaskingGenerator`` and
the mask part of its ``collate_data_and_cast``, drawing from an ``rng`` with the interface of
Python's :mod:`random` (``uniform(a, b)``, ``randint(a, b)`` inclusive, ``shuffle(list)``), as
the official code draws from the global ``random`` module.

- ``mask_generator_reference(rng, H, W, n)``: rectangles of area ``uniform(min_num_patches,
  max_left)``, aspect ``exp(uniform(log(min_aspect), log(1/min_aspect)))``, ``h = round(sqrt(area *
  aspect))``, ``w = round(sqrt(area / aspect))``; when ``w < W`` and ``h < H``, placed at
  ``randint(0, H - h)``, ``randint(0, W - w)`` and taken when it adds between 1 and ``max_left``
  new patches; up to 10 tries per block, stop at the target or when a block adds nothing.
- ``collate_masks_reference(rng, n_crops, H, W)``: ``int(n_crops * p)`` masks with stratified
  ratios ``uniform(probs[i], probs[i+1])``, ``probs = linspace(lo, hi, n + 1)``, target
  ``int(N * r)``, the rest empty, then shuffled; returns the ``[n_crops, N]`` masks, the flat
  masked indices, the per-token weights ``1 / #masked(crop)`` and the ``upperbound``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["mask_generator_reference", "collate_masks_reference"]


def mask_generator_reference(rng: Any, height: int, width: int, num_masking_patches: int,
                             min_num_patches: int = 4, max_num_patches: Any = None,
                             min_aspect: float = 0.3) -> np.ndarray:
    """One block mask, bool ``[height, width]`` (DINOv2's ``MaskingGenerator.__call__``)."""
    max_num = num_masking_patches if max_num_patches is None else max_num_patches
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)
    mask_count = 0
    while mask_count < num_masking_patches:
        max_mask_patches = min(num_masking_patches - mask_count, max_num)
        delta = 0
        for _attempt in range(10):
            target_area = rng.uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = 0
                for i in range(top, top + h):
                    for j in range(left, left + w):
                        num_masked += int(mask[i, j])
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
                if delta > 0:
                    break
        if delta == 0:
            break
        mask_count += delta
    return mask


def collate_masks_reference(rng: Any, n_crops: int, height: int, width: int,
                            mask_ratio_tuple: tuple[float, float] = (0.1, 0.5), mask_probability: float = 0.5,
                            max_patches_fraction: float = 0.5) -> dict[str, Any]:
    """The mask outputs of DINOv2's collate for ``n_crops`` global crops on an ``H x W`` grid."""
    N = height * width
    n_samples_masked = int(n_crops * mask_probability)
    probs = np.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    upperbound = 0
    masks = []
    max_num = int(max_patches_fraction * N)
    for i in range(n_samples_masked):
        prob_min, prob_max = float(probs[i]), float(probs[i + 1])
        target = int(N * rng.uniform(prob_min, prob_max))
        masks.append(mask_generator_reference(rng, height, width, target, max_num_patches=max_num))
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, n_crops):
        masks.append(mask_generator_reference(rng, height, width, 0, max_num_patches=max_num))
    rng.shuffle(masks)
    collated = np.stack(masks).reshape(n_crops, N)
    counts = collated.sum(-1)
    weights = np.repeat(1.0 / np.maximum(counts, 1), N).reshape(n_crops, N)[collated]
    return {"masks": collated, "mask_indices": np.flatnonzero(collated), "masks_weight": weights,
            "upperbound": upperbound, "n_masked_patches": int(collated.sum())}

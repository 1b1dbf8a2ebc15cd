"""Crop sizes from the data: the small-image rule of the small-data recipe (``data.auto_crops``).

A folder of small images (a median shorter side below the configured global crop, e.g. 32 px
digits against 64 px crops) gains nothing from crops larger than the images: they only upsample.
For such a folder :func:`dino_fast.config.apply_auto_crops` switches to 48 px global crops, scales the local crops
alike, spends the saved compute on more iterations (x5/3: a 48/24 px step takes about 0.55x the
time of a 64/32 px one on 2 CPU cores, so the run takes about 0.93x the time) and evaluates at the size at which objects look as large
as in the training crops. Larger images keep the configured sizes. docs/NOTEBOOK.md ("Issue 17")
has the measurements behind the constants.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from PIL import Image

from dino_fast.data.folder import list_image_files

__all__ = ["SMALL_GLOBAL_CROP", "SMALL_ITERATION_SCALE", "median_image_side", "eval_size_for_crops"]

SMALL_GLOBAL_CROP: int = 48
SMALL_ITERATION_SCALE: float = 5 / 3


def median_image_side(root: str | Path, max_images: int = 256) -> Optional[int]:
    """The median shorter side in pixels of up to ``max_images`` images of an image folder.

    ``root`` is a folder of images, in class subfolders or flat; the images are the files the
    training loader reads (:func:`~dino_fast.data.folder.list_image_files`), taken at an even
    stride (deterministic), and only their headers are read. Returns ``None`` when the folder
    holds no image PIL can open.
    """
    files = [p for p, _ in list_image_files(root)[1]]
    if not files:
        return None
    stride = max(1, len(files) // max_images)
    sides = []
    for p in files[::stride][:max_images]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except (OSError, ValueError):
            continue
    if not sides:
        return None
    sides.sort()
    return int(sides[len(sides) // 2])


def eval_size_for_crops(global_crops_size: int, global_crops_scale: tuple[float, float],
                        patch_size: int) -> tuple[int, int]:
    """(eval image size, eval resize size) at which a whole image shows objects as large as a
    global crop did in training.

    A crop of area fraction ``s ~ U(lo, hi)`` covers ``sqrt(s)`` of the image side, on average
    ``E[sqrt(s)] = 2/3 (hi^1.5 - lo^1.5) / (hi - lo)`` (0.83 for DINO's (0.4, 1)), so the image is
    seen at ``global_crops_size / E[sqrt(s)]`` px. That, rounded to a multiple of ``patch_size``, is
    the center crop; the resize is 9/8 of it (the usual 0.875-0.89 crop ratio). FixRes (Touvron
    et al. 2019) on the train-test resolution discrepancy.
    """
    lo, hi = float(global_crops_scale[0]), float(global_crops_scale[1])
    mean_side = math.sqrt(lo) if hi - lo < 1e-9 else 2.0 / 3.0 * (hi ** 1.5 - lo ** 1.5) / (hi - lo)
    size = max(patch_size, int(round(global_crops_size / mean_side / patch_size)) * patch_size)
    return size, int(round(size * 9 / 8))

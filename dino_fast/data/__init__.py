"""Multi-crop data for DINO: crop sampler, loaders (FFCV decode-once and PIL fallback), batched
photometric augmentation, evaluation loader, FFCV writer and the built-in dataset.

Submodules ``builtin`` and ``ffcv_writer`` (and the FFCV backend) are imported on demand.
"""
from __future__ import annotations

from .augment import MultiCropAugment, PhotometricParams
from .crops import CropSpec, crop_box, crop_boxes
from .folder import FolderScan, ImageRecord, load_rgb, scan_image_folder
from .loader import (
    EvalImageFolder,
    MultiCropConfig,
    MultiCropLoader,
    build_eval_loader,
    build_multicrop_loader,
    epoch_order,
    ffcv_available,
    shard_indices,
)

__all__ = [
    "MultiCropAugment",
    "PhotometricParams",
    "CropSpec",
    "crop_box",
    "crop_boxes",
    "FolderScan",
    "ImageRecord",
    "load_rgb",
    "scan_image_folder",
    "EvalImageFolder",
    "MultiCropConfig",
    "MultiCropLoader",
    "build_eval_loader",
    "build_multicrop_loader",
    "epoch_order",
    "ffcv_available",
    "shard_indices",
]

"""What the multi-crop loader and its backends share: the config, the batch type, the backend
interface (so that :mod:`dino_fast.data.loader` and :mod:`dino_fast.data.ffcv_loader` do not import
each other)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from .crops import CropSpec

__all__ = ["Batch", "LoaderBackend", "MultiCropConfig"]

Batch = tuple[torch.Tensor, ...]


@dataclass
class MultiCropConfig:
    """Configuration of the multi-crop training loader (per rank).

    Attributes:
        root: an image folder (ImageFolder convention) or an FFCV ``.beton`` file.
        backend: ``"auto"`` (FFCV when ``root`` is a .beton file and FFCV imports, else the
            folder loader), ``"ffcv"`` or ``"folder"``.
        global_crops_number, global_crops_size, global_crops_scale: the global crops.
        local_crops_number, local_crops_size, local_crops_scale: the local crops.
        batch_size: samples per batch on this rank.
        num_workers: decoding workers (processes for the folder loader, threads for FFCV),
            clamped to the cores available.
        seed: seed of the order and of the crop boxes.
        drop_last: drop the last incomplete batch (and cut the order to a multiple of the world
            size so that every rank runs the same number of batches).
    """

    root: str
    backend: Literal["auto", "ffcv", "folder"] = "auto"
    global_crops_number: int = 2
    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    batch_size: int = 64
    num_workers: int = 4
    seed: int = 0
    drop_last: bool = True

    def crop_spec(self) -> CropSpec:
        """The crop geometry as a validated :class:`CropSpec`."""
        return CropSpec(
            global_number=int(self.global_crops_number),
            global_size=int(self.global_crops_size),
            global_scale=tuple(self.global_crops_scale),  # type: ignore[arg-type]
            local_number=int(self.local_crops_number),
            local_size=int(self.local_crops_size),
            local_scale=tuple(self.local_crops_scale),  # type: ignore[arg-type]
        )

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first field that is out of range."""
        if not isinstance(self.root, (str, os.PathLike)):
            raise TypeError(f"root must be a path string, got {type(self.root).__name__}")
        if self.backend not in ("auto", "ffcv", "folder"):
            raise ValueError(f"backend must be 'auto', 'ffcv' or 'folder', got {self.backend!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        self.crop_spec()


class LoaderBackend:
    """Interface of a loader backend: ``n``, ``classes`` and ``iterate(epoch, batches)``."""

    name: str
    n: int
    classes: list[str]

    def iterate(self, epoch: int, batches: Sequence[np.ndarray]) -> Iterator[Batch]:  # pragma: no cover
        """Yield one :data:`Batch` per entry of ``batches`` (integer ``[B]`` arrays of dataset
        indices, in order): uint8 global crops ``[B, G, 3, Gs, Gs]``, uint8 local crops
        ``[B, L, 3, Ls, Ls]``, int64 labels ``[B]`` and int64 crop boxes ``[B, G + L, 4]``. The
        crops are a function of (loader seed, ``epoch``, sample index, crop), so a resumed epoch
        yields the same bytes."""
        raise NotImplementedError



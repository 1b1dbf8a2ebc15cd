"""Multi-crop loaders: one config, two backends (FFCV decode-once, PIL fallback), exact resume.

Every batch is a pure function of ``(seed, epoch, batch index, rank, world_size)``:

- the epoch's order is ``numpy.random.default_rng([seed, epoch, 0x5EED]).permutation(N)``;
- rank ``r`` of ``W`` takes ``order[r::W]`` (with ``drop_last`` the order is first cut to a
  multiple of ``W`` so every rank gets the same number of samples; without it the shards are
  disjoint and cover the set, and the first ``N % W`` ranks get one more sample);
- batch ``b`` is ``shard[b*B:(b+1)*B]``;
- crop ``c`` of sample ``i`` uses the box ``crop_box(..., seed, epoch, i, c)``
  (:mod:`dino_fast.data.crops`), whichever backend, worker count or thread decodes it.

So ``set_epoch(e)`` followed by iteration replays the same batches, and
``iter_from(k)`` / ``set_epoch(e, start_batch=k)`` resumes at batch ``k`` without decoding
batches ``0..k-1``.

Batches are ``(global_crops, local_crops, labels)``: uint8 ``[B, G, 3, Gs, Gs]``, uint8
``[B, L, 3, Ls, Ls]``, int64 ``[B]`` (plus int64 boxes ``[B, G+L, 4]`` rows
``(top, left, h, w)`` in decoded-image pixels when ``return_boxes=True``). The photometric
part of the augmentation runs afterwards, batched, on the training device
(:class:`dino_fast.data.augment.MultiCropAugment`).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dino_fast.utils.image_stats import IMAGENET_MEAN, IMAGENET_STD

from .base import Batch, LoaderBackend, MultiCropConfig
from .crops import CropSpec, crop_boxes
from .folder import FolderScan, available_cores, decode_rgb, format_report, scan_image_folder

__all__ = [
    "MultiCropConfig",
    "MultiCropLoader",
    "build_multicrop_loader",
    "build_eval_loader",
    "EvalImageFolder",
    "epoch_order",
    "shard_indices",
    "ffcv_available",
]




def ffcv_available() -> tuple[bool, str]:
    """(True, "") when FFCV imports, else (False, the reason)."""
    try:
        import ffcv  # noqa: F401
        from ffcv.loader import Loader  # noqa: F401
    except Exception as e:  # ImportError, or a broken native extension (OSError)
        return False, f"FFCV is not importable ({type(e).__name__}: {e})"
    return True, ""


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of ``range(n)`` (int64 [n]), a pure function of (seed, epoch)."""
    if n < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"n, seed and epoch must be >= 0, got {n}, {seed}, {epoch}")
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n).astype(np.int64)


def shard_indices(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """This rank's part of an epoch order (int64 [n_rank]); see the module doc."""
    if world_size < 1 or not (0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if drop_last:
        order = order[: (len(order) // world_size) * world_size]
    return np.ascontiguousarray(order[rank::world_size])


class MultiCropLoader:
    """Iterable of multi-crop batches (see the module doc for the layout and determinism).

    Built by :func:`build_multicrop_loader`. ``len(loader)`` is the number of batches per epoch
    on this rank; :meth:`set_epoch` selects the epoch (and optionally the first batch);
    :meth:`iter_from` iterates from a given batch.
    """

    def __init__(
        self,
        backend: "LoaderBackend",
        cfg: MultiCropConfig,
        *,
        rank: int,
        world_size: int,
        return_boxes: bool = False,
    ) -> None:
        self._backend = backend
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.return_boxes = return_boxes
        self.epoch = 0
        self.start_batch = 0

    # -- properties ---------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"ffcv"`` or ``"folder"``."""
        return self._backend.name

    @property
    def classes(self) -> list[str]:
        """Class names (index = label)."""
        return list(self._backend.classes)

    @property
    def dataset_size(self) -> int:
        """Number of images in the whole dataset (all ranks)."""
        return self._backend.n

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before ``drop_last`` drops a partial batch)."""
        n = self._backend.n
        if self.cfg.drop_last:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        b = self.cfg.batch_size
        n = self.num_samples
        return n // b if self.cfg.drop_last else -(-n // b)

    # -- epochs -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose batches the next iteration yields, starting at ``start_batch``."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._check_start(start_batch)
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _check_start(self, start_batch: int) -> None:
        if not isinstance(start_batch, (int, np.integer)) or not (0 <= start_batch <= len(self)):
            raise ValueError(f"start_batch must be an int in [0, {len(self)}], got {start_batch!r}")

    def batch_indices(self, epoch: Optional[int] = None) -> list[np.ndarray]:
        """Dataset indices of every batch of ``epoch`` (default: the current one) on this rank."""
        e = self.epoch if epoch is None else int(epoch)
        shard = shard_indices(epoch_order(self._backend.n, self.cfg.seed, e), self.rank, self.world_size, self.cfg.drop_last)
        b = self.cfg.batch_size
        return [shard[i * b : (i + 1) * b] for i in range(len(self))]

    def iter_from(self, batch_index: int) -> Iterator[Batch]:
        """Iterate the current epoch from batch ``batch_index`` (earlier batches are not decoded)."""
        self._check_start(batch_index)
        batches = self.batch_indices()[batch_index:]
        it = iter(self._backend.iterate(self.epoch, batches))
        fault = os.environ.get("DINO_FAST_FAULT")  # test-only, see dino_fast.utils.checkpoint
        k = batch_index
        while True:
            if fault:
                from dino_fast.utils.faults import fault_point

                fault_point("data_loading", self.epoch * len(self) + k)
            try:
                out = next(it)
            except StopIteration:
                return
            k += 1
            yield out if self.return_boxes else out[:3]

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(self.start_batch)

    def __repr__(self) -> str:
        return (
            f"MultiCropLoader(backend={self.backend!r}, root={self.cfg.root!r}, images={self.dataset_size}, "
            f"batches={len(self)}, batch_size={self.cfg.batch_size}, rank={self.rank}/{self.world_size}, "
            f"epoch={self.epoch})"
        )


# --------------------------------------------------------------------------------------------
# Folder (PIL) backend
# --------------------------------------------------------------------------------------------
def decode_multicrop(
    path: str, spec: CropSpec, *, seed: int, epoch: int, sample: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image once and cut all its crops (PIL, bicubic, like RandomResizedCrop).

    The boxes are drawn on the file's size. A JPEG at least twice
    :meth:`CropSpec.decode_min_side` on its shorter side is decoded at a reduced DCT scale
    (:func:`dino_fast.data.folder.decode_rgb`) and the same boxes, scaled to it, are cut there.

    Returns ``(global uint8 [G,3,Gs,Gs], local uint8 [L,3,Ls,Ls], boxes int64 [G+L,4])`` (boxes
    ``(top, left, h, w)`` in the file's pixels).
    """
    img, (height, width) = decode_rgb(path, spec.decode_min_side())
    boxes = crop_boxes(spec, height, width, seed=seed, epoch=epoch, sample=sample)
    sy, sx = img.height / height, img.width / width
    g = np.empty((spec.global_number, 3, spec.global_size, spec.global_size), dtype=np.uint8)
    loc = np.empty((spec.local_number, 3, spec.local_size, spec.local_size), dtype=np.uint8)
    for c in range(spec.n_crops):
        top, left, h, w = (int(v) for v in boxes[c])
        s = spec.size_of(c)
        box = ((left, top, left + w, top + h) if img.size == (width, height)
               else (left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        crop = img.resize((s, s), Image.BICUBIC, box=box)
        arr = np.asarray(crop).transpose(2, 0, 1)
        if c < spec.global_number:
            g[c] = arr
        else:
            loc[c - spec.global_number] = arr
    return g, loc, boxes


class _FolderBatches(Dataset):
    """Map-style dataset whose items are whole batches: job ``(epoch, indices)`` -> tensors."""

    def __init__(self, scan: FolderScan, spec: CropSpec, seed: int) -> None:
        self.paths = [r.path for r in scan.records]
        self.labels = np.asarray(scan.labels, dtype=np.int64)
        self.spec = spec
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, job: tuple[int, np.ndarray]) -> Batch:
        epoch, idx = job
        spec = self.spec
        n = len(idx)
        g = torch.empty((n, spec.global_number, 3, spec.global_size, spec.global_size), dtype=torch.uint8)
        loc = torch.empty((n, spec.local_number, 3, spec.local_size, spec.local_size), dtype=torch.uint8)
        boxes = torch.empty((n, spec.n_crops, 4), dtype=torch.int64)
        gn, ln, bn = g.numpy(), loc.numpy(), boxes.numpy()
        for j, i in enumerate(idx):
            gn[j], ln[j], bn[j] = decode_multicrop(self.paths[int(i)], spec, seed=self.seed, epoch=epoch, sample=int(i))
        labels = torch.from_numpy(self.labels[np.asarray(idx, dtype=np.int64)])
        return g, loc, labels, boxes


class _Jobs:
    """The sampler of the folder backend's persistent DataLoader: iterates whatever job list
    (``(epoch, indices)`` pairs) :meth:`_FolderBackend.iterate` set last."""

    def __init__(self) -> None:
        self.jobs: list[tuple[int, np.ndarray]] = []

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return iter(list(self.jobs))

    def __len__(self) -> int:
        return len(self.jobs)


class _FolderBackend(LoaderBackend):
    """PIL decoding in ``num_workers`` worker processes that live for the whole run: one
    DataLoader with persistent workers whose sampler is swapped per epoch. (A DataLoader per epoch
    forks its workers again at every epoch start, and the fresh workers' start and first batches
    ran beside the training step's threads: the first step of each epoch took 3.5x a normal one
    on 2 cores.)"""

    name = "folder"

    def __init__(self, cfg: MultiCropConfig, scan: FolderScan) -> None:
        self.scan = scan
        self.n = len(scan.records)
        self.classes = scan.classes
        self.dataset = _FolderBatches(scan, cfg.crop_spec(), cfg.seed)
        self.num_workers = min(cfg.num_workers, available_cores())
        self._jobs = _Jobs()
        self._dl: Optional[DataLoader] = None

    def iterate(self, epoch: int, batches: Sequence[np.ndarray]) -> Iterator[Batch]:
        jobs = [(epoch, b) for b in batches]
        if not jobs:
            return
        if self.num_workers == 0:
            for job in jobs:
                yield self.dataset[job]
            return
        if self._dl is None:
            self._dl = DataLoader(self.dataset, batch_size=None, sampler=self._jobs,
                                  num_workers=self.num_workers, prefetch_factor=2, persistent_workers=True)
        # The sampler is read when the iterator (re)starts. A DataLoader with persistent workers
        # has one iterator: a new iterate() resets it (the batches still in flight for an
        # abandoned epoch are discarded by torch), so only the newest generator may be consumed.
        self._jobs.jobs = jobs
        yield from iter(self._dl)


# --------------------------------------------------------------------------------------------
def build_multicrop_loader(
    cfg: MultiCropConfig, *, rank: int = 0, world_size: int = 1, return_boxes: bool = False
) -> MultiCropLoader:
    """Build the multi-crop training loader described by ``cfg`` for one rank.

    Args:
        cfg: the configuration (:class:`MultiCropConfig`).
        rank, world_size: this process's place in the data-parallel group.
        return_boxes: also yield the crop boxes (int64 [B, G+L, 4]), for tests and debugging.

    Raises:
        ValueError/TypeError: a config field out of range.
        FileNotFoundError: ``root`` does not exist.
        RuntimeError: FFCV was required (``backend="ffcv"`` or a .beton root) but does not import.
    """
    if not isinstance(cfg, MultiCropConfig):
        raise TypeError(f"cfg must be a MultiCropConfig, got {type(cfg).__name__}")
    cfg.validate()
    if not isinstance(rank, int) or not isinstance(world_size, int) or world_size < 1 or not (0 <= rank < world_size):
        raise ValueError(f"need ints 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    root = os.fspath(cfg.root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"data root {root!r} does not exist")
    is_beton = os.path.isfile(root) and root.endswith(".beton")
    backend = cfg.backend
    if backend == "auto":
        backend = "ffcv" if is_beton and ffcv_available()[0] else "folder"
    if backend == "ffcv":
        ok, why = ffcv_available()
        if not ok:
            raise RuntimeError(f"backend 'ffcv' needs FFCV: {why}; install it with pip install 'dino-fast[ffcv]'")
        if not is_beton:
            raise ValueError(
                f"backend 'ffcv' needs a .beton file as root, got {root!r}; "
                "write one with: dino-fast write-beton IMAGE_DIR OUT.beton"
            )
        from .ffcv_loader import FFCVBackend

        impl: LoaderBackend = FFCVBackend(cfg)
    else:
        if is_beton:
            raise RuntimeError(f"{root!r} is an FFCV file but FFCV is not usable: {ffcv_available()[1]}")
        scan = scan_image_folder(root, num_workers=max(1, min(cfg.num_workers, available_cores())))
        report = format_report(scan.skipped, scan.converted, limit=10)
        if scan.skipped:
            import warnings

            warnings.warn(f"image folder {root!r}: {report}", stacklevel=2)
        impl = _FolderBackend(cfg, scan)
    return MultiCropLoader(impl, cfg, rank=rank, world_size=world_size, return_boxes=return_boxes)


# --------------------------------------------------------------------------------------------
# Evaluation loader
# --------------------------------------------------------------------------------------------
class EvalImageFolder(Dataset):
    """Fixed-order evaluation dataset: resize shorter side, centre crop, normalise.

    Items are ``(image float32 [3, S, S] normalised with ImageNet statistics, label int)``.
    """

    def __init__(self, root: str | os.PathLike, *, image_size: int = 224, resize_size: Optional[int] = None, num_workers: int = 2) -> None:
        sizes = self._sizes(image_size, resize_size)  # before a scan of the whole folder
        self.scan = scan_image_folder(root, num_workers=num_workers)
        self._set(self.scan.classes, [(r.path, r.label) for r in self.scan.records], *sizes)

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[str, int]], classes: Sequence[str], *, image_size: int = 224,
                     resize_size: Optional[int] = None) -> "EvalImageFolder":
        """The same dataset over given ``(path, label)`` pairs, which are not validated (e.g. an
        even sample of :func:`~dino_fast.data.folder.list_image_files`, to time the evaluation
        without scanning a whole folder); ``scan`` is ``None``."""
        ds = cls.__new__(cls)
        ds.scan = None
        ds._set(list(classes), [(str(p), int(lab)) for p, lab in samples], *cls._sizes(image_size, resize_size))
        return ds

    @staticmethod
    def _sizes(image_size: int, resize_size: Optional[int]) -> tuple[int, int]:
        """``(image_size, resize_size)`` checked, the resize defaulting to ``round(S * 256 / 224)``."""
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        if resize_size is None:
            resize_size = int(round(image_size * 256 / 224))
        if not isinstance(resize_size, int) or resize_size < image_size:
            raise ValueError(f"resize_size must be an int >= image_size ({image_size}), got {resize_size!r}")
        return image_size, resize_size

    def _set(self, classes: list[str], samples: list[tuple[str, int]], image_size: int, resize_size: int) -> None:
        self.classes = classes
        self.samples = samples
        self.targets = [lab for _, lab in self.samples]
        self.image_size = image_size
        self.resize_size = resize_size
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        # a large JPEG decodes at a reduced DCT scale, at least 4x the resize on its shorter side
        # (as close to a full decode as the training crops' 2x of their smallest crop); the
        # resize and the crop are computed on the file's size, as for a full decode
        img, (h, w) = decode_rgb(path, 4 * self.resize_size)
        r = self.resize_size
        if w <= h:
            size = (r, int(r * h / w))
        else:
            size = (int(r * w / h), r)
        img = img.resize(size, Image.BICUBIC)
        s = self.image_size
        top = int(round((size[1] - s) / 2.0))
        left = int(round((size[0] - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std, label


def build_eval_loader(
    root: str | os.PathLike,
    *,
    image_size: int = 224,
    resize_size: Optional[int] = None,
    batch_size: int = 64,
    num_workers: int = 2,
) -> DataLoader:
    """Fixed-order loader for k-NN / linear evaluation.

    Yields ``(images float32 [B, 3, S, S] normalised, labels int64 [B])``: each image's shorter
    side resized to ``resize_size`` (default ``round(S * 256 / 224)``, bicubic), then the centre
    ``S x S`` crop. ``loader.dataset.classes`` lists the class names.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    workers = min(num_workers, available_cores())
    ds = EvalImageFolder(root, image_size=image_size, resize_size=resize_size, num_workers=max(1, workers))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=False)


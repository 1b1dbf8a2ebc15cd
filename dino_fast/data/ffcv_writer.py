"""Write an image folder to an FFCV ``.beton`` file (``dino-fast write-beton``).

Fields: ``image`` (FFCV ``RGBImageField``, JPEG, longer side at most ``max_resolution``) and
``label`` (``IntField``; ImageFolder convention, a flat folder gets label 0). The class names are
written next to the file as ``OUT.beton.json``.

Every image is validated (decoded) in this process before FFCV's writer starts, because a
worker of FFCV's writer that raises makes the writer hang instead of failing: zero-byte files,
non-images and corrupt images are listed, skipped and counted; grayscale, RGBA, palette and CMYK
images are converted to RGB and counted.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .folder import available_cores, format_report, load_rgb, scan_image_folder

__all__ = ["WriteReport", "write_beton", "main"]


@dataclass
class WriteReport:
    """What :func:`write_beton` did.

    Attributes:
        out_path: the written .beton file.
        written: number of images written.
        skipped: ``(path, reason)`` of every file left out.
        converted: ``(path, original_mode)`` of every image converted to RGB.
        classes: class names, index = label.
    """

    out_path: str
    written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal."""
        head = (
            f"wrote {self.written} image(s) in {len(self.classes)} class(es) to {self.out_path}; "
            f"skipped {len(self.skipped)}, converted {len(self.converted)}"
        )
        detail = format_report(self.skipped, self.converted)
        return head + ("\n" + detail if detail else "")


class _ValidatedImages:
    """Indexed dataset for FFCV's writer: ``i -> (uint8 [H, W, 3] RGB, label)``."""

    def __init__(self, paths: list[str], labels: list[int]) -> None:
        self.paths = paths
        self.labels = labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.asarray(load_rgb(self.paths[i]), dtype=np.uint8), int(self.labels[i])


def write_beton(
    image_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    max_resolution: int = 512,
    jpeg_quality: int = 90,
    num_workers: Optional[int] = None,
    progress: bool = True,
) -> WriteReport:
    """Validate every image of ``image_dir`` and write the valid ones to ``out_path``.

    Args:
        image_dir: image folder (class subfolders, or a flat folder of images).
        out_path: the .beton file to write (its folder is created; an existing file is replaced).
        max_resolution: longer side of the stored images (larger ones are downscaled, INTER_AREA).
        jpeg_quality: JPEG quality of the stored images, 1..100.
        num_workers: writer processes and validation threads (default: cores available).
        progress: show progress bars.

    Raises:
        ValueError: bad argument, or no valid image.
        RuntimeError: FFCV is not importable.
    """
    if not isinstance(max_resolution, int) or max_resolution < 16:
        raise ValueError(f"max_resolution must be an int >= 16, got {max_resolution!r}")
    if not isinstance(jpeg_quality, int) or not (1 <= jpeg_quality <= 100):
        raise ValueError(f"jpeg_quality must be an int in [1, 100], got {jpeg_quality!r}")
    out = Path(out_path)
    if out.suffix != ".beton":
        raise ValueError(f"out_path must end with .beton, got {str(out)!r}")
    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    except Exception as e:
        raise RuntimeError(f"write_beton needs FFCV ({type(e).__name__}: {e}); pip install 'dino-fast[ffcv]'") from e

    workers = available_cores() if num_workers is None else max(1, min(int(num_workers), available_cores()))
    scan = scan_image_folder(image_dir, num_workers=workers, progress=progress)
    data = _ValidatedImages([r.path for r in scan.records], scan.labels)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = DatasetWriter(
        str(tmp),
        {
            "image": RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality),
            "label": IntField(),
        },
        num_workers=workers,
    )
    import ffcv.writer as _ffcv_writer

    orig_tqdm = _ffcv_writer.tqdm
    if not progress:  # FFCV's writer draws its own bar; silence it on request
        _ffcv_writer.tqdm = lambda *a, **k: orig_tqdm(*a, **{**k, "disable": True})
    try:
        writer.from_indexed_dataset(data, chunksize=64)
    finally:
        _ffcv_writer.tqdm = orig_tqdm
    os.replace(tmp, out)
    Path(str(out) + ".json").write_text(json.dumps({"classes": scan.classes, "n": len(data)}, indent=1))
    return WriteReport(
        out_path=str(out), written=len(data), skipped=scan.skipped, converted=scan.converted, classes=scan.classes
    )


def main(argv: Sequence[str]) -> int:
    """``dino-fast write-beton IMAGE_DIR OUT.beton [--max-resolution 512] [--jpeg-quality 90]``."""
    p = argparse.ArgumentParser(prog="dino-fast write-beton", description="Write an image folder to an FFCV .beton file.")
    p.add_argument("image_dir", help="image folder: class subfolders (ImageFolder convention) or a flat folder")
    p.add_argument("out", help="output .beton file")
    p.add_argument("--max-resolution", type=int, default=512, help="longer side of stored images (default 512)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    p.add_argument("--num-workers", type=int, default=None, help="writer processes (default: cores available)")
    args = p.parse_args(list(argv))
    try:
        report = write_beton(
            args.image_dir,
            args.out,
            max_resolution=args.max_resolution,
            jpeg_quality=args.jpeg_quality,
            num_workers=args.num_workers,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dino-fast write-beton: {e}")
        return 2
    print(report.summary())
    return 0

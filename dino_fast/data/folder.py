"""Image folders: scanning, validation, RGB conversion (ImageFolder convention).

``root/<class>/<image>`` gives one label per class subfolder (classes sorted by name, labels
0..C-1); a folder that holds images directly and no class subfolders is one class, label 0.
Every candidate file is validated by decoding it (JPEG at reduced DCT scale, which still reads
the whole entropy-coded stream): zero-byte files, non-images and corrupt or truncated images are
listed with the reason and skipped; grayscale, RGBA, palette, CMYK (and other modes) are
converted to RGB when loaded and listed as converted. Images of more than 8 bits per channel
(16-bit grey PNGs and TIFFs: PIL modes ``I;16*``, ``I``, ``F``) are rescaled to 8 bits first
(:func:`to_8bit`), where PIL's own ``convert("RGB")`` clips every value above 255 to white.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["ImageRecord", "FolderScan", "list_image_files", "scan_image_folder", "validate_image_files", "load_rgb",
           "decode_rgb", "to_8bit", "available_cores"]

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL modes of more than 8 bits per pixel

# Files with other extensions are ignored silently (README, .DS_Store, ...); files with these
# extensions that fail to decode are reported.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def available_cores() -> int:
    """Number of CPU cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ImageRecord:
    """One valid image: path, integer label, decoded size and original PIL mode."""

    path: str
    label: int
    height: int
    width: int
    mode: str


@dataclass
class FolderScan:
    """Result of :func:`scan_image_folder`.

    Attributes:
        root: the scanned folder.
        classes: class names, index = label.
        records: valid images in a fixed order (class, then file name).
        skipped: ``(path, reason)`` for every file that was not usable.
        converted: ``(path, original_mode)`` for every valid image whose mode is not RGB.
    """

    root: str
    classes: list[str]
    records: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)

    @property
    def labels(self) -> list[int]:
        """Label of every record, in order."""
        return [r.label for r in self.records]


def to_8bit(img: Image.Image) -> Image.Image:
    """An ``L`` (8-bit grey) image from a single-channel image of more than 8 bits (``WIDE_MODES``).

    ``I;16*``: ``v / 257`` (0..65535 onto 0..255). ``I`` (32-bit int, how some PIL versions open
    16-bit PNGs) and ``F`` (float): kept when every value lies in 0..255, divided by 257 when in
    0..65535 (``I``), times 255 when in 0..1 (``F``); any other range is stretched from its min
    to its max (a constant image gives 0). Rounded to nearest. Other modes are returned as they are.
    """
    if img.mode not in WIDE_MODES:
        return img
    a = np.asarray(img, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi > 255 and hi <= 65535):
        a = a / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif not (lo >= 0 and hi <= 255):
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully and return an RGB PIL image (any mode converted to RGB; images of
    more than 8 bits per pixel rescaled to 8 bits first, :func:`to_8bit`).

    Raises OSError (PIL's error, with the path in the message) when the file cannot be decoded.
    """
    return decode_rgb(path)[0]


def decode_rgb(path: str, min_side: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``path`` as :func:`load_rgb` does, but a JPEG whose shorter side is at least twice
    ``min_side`` is decoded at the coarsest of libjpeg's DCT scales 1/2, 1/4 and 1/8 that keeps
    its shorter side at least ``min_side`` (PIL's ``Image.draft``): a 4000 x 3000 photo needed at
    about 250 px then costs a fraction of a full decode. Other formats, and ``min_side`` 0, are
    decoded at full size.

    Returns:
        ``(RGB image, (height, width) of the file)``: the image is the file's size or, reduced,
        about ``(height / k, width / k)`` for k in {2, 4, 8}, so geometry computed on the file's
        size scales by ``image.width / width`` and ``image.height / height``.

    Raises OSError (PIL's error, with the path in the message) when the file cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            short = min(width, height)
            if min_side > 0 and img.format == "JPEG" and 2 * min_side <= short:
                f = min_side / short
                img.draft(img.mode, (max(1, math.ceil(width * f)), max(1, math.ceil(height * f))))
            img.load()
            if img.mode == "RGB":
                return img.copy(), (height, width)
            # alpha is dropped, as torchvision's default loader does (``convert("RGB")``)
            return to_8bit(img).convert("RGB"), (height, width)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot decode image {path!r}: {e}") from e


def _validate(path: str) -> tuple[Optional[tuple[int, int, str]], Optional[str]]:
    """((height, width, mode), None) for a decodable image, (None, reason) otherwise."""
    try:
        if os.path.getsize(path) == 0:
            return None, "zero-byte file"
    except OSError as e:
        return None, f"unreadable: {e}"
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
            if img.format == "JPEG" and mode in ("RGB", "L"):
                img.draft(mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except Image.UnidentifiedImageError:
        return None, "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, f"corrupt image: {e}"
    if width < 1 or height < 1:
        return None, f"empty image ({width}x{height})"
    return (height, width, mode), None


def _progress(it, total: int, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="validating images", unit="img")


def list_image_files(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label), ...]) of the image files under ``root`` by extension, in the
    order :func:`scan_image_folder` reads them; nothing is opened.

    Class subfolders (hidden ones skipped) are labelled in sorted order and walked recursively; a
    folder without subfolders is one class (label 0) of its own files.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    root_p = Path(root)
    if not root_p.is_dir():
        raise FileNotFoundError(f"image folder {str(root_p)!r} is not a directory")
    subdirs = sorted(d.name for d in root_p.iterdir() if d.is_dir() and not d.name.startswith("."))
    candidates: list[tuple[str, int]] = []
    if subdirs:
        classes = subdirs
        for label, name in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(root_p / name):
                dirnames.sort()
                for fname in sorted(filenames):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        candidates.append((os.path.join(dirpath, fname), label))
    else:
        classes = [root_p.name or "0"]
        for fname in sorted(os.listdir(root_p)):
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                candidates.append((str(root_p / fname), 0))
    return classes, candidates


def validate_image_files(
    paths: Sequence[str], *, num_workers: int = 1, progress: bool = False
) -> list[tuple[Optional[tuple[int, int, str]], Optional[str]]]:
    """Open (and decode at 1/8 scale, for JPEGs) each file of ``paths``, as :func:`scan_image_folder` does.

    Args:
        paths: image file paths.
        num_workers: threads (an int; more than 1 uses a pool once there are more than 16 files).
        progress: show a progress bar (tqdm).

    Returns:
        One entry per path, in order: ``((height, width, mode), None)`` for a decodable image,
        ``(None, reason)`` otherwise.
    """
    paths = list(paths)
    if num_workers > 1 and len(paths) > 16:
        with ThreadPoolExecutor(num_workers) as pool:
            return list(_progress(pool.map(_validate, paths), len(paths), progress))
    return [_validate(p) for p in _progress(paths, len(paths), progress)]


def scan_image_folder(
    root: str | os.PathLike, *, num_workers: Optional[int] = None, progress: bool = False
) -> FolderScan:
    """List and validate every image under ``root`` (ImageFolder convention, see module doc).

    Args:
        root: folder with class subfolders, or a flat folder of images (label 0).
        num_workers: validation threads (default: cores available).
        progress: show a progress bar (tqdm) while validating.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: no valid image was found (the message lists the first skipped files).
    """
    root_p = Path(root)
    classes, candidates = list_image_files(root_p)
    workers = available_cores() if num_workers is None else max(1, int(num_workers))
    results = validate_image_files([p for p, _ in candidates], num_workers=workers, progress=progress)

    scan = FolderScan(root=str(root_p), classes=classes, records=[])
    for (path, label), (info, reason) in zip(candidates, results):
        if info is None:
            scan.skipped.append((path, str(reason)))
            continue
        h, w, mode = info
        scan.records.append(ImageRecord(path, label, h, w, mode))
        if mode != "RGB":
            scan.converted.append((path, mode))
    if not scan.records:
        detail = "; ".join(f"{p}: {r}" for p, r in scan.skipped[:5])
        raise ValueError(
            f"no valid image found under {str(root_p)!r} (expected image files with extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}, in class subfolders or directly){': ' + detail if detail else ''}"
        )
    return scan


def format_report(skipped: Sequence[tuple[str, str]], converted: Sequence[tuple[str, str]], limit: int = 20) -> str:
    """Human-readable listing of skipped and converted files (first ``limit`` of each)."""
    lines: list[str] = []
    if skipped:
        lines.append(f"skipped {len(skipped)} file(s):")
        lines += [f"  {p}: {r}" for p, r in skipped[:limit]]
        if len(skipped) > limit:
            lines.append(f"  ... and {len(skipped) - limit} more")
    if converted:
        lines.append(f"converted {len(converted)} image(s) to RGB:")
        lines += [f"  {p}: {m}" for p, m in converted[:limit]]
        if len(converted) > limit:
            lines.append(f"  ... and {len(converted) - limit} more")
    return "\n".join(lines)

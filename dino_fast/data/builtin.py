"""The built-in dataset: a small labelled image folder generated deterministically on demand.

Each class is a (shape, texture) pair - ten shapes (disc, square, triangle, star, cross, ring,
diamond, hexagon, crescent, arrow) times ten textures (stripes, checker, dots, waves, speckle,
grid, rings, zigzag, bricks, solid); the first ten classes have ten shapes and ten textures - so
classes differ in shape and in texture, and in nothing else. Every image draws the object's
position, size and rotation, the texture's period and angle, and a gray gradient background with
noise, all from ``numpy.random.default_rng([seed, split, class, index])``; the texture is black on
white-ish (levels 40 and 220).

Format 4 has no colour, on purpose. The earlier formats gave every image random colours (object
tints, background, clutter). DINO learns what two crops of one image share, and on those images
it was the colour: in 270 iterations on 2 CPU cores the trained teacher's k-NN accuracy stayed
at or below that of random weights, whatever the augmentation (teacher temperature, momentum,
colour jitter up to hue 0.5, grayscale up to p=0.8, learning rate: +3 points at best), while on
the same shapes and textures without colour it gains 12 to 17 points (README, issue 6). A
network with random weights, which mostly sees brightness and layout, gets about 20 % (chance 10 %).

``out_dir/train/<class>/NNNN.jpg`` and ``out_dir/val/<class>/NNNN.jpg``, JPEG quality 90.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "TEXTURES", "class_names", "render_image", "make_dataset", "ensure_builtin_dataset", "main"]

SHAPES = ("disc", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "crescent", "arrow")
TEXTURES = ("stripes", "checker", "dots", "waves", "speckle", "grid", "rings", "zigzag", "bricks", "solid")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
_SPLITS = {"train": 0, "val": 1}
_FORMAT_VERSION = 4


def class_names(n_classes: int) -> list[str]:
    """Names ``"NN-shape-texture"`` of the first ``n_classes`` classes (2..50).

    Class k has shape ``k % 10`` and texture ``(k % 10 + k // 10) % 10``: the first ten classes
    have ten different shapes and ten different textures.
    """
    if not isinstance(n_classes, int) or not (2 <= n_classes <= MAX_CLASSES):
        raise ValueError(f"n_classes must be an int in [2, {MAX_CLASSES}], got {n_classes!r}")
    out = []
    for k in range(n_classes):
        s = k % len(SHAPES)
        t = (s + k // len(SHAPES)) % len(TEXTURES)
        out.append(f"{k:02d}-{SHAPES[s]}-{TEXTURES[t]}")
    return out


def _shape_polygons(shape: str, cx: float, cy: float, r: float, rot: float) -> tuple[list[list[tuple[float, float]]], list[list[tuple[float, float]]]]:
    """(filled polygons, holes) of a shape of radius ``r`` centred at (cx, cy), rotated by ``rot``."""

    def poly(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    def regular(n: int, radius: float, phase: float = 0.0) -> list[tuple[float, float]]:
        return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "disc":
        return [poly(regular(48, r))], []
    if shape == "square":
        return [poly(regular(4, r, math.pi / 4))], []
    if shape == "triangle":
        return [poly(regular(3, r, -math.pi / 2))], []
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return [poly(pts)], []
    if shape == "cross":
        w = 0.33 * r
        return [poly([(-r, -w), (r, -w), (r, w), (-r, w)]), poly([(-w, -r), (w, -r), (w, r), (-w, r)])], []
    if shape == "ring":
        return [poly(regular(48, r))], [poly(regular(48, 0.55 * r))]
    if shape == "diamond":
        return [poly([(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)])], []
    if shape == "hexagon":
        return [poly(regular(6, r))], []
    if shape == "crescent":
        return [poly(regular(48, r))], [poly([(x + 0.45 * r, y - 0.1 * r) for x, y in regular(48, 0.8 * r)])]
    if shape == "arrow":
        return [poly([(-r, -0.25 * r), (0.1 * r, -0.25 * r), (0.1 * r, -0.7 * r), (r, 0), (0.1 * r, 0.7 * r), (0.1 * r, 0.25 * r), (-r, 0.25 * r)])], []
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """float [size, size] in [0, 1]: the pattern that mixes the object's two colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    v = -xx * math.sin(ang) + yy * math.cos(ang)
    period = rng.uniform(0.06, 0.12) * size
    if texture == "stripes":
        return (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if texture == "dots":
        pu = (u / period) % 1.0 - 0.5
        pv = (v / period) % 1.0 - 0.5
        return (pu * pu + pv * pv < 0.09).astype(np.float32)
    if texture == "waves":
        return (np.sin(2 * math.pi * (u + 0.25 * period * np.sin(2 * math.pi * v / (2.5 * period))) / period) > 0).astype(np.float32)
    if texture == "grid":
        return (((u / period) % 1.0 < 0.3) | ((v / period) % 1.0 < 0.3)).astype(np.float32)
    if texture == "rings":
        ox, oy = rng.uniform(0, size, size=2)
        return (np.sin(2 * math.pi * np.hypot(xx - ox, yy - oy) / period) > 0).astype(np.float32)
    if texture == "zigzag":
        tri = np.abs((v / period) % 2.0 - 1.0)
        return (np.sin(2 * math.pi * (u + 0.8 * period * tri) / period) > 0).astype(np.float32)
    if texture == "bricks":
        row = np.floor(v / period)
        uu = (u / (2 * period) + 0.5 * (row % 2)) % 1.0
        return (((v / period) % 1.0 < 0.2) | (uu < 0.1)).astype(np.float32)
    if texture == "solid":
        return np.zeros((size, size), dtype=np.float32)
    if texture == "speckle":
        cells = max(2, int(size / (0.35 * period)))
        small = rng.random((cells, cells)) > 0.5
        return np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.NEAREST), dtype=np.float32) / 255.0
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _gray(rng: np.random.Generator) -> np.ndarray:
    """A background gray level (90-170), as an RGB triple."""
    return np.full(3, rng.uniform(90, 170), dtype=np.float32)


#: the texture's dark and light levels (RGB): high luminance contrast, no colour
_DARK = np.full(3, 40.0, dtype=np.float32)
_LIGHT = np.full(3, 220.0, dtype=np.float32)


def render_image(class_index: int, rng: np.random.Generator, *, image_size: int = 112, n_classes: int = 10) -> Image.Image:
    """One RGB image ``image_size`` square of class ``class_index`` (see module doc)."""
    name = class_names(n_classes)[class_index]
    _, shape, texture = name.split("-")
    s = image_size
    # background: gradient between two gray levels plus noise
    c0, c1 = _gray(rng), _gray(rng)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(1, s - 1)
    t = np.clip(0.5 + (xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang), 0, 1)[..., None]
    bg = c0 * (1 - t) + c1 * t + rng.normal(0, 3, size=(s, s, 1))
    img = Image.fromarray(np.clip(np.broadcast_to(bg, (s, s, 3)), 0, 255).astype(np.uint8), "RGB")
    # the object: black-on-white texture inside the shape mask
    r = rng.uniform(0.22, 0.4) * s
    cx, cy = rng.uniform(r * 0.8, s - r * 0.8, size=2)
    polys, holes = _shape_polygons(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
    mask = Image.new("L", (s, s), 0)
    mdraw = ImageDraw.Draw(mask)
    for p in polys:
        mdraw.polygon(p, fill=255)
    for p in holes:
        mdraw.polygon(p, fill=0)
    pat = _texture(texture, s, rng)[..., None]
    fg = Image.fromarray(np.clip(_DARK * (1 - pat) + _LIGHT * pat, 0, 255).astype(np.uint8), "RGB")
    img.paste(fg, (0, 0), mask)
    return img


def make_dataset(
    out_dir: str | os.PathLike,
    *,
    n_classes: int = 10,
    train_per_class: int = 120,
    val_per_class: int = 30,
    image_size: int = 112,
    seed: int = 0,
) -> Path:
    """Write the dataset to ``out_dir`` (created; existing files of the same names are replaced).

    Returns ``Path(out_dir)``. Deterministic: the same arguments give the same files.
    Defaults: 10 classes, 1200 train + 300 val images of 112 px, about 6.5 MB, a few seconds.
    """
    class_names(n_classes)  # validates n_classes
    for name, v in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(image_size, int) or not (32 <= image_size <= 1024):
        raise ValueError(f"image_size must be an int in [32, 1024], got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    out = Path(out_dir)
    names = class_names(n_classes)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for k, cname in enumerate(names):
            d = out / split / cname
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, _SPLITS[split], k, i])
                render_image(k, rng, image_size=image_size, n_classes=n_classes).save(d / f"{i:04d}.jpg", quality=90)
    meta = {
        "format": _FORMAT_VERSION,
        "n_classes": n_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
        "seed": seed,
        "classes": names,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out


def _is_current(root: Path) -> bool:
    """``root/dataset.json`` exists and was written by this version's generator."""
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == _FORMAT_VERSION


def ensure_builtin_dataset(root: Optional[str | os.PathLike] = None) -> Path:
    """The default built-in dataset at ``root`` (default ``./data_cache/builtin``), generated if missing.

    A complete dataset of the current format (``dataset.json`` present, its ``format`` this
    version's) is reused. Generation writes to a temporary folder next to ``root`` and renames it
    into place, so an interrupted run leaves no partial dataset behind; a leftover incomplete
    ``root``, or one written by an older generator, is replaced. Returns the root (train images
    under ``root/train``, validation under ``root/val``).
    """
    target = Path(root) if root is not None else Path.cwd() / "data_cache" / "builtin"
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    try:
        make_dataset(tmp)
        if target.exists() and not _is_current(target):
            os.rename(target, old)  # incomplete (interrupted) or an older format: set aside
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_current(target):  # not a concurrent winner: a real failure
                raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return target


def main(argv: Sequence[str]) -> int:
    """``dino-fast make-dataset OUT_DIR [--classes 10] [--train-per-class 120] ...``."""
    p = argparse.ArgumentParser(prog="dino-fast make-dataset", description="Generate the built-in labelled image dataset.")
    p.add_argument("out_dir", help="output folder (train/ and val/ are created inside)")
    p.add_argument("--classes", type=int, default=10, help=f"number of classes, 2..{MAX_CLASSES} (default 10)")
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(list(argv))
    try:
        out = make_dataset(
            args.out_dir,
            n_classes=args.classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            image_size=args.image_size,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"dino-fast make-dataset: {e}")
        return 2
    n = args.classes * (args.train_per_class + args.val_per_class)
    print(f"wrote {n} images in {args.classes} classes to {out}/train and {out}/val")
    return 0

"""Image sets the small-data recipe was not built on, written as ``train/<class>/`` and ``val/<class>/`` folders.

``python -m bench.learning`` trains on each of them with nothing but the data paths set. They
differ from the built-in dataset (procedural shapes times textures, 64 px, grey) and from each
other in source, size, colour and what separates the classes:

============  =======================================================  =======  ======  =========
name          images                                                   size     colour  train/val
============  =======================================================  =======  ======  =========
``digits``    scikit-learn's handwritten digits (UCI optdigits test     8 -> 32  grey    899/898
              set, 1797 images, 10 classes), split by index parity      px
``glyphs``    the letters A-J rendered from the 21 text faces that     32 px    grey    3000/1000
              matplotlib ships (DejaVu, STIX, Computer Modern), random
              size, rotation, offset, stroke level, noisy background;
              train and val draw from disjoint faces (unseen typefaces)
``scenes``    48 px patches of 10 other images, cut as the photos are  48 px    both    2000/600
              (below): scikit-image's immunohistochemistry, retina,
              moon, clock, cell, page, text, motorcycle (stereo left)
              and microaneurysms, and matplotlib's Grace Hopper; six
              grey, four colour; microscopy, text, scenes, a portrait
``tints``     the glyphs' letters and faces (the same split) in random    32 px    colour  2000/600
              colours: letter and background each draw an RGB colour,
              at least 80 levels of luminance apart, so colour says
              nothing about the class (a guard for colour-augmentation
              changes: the other sets are grey or tell classes by colour)
``fashion``   Fashion-MNIST (Zalando's product photographs: shirts,  28 px    grey    3000/1000
              trousers, bags, shoes; 10 classes), the first 300 of
              each class of its train file and the first 100 of its
              test file; read from Debian's ``dataset-fashion-mnist``
              (``/usr/share/datasets/fashion-mnist``, or the folder
              in ``$FASHION_MNIST_DIR``); the one set of real
              photographs of objects, in classes of objects
``photos``    48 px patches of 10 photographs that scikit-image ships  48 px    colour  2000/600
              (astronaut, brick, camera, cat, coffee, coins, grass,
              gravel, Hubble deep field, rocket); the class is the
              photograph; train patches come from the left 70 % of
              each photograph, val patches from the right 30 %
============  =======================================================  =======  ======  =========

``photos`` is the held-out set: no recipe decision was made on it (docs/NOTEBOOK.md, issue 17).
``fashion`` came last (2026-12-07) and is not in the default list of ``python -m bench.learning``
(it needs a Debian package); it was measured before any decision looked at it.
``scenes`` is its tuning twin, added after the photos' gains fell short: the same kind of task
(which image a patch was cut from) on images that share nothing with the photos, so that a
recipe change for patch data can be decided without looking at the held-out set.
Every set is deterministic (``numpy.random.default_rng`` seeded by name, class and index) and
written once: a folder that already holds a complete copy (a ``.complete`` marker with the same
format version) is reused.

scikit-learn and scikit-image are the ``bench`` extra (``pip install -e '.[bench]'``); matplotlib
(its fonts) is a ``dev`` dependency.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["SETS", "HELD_OUT", "build", "build_digits", "build_glyphs", "build_scenes", "build_tints",
           "build_fashion", "build_photos", "read_idx", "DEFAULT_SETS", "FASHION_DIR", "FASHION_CLASSES"]

FORMAT = 2
HELD_OUT = "photos"
LETTERS = "ABCDEFGHIJ"
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "rocket")
# the scenes: scikit-image's images that are not photos of PHOTOS, and matplotlib's portrait
SCENES = ("immunohistochemistry", "retina", "moon", "clock", "cell", "page", "text", "stereo_motorcycle",
          "microaneurysms", "grace_hopper")
# text faces only: the symbol faces (cmex, cmsy, cmmi, STIXSiz*, STIXNonUni*) and the DejaVu
# Display faces have no Latin capitals or draw them as math symbols
FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
         "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
         "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
         "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
         "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmb10.ttf")
VAL_FACES = ("DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Italic.ttf",
             "STIXGeneralBol.ttf", "cmss10.ttf")


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")


def _rng(*key: int | str) -> np.random.Generator:
    return np.random.default_rng([abs(hash_str(k)) if isinstance(k, str) else k for k in key])


def hash_str(s: str) -> int:
    """A stable 31-bit hash of ``s`` (Python's ``hash`` of a str changes between processes)."""
    h = 0
    for ch in s.encode():
        h = (h * 131 + ch) % 2_147_483_647
    return h


def _write(root: Path, items: Iterator[tuple[str, str, int, Image.Image]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for split, cls, idx, img in items:
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{idx:05d}.png")
        counts[split] = counts.get(split, 0) + 1
    return counts


def _complete(root: Path) -> bool:
    marker = root / ".complete"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except ValueError:
        return False


def _finish(root: Path, name: str, counts: dict[str, int]) -> None:
    (root / ".complete").write_text(json.dumps({"format": FORMAT, "name": name, **counts}))


def _digits_items() -> Iterator[tuple[str, str, int, Image.Image]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the 'digits' set needs scikit-learn: pip install -e '.[bench]'") from e
    d = load_digits()
    for i, (x, y) in enumerate(zip(d.images, d.target)):
        a = np.clip(x / 16.0 * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L").resize((32, 32), Image.BILINEAR)
        yield ("train" if i % 2 == 0 else "val"), str(int(y)), i, img


def _fonts_dir() -> Path:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover
        raise ImportError("the 'glyphs' set needs matplotlib's fonts: pip install matplotlib") from e
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _glyph(letter: str, font_path: Path, rng: np.random.Generator, size: int = 32) -> Image.Image:
    big = size * 4
    bg = int(rng.integers(150, 256))
    fg = int(rng.integers(0, max(bg - 100, 1)))
    canvas = Image.new("L", (big, big), color=bg)
    font = ImageFont.truetype(str(font_path), size=int(big * rng.uniform(0.5, 0.8)))
    draw = ImageDraw.Draw(canvas)
    l, t, r, b = draw.textbbox((0, 0), letter, font=font)
    w, h = r - l, b - t
    cx = big / 2 + rng.uniform(-0.12, 0.12) * big
    cy = big / 2 + rng.uniform(-0.12, 0.12) * big
    draw.text((cx - w / 2 - l, cy - h / 2 - t), letter, fill=fg, font=font)
    canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR, fillcolor=bg)
    img = canvas.resize((size, size), Image.LANCZOS)
    noise = rng.normal(0, rng.uniform(2, 12), (size, size))
    a = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(a, mode="L")


def _glyph_items(train_per_class: int = 300, val_per_class: int = 100) -> Iterator[tuple[str, str, int, Image.Image]]:
    fonts = _fonts_dir()
    missing = [f for f in FACES if not (fonts / f).is_file()]
    if missing:
        raise FileNotFoundError(f"matplotlib's font folder {fonts} lacks {missing}")
    train_faces = [f for f in FACES if f not in VAL_FACES]
    for split, faces, n in (("train", train_faces, train_per_class), ("val", list(VAL_FACES), val_per_class)):
        for ci, letter in enumerate(LETTERS):
            for i in range(n):
                rng = _rng("glyphs", split, ci, i)
                face = faces[int(rng.integers(len(faces)))]
                yield split, letter, i, _glyph(letter, fonts / face, rng)


def _tint(gray: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``gray`` (mode L) recoloured: its darkest level to one random RGB colour, its brightest to
    another with at least 80 levels more luminance (ITU-R 601 weights), linearly in between."""
    lum = np.array([0.299, 0.587, 0.114])
    while True:
        dark, light = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if float(lum @ light) - float(lum @ dark) >= 80.0:
            break
    a = np.asarray(gray, dtype=np.float64)
    t = (a - a.min()) / max(float(a.max() - a.min()), 1.0)
    rgb = dark[None, None, :] * (1.0 - t[..., None]) + light[None, None, :] * t[..., None]
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")


def _tint_items(train_per_class: int = 200, val_per_class: int = 60) -> Iterator[tuple[str, str, int, Image.Image]]:
    for split, letter, i, gray in _glyph_items(train_per_class, val_per_class):
        yield split, letter, i, _tint(gray, _rng("tints", split, letter, i))


def _photo(name: str) -> np.ndarray:
    """Image ``name`` as (H, W, 3) uint8: a scikit-image sample, or matplotlib's ``grace_hopper``."""
    if name == "grace_hopper":
        import matplotlib.cbook as cbook
        with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
            a = np.asarray(im.convert("RGB"))
    else:
        try:
            from skimage import data as skdata
        except ImportError as e:  # pragma: no cover
            raise ImportError("the 'photos' and 'scenes' sets need scikit-image: pip install -e '.[bench]'") from e
        a = getattr(skdata, name)()
        a = np.asarray(a[0] if name == "stereo_motorcycle" else a)  # (left, right, disparity)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return a[..., :3].astype(np.uint8)


def _patch_items(set_name: str, sources: tuple[str, ...], train_per_class: int = 200, val_per_class: int = 60,
                 size: int = 48) -> Iterator[tuple[str, str, int, Image.Image]]:
    """Square patches of each source image (its class): train from the left 70 %, val from the right 30 %."""
    for ci, name in enumerate(sources):
        a = _photo(name)
        H, W = a.shape[:2]
        cut = int(W * 0.7)
        for split, (x0, x1), n in (("train", (0, cut), train_per_class), ("val", (cut, W), val_per_class)):
            for i in range(n):
                rng = _rng(set_name, split, ci, i)
                side = int(min(H, x1 - x0) * rng.uniform(0.12, 0.35))
                side = max(side, 16)
                y = int(rng.integers(0, H - side + 1))
                x = int(rng.integers(x0, x1 - side + 1))
                patch = Image.fromarray(a[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
                if rng.random() < 0.5:
                    patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
                if rng.random() < 0.3:
                    patch = patch.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
                yield split, f"{ci:02d}-{name}", i, patch


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzip-compressed when its name ends in ``.gz``) as a uint8 array.

    Returns:
        ``[N]`` labels or ``[N, H, W]`` images, dtype uint8.

    Raises:
        ValueError: the file is not an IDX file of unsigned bytes, or holds fewer bytes than its
            header says; the message names the file and what was found.
    """
    import gzip
    raw = gzip.decompress(Path(path).read_bytes()) if str(path).endswith(".gz") else Path(path).read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()!r}, expected 000008xx)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    n = int(np.prod(dims)) if dims else 0
    if len(body) < n:
        raise ValueError(f"{path}: header says {dims} ({n} bytes), the file holds {len(body)}")
    return np.frombuffer(body[:n], dtype=np.uint8).reshape(dims)


def _fashion_dir() -> Path:
    import os
    d = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_DIR))
    need = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz")
    missing = [f for f in need if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the 'fashion' set reads Fashion-MNIST from {d}, which lacks {missing}: install Debian's "
            f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR to a "
            f"folder holding those four files")
    return d


def _fashion_items(train_per_class: int = 300, val_per_class: int = 100) -> Iterator[tuple[str, str, int, Image.Image]]:
    d = _fashion_dir()
    for split, stem, n in (("train", "train", train_per_class), ("val", "t10k", val_per_class)):
        images = read_idx(d / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(d / f"{stem}-labels-idx1-ubyte.gz")
        if len(images) != len(labels):
            raise ValueError(f"{d}: {len(images)} {stem} images against {len(labels)} labels")
        for ci, name in enumerate(FASHION_CLASSES):
            idx = np.flatnonzero(labels == ci)[:n]
            if len(idx) < n:
                raise ValueError(f"{d}: class {ci} ({name}) has {len(idx)} {stem} images, {n} wanted")
            for i in idx:
                yield split, f"{ci}-{name}", int(i), Image.fromarray(images[i], mode="L")


def _build(name: str, root: Path, items: Callable[[], Iterator[tuple[str, str, int, Image.Image]]]) -> Path:
    root = Path(root)
    if _complete(root):
        return root
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = _write(tmp, items())
    _finish(tmp, name, counts)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def build_digits(root: Path) -> Path:
    """Write the ``digits`` set under ``root`` (``train/``, ``val/``; 32x32 grey PNG) and return ``root``."""
    return _build("digits", root, _digits_items)


def build_glyphs(root: Path, train_per_class: int = 300, val_per_class: int = 100) -> Path:
    """Write the ``glyphs`` set under ``root`` (32x32 grey PNG, val faces unseen in train) and return ``root``."""
    return _build("glyphs", root, lambda: _glyph_items(train_per_class, val_per_class))


def build_scenes(root: Path, train_per_class: int = 200, val_per_class: int = 60) -> Path:
    """Write the ``scenes`` set under ``root`` (48x48 RGB PNG, patches of :data:`SCENES`) and return ``root``."""
    return _build("scenes", root, lambda: _patch_items("scenes", SCENES, train_per_class, val_per_class))


def build_tints(root: Path, train_per_class: int = 200, val_per_class: int = 60) -> Path:
    """Write the ``tints`` set under ``root`` (32x32 RGB PNG: the glyphs in random colours) and return ``root``."""
    return _build("tints", root, lambda: _tint_items(train_per_class, val_per_class))


def build_fashion(root: Path, train_per_class: int = 300, val_per_class: int = 100) -> Path:
    """Write the ``fashion`` set under ``root`` (28x28 grey PNG from Fashion-MNIST) and return ``root``.

    Raises:
        FileNotFoundError: Fashion-MNIST's four files are not in :data:`FASHION_DIR` (or
            ``$FASHION_MNIST_DIR``); the message says how to install them.
    """
    return _build("fashion", root, lambda: _fashion_items(train_per_class, val_per_class))


def build_photos(root: Path) -> Path:
    """Write the held-out ``photos`` set under ``root`` (48x48 RGB PNG) and return ``root``."""
    return _build("photos", root, lambda: _patch_items("photos", PHOTOS))


SETS: dict[str, Callable[[Path], Path]] = {"digits": build_digits, "glyphs": build_glyphs, "scenes": build_scenes,
                                           "tints": build_tints, "fashion": build_fashion,
                                           "photos": build_photos}
# what `python -m bench.learning` runs with no --sets: every set that needs no system package
DEFAULT_SETS = ("digits", "glyphs", "scenes", "tints", "photos")


def build(name: str, cache_dir: Path) -> Path:
    """Build (or reuse) set ``name`` in ``cache_dir/<name>`` and return that folder.

    Raises:
        KeyError: ``name`` is not one of :data:`SETS` (the message lists them).
    """
    if name not in SETS:
        raise KeyError(f"unknown image set {name!r}; known: {sorted(SETS)}")
    return SETS[name](Path(cache_dir) / name)

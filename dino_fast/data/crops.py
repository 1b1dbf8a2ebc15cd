"""The crop sampler shared by every multi-crop loader (RandomResizedCrop semantics).

One scalar function, :func:`crop_box`, decides every crop box of every loader: the PIL fallback
loader calls it from Python, the FFCV decode-once decoder calls the very same function compiled
by numba inside its parallel decode loop. Given the same ``(seed, epoch, sample, crop)`` both give
the same box, whatever the batch size, the worker count or the order in which samples are decoded.

Semantics (torchvision ``RandomResizedCrop.get_params``): up to 10 tries of
``area = H*W*U(scale)``, ``log(ratio) ~ U(log r_lo, log r_hi)``, ``w = round(sqrt(area*ratio))``,
``h = round(sqrt(area/ratio))``; the first box that fits is placed uniformly at random; if none
fits, the centre crop of the whole image clamped to the ratio range.

Randomness comes from a counter-based hash (no generator state): every draw is
``hash(seed, epoch, sample, crop, draw)``, a 32-bit integer mixed with Chris Wellons'
``lowbias32`` finaliser, written so that Python integers and numba's int64 give the same bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CropSpec", "crop_box", "crop_boxes", "uniform01"]

_M32 = 0xFFFFFFFF

try:  # numba (installed with FFCV) compiles these same functions into the FFCV decoder
    from numba.extending import register_jitable as _jitable
except ImportError:  # pragma: no cover - the fallback loader runs them as plain Python

    def _jitable(fn):  # type: ignore[no-redef]
        return fn


@_jitable
def _lowbias32(x: int) -> int:
    """32-bit integer finaliser (lowbias32); input and output in [0, 2**32)."""
    x = x & _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


@_jitable
def _key(seed: int, epoch: int, sample: int, crop: int) -> int:
    """Stream key of one crop: a 32-bit hash of (seed, epoch, sample, crop)."""
    h = _lowbias32((seed & _M32) ^ 0x9E3779B9)
    h = _lowbias32(h ^ ((seed >> 32) & _M32))
    h = _lowbias32(h ^ (epoch & _M32))
    h = _lowbias32(h ^ (sample & _M32))
    h = _lowbias32(h ^ ((sample >> 32) & _M32))
    h = _lowbias32(h ^ (crop & _M32))
    return h


@_jitable
def uniform01(key: int, draw: int) -> float:
    """Draw number ``draw`` of the stream ``key``: a float in [0, 1) with 32 random bits."""
    h = _lowbias32(key ^ _lowbias32((draw * 0x632BE5AB + 0x2545F491) & _M32))
    return h / 4294967296.0


@_jitable
def crop_box(
    height: int,
    width: int,
    scale_lo: float,
    scale_hi: float,
    ratio_lo: float,
    ratio_hi: float,
    seed: int,
    epoch: int,
    sample: int,
    crop: int,
) -> tuple[int, int, int, int]:
    """One RandomResizedCrop box, deterministic in ``(seed, epoch, sample, crop)``.

    Args:
        height, width: size of the decoded image in pixels (>= 1).
        scale_lo, scale_hi: range of the crop's area as a fraction of the image's area.
        ratio_lo, ratio_hi: range of the crop's aspect ratio w/h (sampled log-uniformly).
        seed, epoch, sample, crop: non-negative integers naming the random stream.

    Returns:
        ``(top, left, h, w)`` in pixels, with ``0 <= top``, ``top + h <= height``,
        ``0 <= left``, ``left + w <= width``, ``h, w >= 1``.

    The same source runs in CPython and compiled by numba (the FFCV decoder), hence the plain
    scalar style; inputs are not validated here (see :class:`CropSpec`).
    """
    key = _key(seed, epoch, sample, crop)
    area = float(height) * float(width)
    log_lo = math.log(ratio_lo)
    log_hi = math.log(ratio_hi)
    for attempt in range(10):
        u_area = uniform01(key, 4 * attempt)
        u_ratio = uniform01(key, 4 * attempt + 1)
        target_area = area * (scale_lo + (scale_hi - scale_lo) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(math.floor(math.sqrt(target_area * aspect) + 0.5))
        h = int(math.floor(math.sqrt(target_area / aspect) + 0.5))
        if 0 < w <= width and 0 < h <= height:
            top = int(math.floor(uniform01(key, 4 * attempt + 2) * (height - h + 1)))
            left = int(math.floor(uniform01(key, 4 * attempt + 3) * (width - w + 1)))
            return top, left, h, w
    # Fallback: centre crop of the whole image, clamped to the ratio range.
    in_ratio = float(width) / float(height)
    if in_ratio < ratio_lo:
        w = width
        h = int(math.floor(w / ratio_lo + 0.5))
    elif in_ratio > ratio_hi:
        h = height
        w = int(math.floor(h * ratio_hi + 0.5))
    else:
        w = width
        h = height
    h = max(1, min(h, height))
    w = max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class CropSpec:
    """Geometry of the multi-crop: how many crops of which size from which area range.

    Crop ``c`` of a sample is global for ``c < global_number`` and local after; its random stream
    is ``(seed, epoch, sample, c)``.
    """

    global_number: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_number: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self) -> None:
        if not isinstance(self.global_number, int) or self.global_number < 1:
            raise ValueError(f"global_number must be an int >= 1, got {self.global_number!r}")
        if not isinstance(self.local_number, int) or self.local_number < 0:
            raise ValueError(f"local_number must be an int >= 0, got {self.local_number!r}")
        for name in ("global_size", "local_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("global_scale", "local_scale"):
            lo, hi = _pair(getattr(self, name), name)
            if not (0.0 < lo <= hi <= 1.0):
                raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got ({lo}, {hi})")
            object.__setattr__(self, name, (lo, hi))
        lo, hi = _pair(self.ratio, "ratio")
        if not (0.0 < lo <= hi):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got ({lo}, {hi})")
        object.__setattr__(self, "ratio", (lo, hi))

    @property
    def n_crops(self) -> int:
        """Total number of crops per sample (global + local)."""
        return self.global_number + self.local_number

    def scale_of(self, crop: int) -> tuple[float, float]:
        """Area-scale range of crop index ``crop``."""
        return self.global_scale if crop < self.global_number else self.local_scale

    def size_of(self, crop: int) -> int:
        """Output side length of crop index ``crop``."""
        return self.global_size if crop < self.global_number else self.local_size

    def decode_min_side(self) -> int:
        """The shorter image side below which no crop is sampled at less than 2 source pixels per
        output pixel in either direction: a crop of area ``s * H * W`` and aspect ratio ``r`` has
        its shorter side at least ``sqrt(s * min(r_lo, 1 / r_hi)) * min(H, W)``, so every crop
        of every kind keeps 2x when ``min(H, W) >= 2 * size / sqrt(scale_lo * min(r_lo, 1 / r_hi))``
        (234 px for 64 px crops of scale >= 0.4 and 32 px ones of scale >= 0.1). The folder
        loader decodes large JPEGs no smaller than this (:func:`dino_fast.data.folder.decode_rgb`)."""
        q = min(self.ratio[0], 1.0 / self.ratio[1])
        kinds = [(self.global_size, self.global_scale[0])]
        if self.local_number:
            kinds.append((self.local_size, self.local_scale[0]))
        return max(math.ceil(2.0 * size / math.sqrt(lo * q)) for size, lo in kinds)

    def table(self) -> np.ndarray:
        """float64 [n_crops, 4]: (scale_lo, scale_hi, ratio_lo, ratio_hi) per crop index."""
        rows = [(*self.scale_of(c), *self.ratio) for c in range(self.n_crops)]
        return np.asarray(rows, dtype=np.float64)


def _pair(value: object, name: str) -> tuple[float, float]:
    try:
        lo, hi = value  # type: ignore[misc]
        return float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of floats (lo, hi), got {value!r}") from None


def crop_boxes(spec: CropSpec, height: int, width: int, *, seed: int, epoch: int, sample: int) -> np.ndarray:
    """All crop boxes of one sample: int64 [spec.n_crops, 4] rows ``(top, left, h, w)``.

    Raises ValueError for an empty image or negative stream indices.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be >= 1x1, got {height}x{width}")
    if seed < 0 or epoch < 0 or sample < 0:
        raise ValueError(f"seed, epoch and sample must be >= 0, got {seed}, {epoch}, {sample}")
    out = np.empty((spec.n_crops, 4), dtype=np.int64)
    r_lo, r_hi = spec.ratio
    for c in range(spec.n_crops):
        s_lo, s_hi = spec.scale_of(c)
        out[c] = crop_box(height, width, s_lo, s_hi, r_lo, r_hi, seed, epoch, sample, c)
    return out

"""The shared crop sampler: RandomResizedCrop semantics, determinism, centre fallback."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from dino_fast.data.crops import CropSpec, crop_box, crop_boxes, uniform01


def _fresh_seed() -> int:
    return random.SystemRandom().randrange(0, 2**40)


def test_boxes_inside_and_in_range() -> None:
    seed = _fresh_seed()
    rs = np.random.default_rng(seed)
    ratio = (3 / 4, 4 / 3)
    for scale in ((0.4, 1.0), (0.05, 0.4)):
        fitted = 0
        for s in range(1500):
            h, w = (int(v) for v in rs.integers(40, 700, size=2))
            top, left, bh, bw = crop_box(h, w, *scale, *ratio, seed, 3, s, 1)
            assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and bh >= 1 and bw >= 1
            if (top, left, bh, bw) == _fallback(h, w, ratio):
                continue  # the centre fallback (checked separately); a random box equal to it is rare
            fitted += 1
            # rounding of w and h to integers moves area and ratio by at most ~1 pixel per side
            area = bh * bw / (h * w)
            slack = (bh + bw + 1) / (h * w)
            assert scale[0] - slack <= area <= scale[1] + slack, (h, w, bh, bw, area)
            r = bw / bh
            assert ratio[0] * (1 - 1.0 / bh) - 1.0 / bh <= r <= ratio[1] * (1 + 1.0 / bh) + 1.0 / bh, (bh, bw)
        assert fitted > 700


def _fallback(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = w / h
    if in_ratio < ratio[0]:
        bw, bh = w, int(math.floor(w / ratio[0] + 0.5))
    elif in_ratio > ratio[1]:
        bh, bw = h, int(math.floor(h * ratio[1] + 0.5))
    else:
        bh, bw = h, w
    bh, bw = min(bh, h), min(bw, w)
    return (h - bh) // 2, (w - bw) // 2, bh, bw


def _torchvision_rrc_reference(rs: np.random.Generator, h: int, w: int, scale, ratio, n: int) -> np.ndarray:
    """float64 re-statement of torchvision's RandomResizedCrop.get_params with numpy draws: [n, 2] (area, log ratio)."""
    out = np.empty((n, 2))
    for s in range(n):
        for _ in range(10):
            a = h * w * rs.uniform(*scale)
            r = math.exp(rs.uniform(math.log(ratio[0]), math.log(ratio[1])))
            bw, bh = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < bw <= w and 0 < bh <= h:
                break
        else:
            _, _, bh, bw = _fallback(h, w, ratio)
        out[s] = (bh * bw / (h * w), math.log(bw / bh))
    return out


@pytest.mark.parametrize("h,w,scale", [(1000, 1000, (0.4, 1.0)), (300, 500, (0.05, 0.4)), (120, 700, (0.4, 1.0))])
def test_area_and_ratio_distribution_matches_torchvision(h: int, w: int, scale: tuple[float, float]) -> None:
    """Area and log-ratio distributions agree with torchvision's algorithm (rejections included)."""
    seed = _fresh_seed()
    n = 3000
    ratio = (3 / 4, 4 / 3)
    ours = np.empty((n, 2))
    for s in range(n):
        _, _, bh, bw = crop_box(h, w, *scale, *ratio, seed, 0, s, 0)
        ours[s] = (bh * bw / (h * w), math.log(bw / bh))
    ref = _torchvision_rrc_reference(np.random.default_rng(seed), h, w, scale, ratio, n)
    for k in range(2):
        se = math.sqrt(ours[:, k].var() / n + ref[:, k].var() / n)
        assert abs(ours[:, k].mean() - ref[:, k].mean()) < 5 * se + 1e-4, (k, ours[:, k].mean(), ref[:, k].mean())
        for q in (0.1, 0.5, 0.9):
            assert abs(np.quantile(ours[:, k], q) - np.quantile(ref[:, k], q)) < 0.05 * (scale[1] if k == 0 else 1.0)
    assert ours[:, 1].min() >= math.log(3 / 4) - 0.05 and ours[:, 1].max() <= math.log(4 / 3) + 0.05


def test_deterministic_and_stream_sensitive() -> None:
    seed = _fresh_seed()
    a = crop_box(480, 640, 0.05, 0.4, 0.75, 4 / 3, seed, 2, 17, 5)
    assert crop_box(480, 640, 0.05, 0.4, 0.75, 4 / 3, seed, 2, 17, 5) == a
    others = {
        crop_box(480, 640, 0.05, 0.4, 0.75, 4 / 3, seed + 1, 2, 17, 5),
        crop_box(480, 640, 0.05, 0.4, 0.75, 4 / 3, seed, 3, 17, 5),
        crop_box(480, 640, 0.05, 0.4, 0.75, 4 / 3, seed, 2, 18, 5),
        crop_box(480, 640, 0.05, 0.4, 0.75, 4 / 3, seed, 2, 17, 6),
    }
    assert a not in others


def test_uniform_draws_are_uniform() -> None:
    key = _fresh_seed() & 0xFFFFFFFF
    u = np.asarray([uniform01(key, d) for d in range(20000)])
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert hist.min() > 1800 and hist.max() < 2200


@pytest.mark.parametrize("h,w", [(10, 1000), (1000, 10), (3, 2000)])
def test_centre_fallback_when_no_box_fits(h: int, w: int) -> None:
    """Extremely elongated images: no box of ratio in [3/4, 4/3] and area >= 40% fits."""
    seed = _fresh_seed()
    for s in range(20):
        top, left, bh, bw = crop_box(h, w, 0.4, 1.0, 3 / 4, 4 / 3, seed, 0, s, 0)
        in_ratio = w / h
        if in_ratio < 3 / 4:
            ew, eh = w, int(math.floor(w / (3 / 4) + 0.5))
        else:
            eh, ew = h, int(math.floor(h * (4 / 3) + 0.5))
        eh, ew = min(eh, h), min(ew, w)
        assert (top, left, bh, bw) == ((h - eh) // 2, (w - ew) // 2, eh, ew)


def test_full_image_fallback_when_ratio_in_range() -> None:
    """A 1x1 image: any area < 1 px rounds to 0 or to the full image; the fallback is the full image."""
    assert crop_box(1, 1, 0.05, 0.4, 3 / 4, 4 / 3, 0, 0, 0, 0) == (0, 0, 1, 1)


def test_numba_compiled_sampler_matches_python() -> None:
    numba = pytest.importorskip("numba", reason="numba (installed with FFCV) is not available")
    seed = _fresh_seed() & 0xFFFFFFFF

    @numba.njit(fastmath=True)
    def many(hs, ws, seed, out):  # pragma: no cover - compiled
        for s in range(hs.shape[0]):
            for c in range(out.shape[1]):
                lo = 0.4 if c < 2 else 0.05
                hi = 1.0 if c < 2 else 0.4
                b = crop_box(hs[s], ws[s], lo, hi, 0.75, 4.0 / 3.0, seed, 7, s, c)
                for k in range(4):
                    out[s, c, k] = b[k]

    rs = np.random.default_rng(seed)
    hs = rs.integers(2, 600, size=3000).astype(np.int64)
    ws = rs.integers(2, 600, size=3000).astype(np.int64)
    out = np.zeros((3000, 10, 4), dtype=np.int64)
    many(hs, ws, seed, out)
    spec = CropSpec(global_size=8, local_size=4)
    ref = np.stack([crop_boxes(spec, int(hs[s]), int(ws[s]), seed=seed, epoch=7, sample=s) for s in range(3000)])
    np.testing.assert_array_equal(out, ref)


def test_crop_spec_validation() -> None:
    with pytest.raises(ValueError, match="global_scale"):
        CropSpec(global_scale=(0.5, 0.4))
    with pytest.raises(ValueError, match="local_number"):
        CropSpec(local_number=-1)
    with pytest.raises(ValueError, match="ratio"):
        CropSpec(ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="pair"):
        CropSpec(local_scale=0.3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image size"):
        crop_boxes(CropSpec(), 0, 5, seed=0, epoch=0, sample=0)
    spec = CropSpec(global_number=2, local_number=3)
    assert spec.n_crops == 5 and spec.size_of(1) == 224 and spec.size_of(2) == 96
    np.testing.assert_allclose(spec.table()[4], [0.05, 0.4, 0.75, 4 / 3])

"""Batched photometric augmentation: each operation against a float64 reference, and its randomness."""
from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from dino_fast.data import MultiCropAugment, PhotometricParams
from dino_fast.data.augment import SOLARIZE_THRESHOLD, adjust_hue, gaussian_blur, rgb_to_grayscale

MEAN = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float64).view(1, 3, 1, 1)


def _off(**kw: float) -> MultiCropAugment:
    """Every random operation off unless named."""
    args = dict(
        solarization_p=0.0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0, 0.0), local_blur_p=0.0
    )
    args.update(kw)
    return MultiCropAugment(local_crops_number=2, **args)  # type: ignore[arg-type]


def _params(n: int, **kw: torch.Tensor) -> PhotometricParams:
    base = dict(
        flip=torch.zeros(n, dtype=torch.bool),
        jitter=torch.zeros(n, dtype=torch.bool),
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
        order=torch.arange(4).repeat(n, 1),
        gray=torch.zeros(n, dtype=torch.bool),
        blur=torch.zeros(n, dtype=torch.bool),
        sigma=torch.ones(n),
        solarize=torch.zeros(n, dtype=torch.bool),
    )
    base.update(kw)
    return PhotometricParams(**base)


def _u8(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def test_identity_params_give_normalised_input() -> None:
    x = _u8(5, 3, 17, 23)
    out = _off().apply(x, _params(5))
    ref = (x.double() / 255.0 - MEAN) / STD
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_grayscale_equal_channels_and_luma() -> None:
    x = _u8(6, 3, 20, 20)
    gray = torch.tensor([True, False, True, True, False, True])
    out = _off().apply(x, _params(6, gray=gray), normalize=False).double()
    xd = x.double() / 255.0
    luma = 0.299 * xd[:, 0] + 0.587 * xd[:, 1] + 0.114 * xd[:, 2]
    for i in range(6):
        if gray[i]:
            for c in range(3):
                torch.testing.assert_close(out[i, c], luma[i], rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(out[i], xd[i], rtol=0, atol=1e-6)


def test_solarization_inverts_exactly_pixels_at_or_above_threshold() -> None:
    x = _u8(4, 3, 16, 16)
    x[0, 0, 0, :4] = torch.tensor([127, 128, 129, 255], dtype=torch.uint8)
    sol = torch.tensor([True, True, False, True])
    out = _off().apply(x, _params(4, solarize=sol), normalize=False).double()
    p = x.double()
    expect = torch.where(sol.view(-1, 1, 1, 1) & (x >= 128), 255.0 - p, p) / 255.0  # PIL: >= 128 -> 255 - p
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)
    assert SOLARIZE_THRESHOLD == 128 / 255


def test_forward_solarizes_only_second_global_crop() -> None:
    g, loc = _u8(8, 2, 3, 12, 12), _u8(8, 2, 3, 6, 6)
    out = _off(solarization_p=1.0)(g, loc)
    ref = [(g[:, 0].double() / 255 - MEAN) / STD]
    p = g[:, 1].double()
    ref.append((torch.where(g[:, 1] >= 128, 255 - p, p) / 255 - MEAN) / STD)
    ref += [(loc[:, i].double() / 255 - MEAN) / STD for i in range(2)]
    assert len(out) == 4
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.double(), r, rtol=0, atol=1e-5)


def test_flip_is_horizontal_mirror() -> None:
    x = _u8(3, 3, 9, 11)
    out = _off().apply(x, _params(3, flip=torch.tensor([True, False, True])), normalize=False)
    torch.testing.assert_close(out[0], x[0].flip(-1).float() / 255, rtol=0, atol=1e-7)
    torch.testing.assert_close(out[1], x[1].float() / 255, rtol=0, atol=1e-7)


def _blur_reference(img: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """float64 separable Gaussian, replicate borders: img [C, H, W]."""
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-(k**2) / (2 * sigma * sigma))
    w /= w.sum()
    c, h, wd = img.shape
    p = np.pad(img, ((0, 0), (0, 0), (radius, radius)), mode="edge")
    y = sum(w[i] * p[:, :, i : i + wd] for i in range(2 * radius + 1))
    p = np.pad(y, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w[i] * p[:, i : i + h, :] for i in range(2 * radius + 1))


def test_gaussian_blur_matches_float64_reference() -> None:
    x = torch.rand(4, 3, 19, 26)
    sigma = torch.rand(4) * 1.9 + 0.1
    out = gaussian_blur(x, sigma, radius=6)
    for i in range(4):
        ref = _blur_reference(x[i].double().numpy(), float(sigma[i]), 6)
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=0, atol=2e-6)


def test_larger_sigma_removes_more_high_frequency_energy() -> None:
    x = torch.rand(1, 3, 64, 64).repeat(5, 1, 1, 1)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    y = gaussian_blur(x, sigmas, radius=6).double()
    lap = y[..., 1:-1, 1:-1] * 4 - y[..., :-2, 1:-1] - y[..., 2:, 1:-1] - y[..., 1:-1, :-2] - y[..., 1:-1, 2:]
    energy = (lap**2).mean(dim=(1, 2, 3))
    assert torch.all(energy[1:] < energy[:-1]), energy
    assert energy[-1] < 0.05 * energy[0]


def test_hue_matches_colorsys_float64() -> None:
    x = torch.rand(3, 3, 7, 9)
    shift = torch.rand(3) * 0.2 - 0.1
    out = adjust_hue(x, shift)
    for i in range(3):
        for yy in range(7):
            for xx in range(9):
                r, g, b = (float(v) for v in x[i, :, yy, xx].double())
                h, s, v = colorsys.rgb_to_hsv(r, g, b)
                ref = colorsys.hsv_to_rgb((h + float(shift[i])) % 1.0, s, v)
                np.testing.assert_allclose(out[i, :, yy, xx].numpy(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("op", [0, 1, 2])
def test_brightness_contrast_saturation_match_float64(op: int) -> None:
    x = _u8(4, 3, 10, 12)
    f = torch.rand(4) * 0.8 + 0.6
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(4, 1)
    factors[:, op] = f
    out = _off().apply(x, _params(4, jitter=torch.ones(4, dtype=torch.bool), factors=factors), normalize=False).double()
    xd = x.double() / 255
    fv = f.double().view(-1, 1, 1, 1)
    gray = (0.299 * xd[:, 0] + 0.587 * xd[:, 1] + 0.114 * xd[:, 2]).unsqueeze(1)
    if op == 0:
        ref = xd * fv
    elif op == 1:
        ref = fv * xd + (1 - fv) * gray.mean(dim=(1, 2, 3), keepdim=True)
    else:
        ref = fv * xd + (1 - fv) * gray
    torch.testing.assert_close(out, ref.clamp(0, 1), rtol=0, atol=2e-6)


def test_jitter_order_is_respected() -> None:
    """brightness then saturation differs from saturation then brightness once clamping bites."""
    x = _u8(2, 3, 8, 8)
    factors = torch.tensor([[1.4, 1.0, 0.8, 0.0]]).repeat(2, 1)
    order = torch.tensor([[0, 2, 1, 3], [2, 0, 1, 3]])
    out = _off().apply(x, _params(2, jitter=torch.ones(2, dtype=torch.bool), factors=factors, order=order), normalize=False).double()
    xd = x.double() / 255

    def bright(t):
        return (t * 1.4).clamp(0, 1)

    def sat(t):
        g = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]).unsqueeze(0)
        return (0.8 * t + 0.2 * g).clamp(0, 1)

    torch.testing.assert_close(out[0], sat(bright(xd[0])), rtol=0, atol=2e-6)
    torch.testing.assert_close(out[1], bright(sat(xd[1])), rtol=0, atol=2e-6)


def test_sampled_parameters_ranges_and_frequencies() -> None:
    aug = MultiCropAugment()
    n = 40000
    p = aug.sample_params(torch.full((n,), 0.5), torch.full((n,), 0.2))
    lo = torch.tensor([0.6, 0.6, 0.8, -0.1])
    hi = torch.tensor([1.4, 1.4, 1.2, 0.1])
    assert torch.all(p.factors >= lo) and torch.all(p.factors <= hi)
    assert torch.all(p.order.sort(dim=1).values == torch.arange(4))
    assert torch.all((p.sigma >= 0.1) & (p.sigma <= 2.0))
    tol = 4 * math.sqrt(0.25 / n)
    for name, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.2)):
        freq = getattr(p, name).double().mean().item()
        assert abs(freq - prob) < tol, (name, freq)
    # every one of the 24 orders occurs
    codes = (p.order * torch.tensor([64, 16, 4, 1])).sum(1)
    assert codes.unique().numel() == 24
    # per-sample parameters differ within one batch
    assert p.factors[:64].unique(dim=0).shape[0] == 64


def test_forward_blur_and_solarization_probabilities_per_crop() -> None:
    aug = MultiCropAugment(local_crops_number=2)
    b = 20000
    captured: list[PhotometricParams] = []
    orig = aug.sample_params

    def spy(*a, **k):
        out = orig(*a, **k)
        captured.append(out)
        return out

    aug.sample_params = spy  # type: ignore[method-assign]
    aug(_u8(b, 2, 3, 2, 2), _u8(b, 2, 3, 2, 2))
    glob, loc = captured
    tol = 4 * math.sqrt(0.25 / b)
    assert glob.blur[:b].all()  # global crop 1: p = 1.0
    assert abs(glob.blur[b:].double().mean().item() - 0.1) < tol
    assert not glob.solarize[:b].any()
    assert abs(glob.solarize[b:].double().mean().item() - 0.2) < tol
    assert abs(loc.blur.double().mean().item() - 0.5) < tol
    assert not loc.solarize.any()


def test_forward_shapes_dtype_range_and_generator() -> None:
    aug = MultiCropAugment(local_crops_number=3)
    g, loc = _u8(4, 2, 3, 32, 32), _u8(4, 3, 3, 16, 16)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    state = gen.get_state()
    out = aug(g, loc, generator=gen)
    assert [tuple(o.shape) for o in out] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(o.dtype == torch.float32 and o.device == g.device for o in out)
    for o in out:
        un = o.double() * STD + MEAN
        assert un.min() >= -1e-5 and un.max() <= 1 + 1e-5
    gen.set_state(state)
    again = aug(g, loc, generator=gen)
    for a, b in zip(out, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # two samples of the same batch with identical pixels come out different
    same = _u8(1, 2, 3, 32, 32).repeat(4, 1, 1, 1, 1)
    o = aug(same, _u8(4, 3, 3, 16, 16))[0]
    assert not torch.allclose(o[0], o[1])


def test_bad_inputs() -> None:
    aug = MultiCropAugment(local_crops_number=2)
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.rand(2, 2, 3, 8, 8), _u8(2, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected 2 local crops"):
        aug(_u8(2, 2, 3, 8, 8), _u8(2, 3, 3, 4, 4))
    with pytest.raises(ValueError, match="disagree on B"):
        aug(_u8(2, 2, 3, 8, 8), _u8(3, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="probability"):
        MultiCropAugment(jitter_p=1.5)
    with pytest.raises(ValueError, match="hue"):
        MultiCropAugment(hue=0.7)
    assert rgb_to_grayscale(torch.ones(1, 3, 2, 2)).shape == (1, 1, 2, 2)

"""Batched photometric augmentation of DINO's multi-crop, with per-sample random parameters.

The official DINO ``DataAugmentationDINO`` applies, per crop and per image (on PIL images):

    RandomHorizontalFlip(0.5)
    RandomApply(ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1), p=0.8)
        (the four adjustments in a random order)
    RandomGrayscale(0.2)
    GaussianBlur(p, sigma ~ U(0.1, 2.0))    p = 1.0 global crop 1, 0.1 global crop 2, 0.5 locals
    Solarization(0.2)                       global crop 2 only; pixels >= 128 become 255 - pixel
    ToTensor, Normalize(ImageNet mean, std)

:class:`MultiCropAugment` runs the same operations on whole uint8 batches of crops (on the
batch's device), every sample drawing its own flip, jitter factors and order, grayscale, blur
sigma and solarization. Arithmetic is float32 in [0, 1] (torchvision's tensor semantics:
brightness ``x*f``, contrast blends with the mean of the grayscale image, saturation blends with
the grayscale image, hue rotates H in HSV, every step clamped to [0, 1]); the Gaussian blur is a
separable convolution truncated at 3 sigma with replicated borders (PIL's blur is an iterated box
approximation of the same Gaussian).

Randomness: either a ``torch.Generator`` (one stream for the whole batch, so a sample's
parameters depend on its position in the batch), or, with ``sample_ids``, a counter-based hash
of ``(seed, epoch, global sample index, crop, draw)`` (the hash of :mod:`dino_fast.data.crops`,
draws 64.. of the crop's stream; draws 0..39 pick its box). With ``sample_ids`` a sample's
parameters do not depend on the batch it is in nor on how the batch is split across ranks: a
run on W ranks at batch b augments exactly as one process at batch W*b.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_fast.utils.image_stats import IMAGENET_MEAN, IMAGENET_STD, LUMA_WEIGHTS

__all__ = ["MultiCropAugment", "PhotometricParams", "rgb_to_grayscale", "adjust_hue", "gaussian_blur", "RAND_OPS",
           "StrongParams", "strong_params_counter", "rand_augment", "random_erasing",
           "counter_uniform"]

SOLARIZE_THRESHOLD = 128.0 / 255.0


@dataclass
class PhotometricParams:
    """Random parameters of N crops (all tensors have leading dimension N, on one device).

    Attributes:
        flip: bool [N] horizontal flip.
        jitter: bool [N] colour jitter applied.
        factors: float32 [N, 4] brightness, contrast, saturation factors and hue shift.
        order: int64 [N, 4] a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue).
        gray: bool [N] converted to grayscale.
        blur: bool [N] Gaussian blur applied.
        sigma: float32 [N] blur standard deviation in pixels.
        solarize: bool [N] solarized.
    """

    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    gray: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor

    def to(self, device: torch.device) -> "PhotometricParams":
        """Copy of the parameters on ``device``."""
        return PhotometricParams(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


_M32 = np.uint64(0xFFFFFFFF)
_PHOTOMETRIC_DRAW0 = 64  # draws 0..39 of a crop's stream choose its box (crops.crop_box)
_N_DRAWS = 14  # 10 Bernoulli/uniform draws + 4 for the jitter order


def _lowbias32_np(x: np.ndarray) -> np.ndarray:
    """Vectorised :func:`dino_fast.data.crops._lowbias32` on uint64 arrays (values < 2**32)."""
    x = x & _M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    x ^= x >> np.uint64(16)
    return x


def counter_uniform(seed: int, epoch: int, samples: np.ndarray, crops: np.ndarray, n_draws: int,
                    first_draw: int = _PHOTOMETRIC_DRAW0) -> np.ndarray:
    """Counter-based uniforms: float32 ``[N, n_draws]`` in [0, 1) (24 random bits each).

    Entry ``[n, j]`` is a pure function of ``(seed, epoch, samples[n], crops[n], first_draw + j)``,
    bit-identical to the key/draw hash of :func:`dino_fast.data.crops.crop_box` (truncated to 24
    bits so that float32 represents it exactly, hence never rounds up to 1.0).

    Args:
        seed, epoch: non-negative ints.
        samples, crops: int arrays ``[N]`` (global sample index, crop index), non-negative.
        n_draws: draws per row.
    """
    samples = np.asarray(samples, dtype=np.int64)
    crops = np.asarray(crops, dtype=np.int64)
    if samples.shape != crops.shape or samples.ndim != 1:
        raise ValueError(f"samples and crops must be 1-D of one length, got {samples.shape} and {crops.shape}")
    if seed < 0 or epoch < 0 or (samples.size and (samples.min() < 0 or crops.min() < 0)):
        raise ValueError("seed, epoch, samples and crops must be >= 0")
    m32 = 0xFFFFFFFF
    h = _lowbias32_np(np.full(samples.shape, (seed & m32) ^ 0x9E3779B9, dtype=np.uint64))
    h = _lowbias32_np(h ^ np.uint64((seed >> 32) & m32))
    h = _lowbias32_np(h ^ np.uint64(epoch & m32))
    su = samples.astype(np.uint64)
    h = _lowbias32_np(h ^ (su & _M32))
    h = _lowbias32_np(h ^ (su >> np.uint64(32)))
    key = _lowbias32_np(h ^ (crops.astype(np.uint64) & _M32))
    draws = np.arange(first_draw, first_draw + n_draws, dtype=np.uint64)
    dk = _lowbias32_np((draws * np.uint64(0x632BE5AB) + np.uint64(0x2545F491)) & _M32)
    out = _lowbias32_np(key[:, None] ^ dk[None, :])
    return ((out >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma (ITU-R 601-2, as PIL's ``convert('L')``) of float RGB ``[N, 3, H, W]`` -> ``[N, 1, H, W]``."""
    y = x[:, 0:1] * LUMA_WEIGHTS[0]
    y.add_(x[:, 1:2], alpha=LUMA_WEIGHTS[1]).add_(x[:, 2:3], alpha=LUMA_WEIGHTS[2])
    return y


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of float RGB ``[N, 3, H, W]`` in [0, 1] by ``shift`` (float ``[N]``, turns).

    Same result as RGB -> HSV, ``h = (h + shift) mod 1``, HSV -> RGB (torchvision's
    ``adjust_hue`` on tensors), written as ``c = V - (V - min) * clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6h) mod 6``, n = 5, 3, 1 for R, G, B: fewer passes over the pixels.
    """
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(1)
    cr = maxc - x.amin(1)
    crd = torch.where(cr == 0, 1.0, cr)
    h6 = torch.where(argmax == 0, (g - b) / crd, torch.where(argmax == 1, (b - r) / crd + 2.0, (r - g) / crd + 4.0))
    h6 = h6 + (6.0 * shift).to(x.dtype).view(-1, 1, 1)
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + n, 6.0)
        t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.addcmul(maxc, cr, t, value=-1.0, out=out[:, c])
    return out


def gaussian_blur(x: Tensor, sigma: Tensor, radius: Optional[int] = None) -> Tensor:
    """Blur each image of float ``[N, C, H, W]`` with its own sigma (float ``[N]``, pixels).

    Separable Gaussian truncated at ``radius`` pixels (default ``ceil(3 * max(sigma))``),
    replicated borders.
    """
    n, c, h, w = x.shape
    if n == 0:
        return x
    if radius is None:
        radius = int(torch.ceil(3.0 * sigma.max()).item())
    radius = max(1, min(radius, max(h, w) - 1))
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).view(n, 1)
    weight = torch.exp(-(k.view(1, -1) ** 2) / (2.0 * s * s))
    weight = weight / weight.sum(1, keepdim=True)  # [N, K]
    weight = weight.repeat_interleave(c, dim=0)  # [N*C, K]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), weight.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), weight.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def _adjust(x: Tensor, op: int, f: Tensor) -> Tensor:
    """One colour-jitter step ``op`` on float ``[n, 3, H, W]`` with per-sample factor ``f [n]``."""
    fv = f.to(x.dtype).view(-1, 1, 1, 1)
    if op == 0:  # brightness: blend with black
        return (x * fv).clamp_(0.0, 1.0)
    if op == 1:  # contrast: blend with the mean of the grayscale image
        mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return torch.lerp(mean.expand_as(x), x, fv).clamp_(0.0, 1.0)
    if op == 2:  # saturation: blend with the grayscale image
        return torch.lerp(rgb_to_grayscale(x).expand_as(x), x, fv).clamp_(0.0, 1.0)
    return adjust_hue(x, f)


class MultiCropAugment(nn.Module):
    """The photometric part of DINO's augmentation on uint8 multi-crop batches (module doc).

    Args:
        local_crops_number: expected number of local crops L (checked in forward).
        solarization_p: solarization probability of the second global crop (of every odd one).
        flip_p: horizontal flip probability.
        jitter_p: colour-jitter probability.
        brightness, contrast, saturation: jitter strengths (factor ~ U(max(0, 1-v), 1+v)).
        hue: hue shift ~ U(-hue, hue), 0 <= hue <= 0.5.
        grayscale_p: grayscale probability.
        global_blur_p: blur probabilities of the first and second global recipes (even and odd
            global crops).
        local_blur_p: blur probability of the local crops.
        blur_sigma: (lo, hi) range of the blur sigma in pixels.
        mean, std: per-channel normalisation.
        strong_p: probability of the strong recipe (Mugs' student crops; 0 disables it, the
            default): the global crops from ``strong_from_crop`` on are strong together per image,
            each local crop independently. Strong = flip, RandAugment (rand-m9-mstd0.5-inc1),
            normalise, RandomErasing 0.25 (:func:`rand_augment`, :func:`random_erasing`), in
            place of the weak recipe. After a forward, :attr:`last_weak` (bool [B]) says which
            images' eligible global crops were weak (None when ``strong_p == 0``).
        strong_from_crop: the first global crop index the strong recipe may replace.
    """

    def __init__(
        self,
        local_crops_number: int = 8,
        *,
        solarization_p: float = 0.2,
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        global_blur_p: tuple[float, float] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        strong_p: float = 0.0,
        strong_from_crop: int = 2,
    ) -> None:
        super().__init__()
        if not isinstance(strong_p, (int, float)) or not 0.0 <= float(strong_p) <= 1.0:
            raise ValueError(f"strong_p must be a probability in [0, 1], got {strong_p!r}")
        if not isinstance(strong_from_crop, int) or strong_from_crop < 0:
            raise ValueError(f"strong_from_crop must be an int >= 0, got {strong_from_crop!r}")
        self.strong_p = float(strong_p)
        self.strong_from_crop = strong_from_crop
        self.last_weak: Optional[Tensor] = None
        if not isinstance(local_crops_number, int) or local_crops_number < 0:
            raise ValueError(f"local_crops_number must be an int >= 0, got {local_crops_number!r}")
        probs = {
            "solarization_p": solarization_p,
            "flip_p": flip_p,
            "jitter_p": jitter_p,
            "grayscale_p": grayscale_p,
            "local_blur_p": local_blur_p,
            "global_blur_p[0]": global_blur_p[0],
            "global_blur_p[1]": global_blur_p[1],
        }
        for name, p in probs.items():
            if not isinstance(p, (int, float)) or not (0.0 <= float(p) <= 1.0):
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a float >= 0, got {v!r}")
        if not isinstance(hue, (int, float)) or not (0.0 <= hue <= 0.5):
            raise ValueError(f"hue must be a float in [0, 0.5], got {hue!r}")
        lo, hi = blur_sigma
        if not (0.0 < lo <= hi):
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {blur_sigma!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 entries, std > 0; got mean={mean!r}, std={std!r}")
        self.local_crops_number = local_crops_number
        self.solarization_p = float(solarization_p)
        self.flip_p = float(flip_p)
        self.jitter_p = float(jitter_p)
        self.jitter_ranges = (
            (max(0.0, 1.0 - brightness), 1.0 + brightness),
            (max(0.0, 1.0 - contrast), 1.0 + contrast),
            (max(0.0, 1.0 - saturation), 1.0 + saturation),
            (-float(hue), float(hue)),
        )
        self.grayscale_p = float(grayscale_p)
        self.global_blur_p = (float(global_blur_p[0]), float(global_blur_p[1]))
        self.local_blur_p = float(local_blur_p)
        self.blur_sigma = (float(lo), float(hi))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- parameters -------------------------------------------------------------------------------
    def sample_params(
        self,
        blur_p: Tensor,
        solarize_p: Tensor,
        *,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
    ) -> PhotometricParams:
        """Draw the parameters of N crops whose blur / solarization probabilities are given.

        Args:
            blur_p, solarize_p: float [N] per-crop probabilities.
            generator: random source (its device is used), else the default generator of ``device``.
            device: where to draw when no generator is given (default CPU).
        """
        n = blur_p.shape[0]
        dev = generator.device if generator is not None else (device or torch.device("cpu"))
        u = torch.rand((n, 10), generator=generator, device=dev)
        order = torch.rand((n, 4), generator=generator, device=dev).argsort(dim=1)
        return self._params_from_uniforms(u, order, blur_p, solarize_p)

    def sample_params_counter(
        self, blur_p: Tensor, solarize_p: Tensor, *, seed: int, epoch: int, samples: np.ndarray,
        crops: np.ndarray, device: Optional[torch.device] = None,
    ) -> PhotometricParams:
        """Parameters of N crops from the counter-based hash (see the module doc).

        Args:
            blur_p, solarize_p: float [N] per-crop probabilities.
            seed, epoch: ints >= 0 naming the stream.
            samples, crops: int [N] global sample index and crop index of every row.
            device: where the parameters live (default CPU).
        """
        dev = device or torch.device("cpu")
        u_all = torch.from_numpy(counter_uniform(seed, epoch, samples, crops, _N_DRAWS)).to(dev)
        return self._params_from_uniforms(u_all[:, :10], u_all[:, 10:].argsort(dim=1), blur_p, solarize_p)

    def _params_from_uniforms(self, u: Tensor, order: Tensor, blur_p: Tensor, solarize_p: Tensor) -> PhotometricParams:
        dev = u.device
        lo = torch.tensor([r[0] for r in self.jitter_ranges], device=dev)
        hi = torch.tensor([r[1] for r in self.jitter_ranges], device=dev)
        s_lo, s_hi = self.blur_sigma
        return PhotometricParams(
            flip=u[:, 0] < self.flip_p,
            jitter=u[:, 1] < self.jitter_p,
            factors=lo + (hi - lo) * u[:, 2:6],
            order=order,
            gray=u[:, 6] < self.grayscale_p,
            blur=u[:, 7] < blur_p.to(dev),
            sigma=s_lo + (s_hi - s_lo) * u[:, 8],
            solarize=u[:, 9] < solarize_p.to(dev),
        )

    # -- application ------------------------------------------------------------------------------
    def apply(self, crops: Tensor, params: PhotometricParams, *, normalize: bool = True) -> Tensor:
        """Augment uint8 ``[N, 3, H, W]`` with ``params`` (on the crops' device).

        Returns float32 ``[N, 3, H, W]``: normalised with ``mean``/``std`` when ``normalize``,
        else in [0, 1].
        """
        if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1] != 3:
            raise TypeError(f"expected uint8 crops [N, 3, H, W], got {crops.dtype} {tuple(crops.shape)}")
        p = params.to(crops.device)
        x = crops.to(torch.float32).mul_(1.0 / 255.0)
        idx = p.flip.nonzero().squeeze(1)
        if idx.numel():
            x[idx] = x[idx].flip(-1)
        if bool(p.jitter.any()):
            for step in range(4):
                for op in range(4):
                    idx = (p.jitter & (p.order[:, step] == op)).nonzero().squeeze(1)
                    if idx.numel():
                        x[idx] = _adjust(x[idx], op, p.factors[idx, op])
        idx = p.gray.nonzero().squeeze(1)
        if idx.numel():
            x[idx] = rgb_to_grayscale(x[idx]).expand(-1, 3, -1, -1)
        idx = p.blur.nonzero().squeeze(1)
        if idx.numel():
            x[idx] = gaussian_blur(x[idx], p.sigma[idx], radius=math.ceil(3.0 * self.blur_sigma[1]))
        idx = p.solarize.nonzero().squeeze(1)
        if idx.numel():
            xs = x[idx]
            x[idx] = torch.where(xs >= SOLARIZE_THRESHOLD, 1.0 - xs, xs)
        if normalize:
            inv_std = 1.0 / self.std.to(x.device)
            x = torch.addcmul(-self.mean.to(x.device) * inv_std, x, inv_std)
        return x

    def forward(
        self, global_crops: Tensor, local_crops: Tensor, generator: Optional[torch.Generator] = None,
        *, sample_ids: Union[Tensor, np.ndarray, Sequence[int], None] = None, seed: int = 0, epoch: int = 0,
    ) -> list[Tensor]:
        """Augment a multi-crop batch.

        Args:
            global_crops: uint8 ``[B, G, 3, Gs, Gs]``.
            local_crops: uint8 ``[B, L, 3, Ls, Ls]`` with ``L == local_crops_number``.
            generator: random source (any device); default: the global generator of the input's
                device. Ignored when ``sample_ids`` is given.
            sample_ids: int ``[B]`` global dataset index of every sample: the parameters are then
                a pure function of ``(seed, epoch, sample id, crop)`` (independent of the batch
                composition and of the rank).
            seed, epoch: name the counter-based stream (used with ``sample_ids`` only).

        Returns:
            ``G + L`` float32 tensors ``[B, 3, *, *]``, normalised, crop-major (global 1,
            global 2, ..., local 1, ...), on the input's device.
        """
        for name, t in (("global_crops", global_crops), ("local_crops", local_crops)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.uint8 or t.dim() != 5 or t.shape[2] != 3:
                raise TypeError(f"{name} must be uint8 [B, N, 3, S, S], got {t.dtype} {tuple(t.shape)}")
        b, g = global_crops.shape[:2]
        if local_crops.shape[0] != b:
            raise ValueError(f"global_crops and local_crops disagree on B: {b} vs {local_crops.shape[0]}")
        if local_crops.shape[1] != self.local_crops_number:
            raise ValueError(f"expected {self.local_crops_number} local crops, got {local_crops.shape[1]}")
        if g < 1:
            raise ValueError("need at least one global crop")
        if local_crops.device != global_crops.device:
            raise ValueError(f"global and local crops on different devices: {global_crops.device} vs {local_crops.device}")
        dev = global_crops.device
        ids: Optional[np.ndarray] = None
        if sample_ids is not None:
            ids = (sample_ids.detach().cpu().numpy() if isinstance(sample_ids, Tensor)
                   else np.asarray(sample_ids)).astype(np.int64, copy=False)
            if ids.shape != (b,):
                raise ValueError(f"sample_ids must have shape ({b},) (one id per sample), got {ids.shape}")
            for name, v in (("seed", seed), ("epoch", epoch)):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                    raise ValueError(f"{name} must be an int >= 0, got {v!r}")

        def params_for(first_crop: int, n_crops: int, blur_p: Tensor, sol_p: Tensor) -> PhotometricParams:
            if ids is None:
                return self.sample_params(blur_p, sol_p, generator=generator, device=dev)
            crops = np.repeat(np.arange(first_crop, first_crop + n_crops, dtype=np.int64), b)
            return self.sample_params_counter(blur_p, sol_p, seed=int(seed), epoch=int(epoch),
                                              samples=np.tile(ids, n_crops), crops=crops, device=dev)

        if self.strong_p > 0 and ids is None:  # the strong parameters come from the counter hash
            gen_dev = generator.device if generator is not None else dev
            ids = torch.randint(0, 2**31 - 1, (b,), generator=generator, device=gen_dev).cpu().numpy()
        out: list[Tensor] = []
        # crop-major rows: row = crop * B + sample
        # global crops alternate between the two recipes: even crops the first (blur p 1.0, no
        # solarization), odd crops the second; with G = 2 that is DINO's, with G = 4 (Mugs) the
        # student's global crops 2, 3 are fresh samples of the teacher's recipes 0, 1
        crop_idx = torch.arange(g).repeat_interleave(b)
        first = crop_idx % 2 == 0
        blur_p = torch.where(first, self.global_blur_p[0], self.global_blur_p[1])
        sol_p = torch.where(first, 0.0, self.solarization_p)
        params = params_for(0, g, blur_p, sol_p)
        g_rows = global_crops.transpose(0, 1).reshape(g * b, *global_crops.shape[2:])
        xg = self.apply(g_rows, params)
        self.last_weak = None
        if self.strong_p > 0 and g > self.strong_from_crop:
            assert ids is not None
            u = counter_uniform(int(seed), int(epoch), ids, np.full(b, self.strong_from_crop), 1,
                                first_draw=_STRONG_CHOICE_DRAW)[:, 0]
            strong_img = torch.from_numpy(u < self.strong_p)
            self.last_weak = (~strong_img).to(dev)
            rows = (torch.arange(g * b) >= self.strong_from_crop * b) & strong_img.repeat(g)
            self._replace_strong(xg, g_rows, rows, params.flip, np.tile(ids, g), crop_idx.numpy(), seed, epoch)
        out.extend(xg.split(b))
        ln = local_crops.shape[1]
        if ln:
            blur_p = torch.full((ln * b,), self.local_blur_p)
            params = params_for(g, ln, blur_p, torch.zeros(ln * b))
            l_rows = local_crops.transpose(0, 1).reshape(ln * b, *local_crops.shape[2:])
            xl = self.apply(l_rows, params)
            if self.strong_p > 0:
                assert ids is not None
                crops = np.repeat(np.arange(g, g + ln, dtype=np.int64), b)
                u = counter_uniform(int(seed), int(epoch), np.tile(ids, ln), crops, 1, first_draw=_STRONG_CHOICE_DRAW)
                rows = torch.from_numpy(u[:, 0] < self.strong_p)
                self._replace_strong(xl, l_rows, rows, params.flip, np.tile(ids, ln), crops, seed, epoch)
            out.extend(xl.split(b))
        return out

    def _replace_strong(self, x: Tensor, crops_u8: Tensor, rows: Tensor, flip: Tensor, samples: np.ndarray,
                        crop_ids: np.ndarray, seed: int, epoch: int) -> None:
        """Overwrite the rows ``rows`` (bool [N]) of the weakly augmented ``x`` with the strong
        recipe of their uint8 crops: flip, RandAugment, normalise, RandomErasing (in place)."""
        idx = rows.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        sel = idx.numpy()
        h, w = crops_u8.shape[-2:]
        sp = strong_params_counter(int(seed), int(epoch), samples[sel], crop_ids[sel], h, w)
        dev_idx = idx.to(x.device)
        y = crops_u8[dev_idx].to(torch.float32).mul_(1.0 / 255.0)
        fl = flip.to(x.device)[dev_idx]
        y = torch.where(fl.view(-1, 1, 1, 1), y.flip(-1), y)
        y = rand_augment(y, sp)
        inv_std = 1.0 / self.std.to(y.device)
        y = torch.addcmul(-self.mean.to(y.device) * inv_std, y, inv_std)
        x[dev_idx] = random_erasing(y, sp)

    def extra_repr(self) -> str:
        return (
            f"local_crops_number={self.local_crops_number}, flip_p={self.flip_p}, jitter_p={self.jitter_p}, "
            f"jitter_ranges={self.jitter_ranges}, grayscale_p={self.grayscale_p}, global_blur_p={self.global_blur_p}, "
            f"local_blur_p={self.local_blur_p}, blur_sigma={self.blur_sigma}, solarization_p={self.solarization_p}"
        )


# ------------------------------------------------------------------------------------------------
# Strong augmentation (Mugs' student crops): RandAugment "rand-m9-mstd0.5-inc1" and RandomErasing
# ------------------------------------------------------------------------------------------------
# timm's increasing RandAugment ops, in timm's order (_RAND_INCREASING_TRANSFORMS)
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
            "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
            "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_FILL = (124, 116, 104)  # timm's img_mean fill of the geometric ops (ImageNet mean in levels)
_STRONG_DRAW0 = 256  # first draw of the strong-augmentation parameters in a crop's stream
_STRONG_CHOICE_DRAW = 320  # the draw that decides strong / weak (of crop strong_from_crop for global crops)
_STRONG_LAYER_DRAWS = 5  # op, apply, 2 for the Gaussian magnitude, sign
_ERASE_DRAWS = 1 + 40 + 1  # apply, 10 attempts x (area, ratio, top, left), noise seed


@dataclass
class StrongParams:
    """Per-crop parameters of RandAugment + RandomErasing (N crops, on one device).

    Attributes:
        op: int64 [N, L] index into :data:`RAND_OPS` of each of the L layers.
        apply: bool [N, L] whether the layer's op runs (timm: probability 0.5).
        magnitude: float32 [N, L] in [0, 10] (Gaussian around the base magnitude, clipped).
        negate: bool [N, L] the sign of the signed ops (rotate, shear, translate, enhance).
        erase_box: int64 [N, 4] ``(top, left, h, w)`` of the erased rectangle, ``h = 0``: none.
        noise_seed: int64 [N] seed of the erased pixels' N(0, 1) noise.
    """

    op: Tensor
    apply: Tensor
    magnitude: Tensor
    negate: Tensor
    erase_box: Tensor
    noise_seed: Tensor


def strong_params_counter(
    seed: int, epoch: int, samples: np.ndarray, crops: np.ndarray, height: int, width: int, *,
    num_layers: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5,
    erase_p: float = 0.25, erase_scale: tuple[float, float] = (0.02, 1.0 / 3.0),
    erase_ratio: tuple[float, float] = (0.3, 1.0 / 0.3),
) -> StrongParams:
    """The parameters of N crops from the counter hash of (seed, epoch, sample, crop) (draws from
    :data:`_STRONG_DRAW0` on, so a sample's parameters do not depend on the batch nor on the rank).

    timm semantics: each of ``num_layers`` layers picks one of the 15 ops uniformly (with
    replacement) and runs it with probability ``prob`` at magnitude ``N(magnitude, magnitude_std)``
    clipped to [0, 10]; RandomErasing (``erase_p``) tries 10 times for a box of area
    ``U(erase_scale)`` of the crop and log-uniform aspect ``erase_ratio`` that fits strictly.
    """
    samples = np.asarray(samples, dtype=np.int64)
    crops = np.asarray(crops, dtype=np.int64)
    n_draws = num_layers * _STRONG_LAYER_DRAWS + _ERASE_DRAWS
    u = counter_uniform(seed, epoch, samples, crops, n_draws, first_draw=_STRONG_DRAW0).astype(np.float64)
    n = samples.shape[0]
    lay = u[:, : num_layers * _STRONG_LAYER_DRAWS].reshape(n, num_layers, _STRONG_LAYER_DRAWS)
    op = np.minimum((lay[..., 0] * len(RAND_OPS)).astype(np.int64), len(RAND_OPS) - 1)
    gauss = np.sqrt(-2.0 * np.log1p(-lay[..., 2])) * np.cos(2.0 * np.pi * lay[..., 3])
    mag = np.clip(magnitude + magnitude_std * gauss, 0.0, 10.0) if magnitude_std > 0 else np.full(op.shape, magnitude)
    e = u[:, num_layers * _STRONG_LAYER_DRAWS:]
    box = np.zeros((n, 4), dtype=np.int64)
    area = float(height * width)
    for i in range(n):
        if e[i, 0] >= erase_p:
            continue
        for a in range(10):
            ua, ur, ut, ul = e[i, 1 + 4 * a: 5 + 4 * a]
            target = area * (erase_scale[0] + (erase_scale[1] - erase_scale[0]) * ua)
            lo, hi = math.log(erase_ratio[0]), math.log(erase_ratio[1])
            aspect = math.exp(lo + (hi - lo) * ur)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < w < width and 0 < h < height:
                box[i] = (int(ut * (height - h + 1)), int(ul * (width - w + 1)), h, w)
                break
    return StrongParams(
        op=torch.from_numpy(op), apply=torch.from_numpy(lay[..., 1] < prob),
        magnitude=torch.from_numpy(mag.astype(np.float32)), negate=torch.from_numpy(lay[..., 4] < 0.5),
        erase_box=torch.from_numpy(box), noise_seed=torch.from_numpy((e[:, -1] * 2**31).astype(np.int64)),
    )


def _affine_matrices(op: str, m: Tensor, neg: Tensor, h: int, w: int) -> Tensor:
    """[n, 2, 3] output -> input maps (PIL's AFFINE convention, continuous pixel coordinates with
    pixel centres at +0.5) of the geometric ops at magnitudes ``m`` with signs ``neg``."""
    n = m.shape[0]
    sign = torch.where(neg, -1.0, 1.0).to(torch.float64)
    lv = m.to(torch.float64) / 10.0
    mat = torch.zeros(n, 2, 3, dtype=torch.float64)
    mat[:, 0, 0] = 1.0
    mat[:, 1, 1] = 1.0
    if op == "ShearX":
        mat[:, 0, 1] = lv * 0.3 * sign
    elif op == "ShearY":
        mat[:, 1, 0] = lv * 0.3 * sign
    elif op == "TranslateXRel":
        mat[:, 0, 2] = lv * 0.45 * sign * w
    elif op == "TranslateYRel":
        mat[:, 1, 2] = lv * 0.45 * sign * h
    else:  # Rotate: PIL's img.rotate(deg) (counter-clockwise) about the centre (w/2, h/2)
        a = -torch.deg2rad(lv * 30.0 * sign)
        c, s = torch.cos(a), torch.sin(a)
        cx, cy = w / 2.0, h / 2.0
        mat[:, 0, 0], mat[:, 0, 1], mat[:, 1, 0], mat[:, 1, 1] = c, s, -s, c
        mat[:, 0, 2] = cx - c * cx - s * cy
        mat[:, 1, 2] = cy + s * cx - c * cy
    return mat


def _geometric(x: Tensor, mat: Tensor, fill: Tensor) -> Tensor:
    """Bilinear affine warp of levels ``x`` [n, 3, H, W] by output->input ``mat`` [n, 2, 3];
    outside the input: ``fill`` [3] (PIL's fillcolor)."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    src = pts @ mat.transpose(1, 2)                                        # [n, H*W, 2] input coords
    inside = (src[..., 0] >= 0) & (src[..., 0] < w) & (src[..., 1] >= 0) & (src[..., 1] < h)
    grid = torch.stack([2 * src[..., 0] / w - 1, 2 * src[..., 1] / h - 1], -1).view(n, h, w, 2).to(x.dtype)
    out = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)
    keep = inside.view(n, 1, h, w).to(x.device)
    return torch.where(keep, out, fill.view(1, 3, 1, 1).to(x.dtype).to(x.device))


def _gray_levels(x: Tensor) -> Tensor:
    """PIL's ``convert('L')`` of levels [n, 3, H, W]: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``."""
    return torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536.0)


def _blend(degenerate: Tensor, x: Tensor, f: Tensor) -> Tensor:
    """PIL ``Image.blend(degenerate, x, f)`` on levels: clipped to [0, 255], truncated (PIL's cast)."""
    return torch.floor((degenerate + f.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0.0, 255.0))


def _equalize(x: Tensor) -> Tensor:
    """PIL ``ImageOps.equalize`` per image and channel on integer levels [n, 3, H, W]."""
    n, c, h, w = x.shape
    v = x.long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    last = 255 - torch.flip((hist > 0).long(), [1]).argmax(1)               # last non-empty level
    step = (hist.sum(1) - hist.gather(1, last[:, None])[:, 0]) // 255
    cum = torch.cumsum(hist, 1) - hist                                      # n before level i
    lut = torch.clamp((cum + (step // 2)[:, None]) // step.clamp_min(1)[:, None], max=255)
    lut = torch.where((step > 0)[:, None], lut, torch.arange(256, device=x.device).expand(n * c, 256))
    return lut.gather(1, v).view(n, c, h, w).to(x.dtype)


def _sharpness_degenerate(x: Tensor) -> Tensor:
    """PIL's ``ImageFilter.SMOOTH`` ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded), borders kept."""
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13.0
    n, c, h, w = x.shape
    y = F.conv2d(x.reshape(n * c, 1, h, w), k.view(1, 1, 3, 3)).view(n, c, h - 2, w - 2)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = torch.floor(y + 0.5)
    return out


def _apply_op(name: str, x: Tensor, m: Tensor, neg: Tensor) -> Tensor:
    """One RandAugment op on levels ``x`` [n, 3, H, W] (float, integer-valued in [0, 255]) at
    magnitudes ``m`` [n] and signs ``neg`` [n]; returns integer-valued levels (PIL's uint8 result)."""
    lv = (m / 10.0).to(x.dtype).to(x.device)
    sign = torch.where(neg, -1.0, 1.0).to(x.dtype).to(x.device)
    if name == "AutoContrast":
        lo = x.amin((2, 3), keepdim=True)
        hi = x.amax((2, 3), keepdim=True)
        scale = 255.0 / (hi - lo).clamp_min(1.0)
        out = torch.floor(x * scale - lo * scale).clamp_(0, 255)             # PIL: int(i * scale + offset)
        return torch.where(hi > lo, out, x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255.0 - x
    if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        mat = _affine_matrices(name, m, neg, x.shape[2], x.shape[3])
        return torch.floor(_geometric(x, mat, torch.tensor(RAND_FILL, dtype=x.dtype)) + 0.5).clamp_(0, 255)
    if name == "PosterizeIncreasing":
        bits = (4 - torch.floor(lv * 4)).view(-1, 1, 1, 1)                    # 4 - int(level * 4)
        q = torch.pow(2.0, 8 - bits)
        return torch.floor(x / q) * q
    if name == "SolarizeIncreasing":
        thresh = (256 - torch.floor(lv * 256)).view(-1, 1, 1, 1)
        return torch.where(x >= thresh, 255.0 - x, x)
    if name == "SolarizeAdd":
        add = torch.floor(lv * 110).view(-1, 1, 1, 1)
        return torch.where(x < 128, (x + add).clamp_(max=255.0), x)
    f = 1.0 + sign * lv * 0.9                                                # the enhance ops' factor
    if name == "ColorIncreasing":
        return _blend(_gray_levels(x).expand_as(x), x, f)
    if name == "ContrastIncreasing":
        mean = torch.floor(_gray_levels(x).mean((1, 2, 3), keepdim=True) + 0.5)
        return _blend(mean.expand_as(x), x, f)
    if name == "BrightnessIncreasing":
        return _blend(torch.zeros_like(x), x, f)
    if name == "SharpnessIncreasing":
        return _blend(_sharpness_degenerate(x), x, f)
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {RAND_OPS}")


def rand_augment(x: Tensor, params: StrongParams) -> Tensor:
    """Batched RandAugment of float RGB ``x`` [N, 3, H, W] in [0, 1] (quantised to 8-bit levels,
    as PIL images are); returns float [N, 3, H, W] in [0, 1]. Each sample runs its own layers
    (``params.op``/``apply``/``magnitude``/``negate``, [N, L]); samples that share an op in a layer
    run it in one batched call. Geometric ops are bilinear (timm draws bilinear or bicubic)."""
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise TypeError(f"x: expected float RGB [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
    if params.op.shape[0] != x.shape[0]:
        raise ValueError(f"params: expected {x.shape[0]} rows (one per image), got {params.op.shape[0]}")
    y = torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5)
    dev = x.device
    for layer in range(params.op.shape[1]):
        for k, name in enumerate(RAND_OPS):
            idx = ((params.op[:, layer] == k) & params.apply[:, layer]).nonzero().squeeze(1)
            if idx.numel():
                y[idx.to(dev)] = _apply_op(name, y[idx.to(dev)], params.magnitude[idx, layer], params.negate[idx, layer])
    return y / 255.0


def random_erasing(x: Tensor, params: StrongParams) -> Tensor:
    """timm's ``RandomErasing(mode='pixel')`` on normalised ``x`` [N, 3, H, W]: each sample's box
    (``params.erase_box``, ``h = 0``: none) is filled with N(0, 1) noise from its own seed."""
    out = x.clone()
    for i in (params.erase_box[:, 2] > 0).nonzero().squeeze(1).tolist():
        top, left, h, w = (int(v) for v in params.erase_box[i])
        g = torch.Generator().manual_seed(int(params.noise_seed[i]))
        out[i, :, top:top + h, left:left + w] = torch.randn((3, h, w), generator=g).to(x.dtype).to(x.device)
    return out

"""Reference DINO multi-crop augmentation: the official per-crop PIL pipeline, op by op.

This is what ``DataAugmentationDINO`` of the official code computes with torchvision's PIL
code paths, re-implemented without torchvision (which does not load beside the CPU build of
torch used here): every crop of every image is cut, resized and augmented on its own, one PIL
operation after another. It exists for benchmarks (bench/loader.py) and as the semantic
yardstick of :class:`dino_fast.data.MultiCropAugment`; training never uses it.

    global crop 1: RandomResizedCrop(Gs, scale=(0.4, 1), bicubic), flip_and_color_jitter,
                   GaussianBlur(p=1.0), normalize
    global crop 2: RandomResizedCrop(Gs, scale=(0.4, 1), bicubic), flip_and_color_jitter,
                   GaussianBlur(p=0.1), Solarization(p=0.2), normalize
    local crops:   RandomResizedCrop(Ls, scale=(0.05, 0.4), bicubic), flip_and_color_jitter,
                   GaussianBlur(p=0.5), normalize
    flip_and_color_jitter = RandomHorizontalFlip(0.5),
                   RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale(0.2)
"""
from __future__ import annotations

import math
import os
import random
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset

from dino_fast.utils.image_stats import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "random_resized_crop",
    "color_jitter",
    "ReferenceDINOAugmentation",
    "ReferenceMultiCropDataset",
    "build_reference_loader",
    "rand_augment_op_reference",
    "rand_augment_reference",
    "random_erasing_reference",
]



def random_resized_crop(
    img: Image.Image, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> Image.Image:
    """torchvision ``RandomResizedCrop(size, scale, ratio, interpolation=BICUBIC)`` on a PIL image.

    Draws from torch's global generator like torchvision; returns an RGB image ``size x size``.
    """
    width, height = img.size
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,)).item())
            j = int(torch.randint(0, width - w + 1, size=(1,)).item())
            break
    else:
        in_ratio = float(width) / float(height)
        if in_ratio < min(ratio):
            w = width
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            h = height
            w = int(round(h * max(ratio)))
        else:
            w, h = width, height
        i, j = (height - h) // 2, (width - w) // 2
    return img.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)


def _adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision ``F.adjust_hue`` for PIL: shift the uint8 H channel of HSV."""
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h += np.uint8(int(hue_factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def color_jitter(
    img: Image.Image, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1
) -> Image.Image:
    """torchvision ``ColorJitter`` on a PIL image: the four adjustments in a random order."""
    b = torch.empty(1).uniform_(max(0.0, 1 - brightness), 1 + brightness).item()
    c = torch.empty(1).uniform_(max(0.0, 1 - contrast), 1 + contrast).item()
    s = torch.empty(1).uniform_(max(0.0, 1 - saturation), 1 + saturation).item()
    h = torch.empty(1).uniform_(-hue, hue).item()
    for fn_id in torch.randperm(4).tolist():
        if fn_id == 0:
            img = ImageEnhance.Brightness(img).enhance(b)
        elif fn_id == 1:
            img = ImageEnhance.Contrast(img).enhance(c)
        elif fn_id == 2:
            img = ImageEnhance.Color(img).enhance(s)
        else:
            img = _adjust_hue(img, h)
    return img


def _to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """``ToTensor`` then ``Normalize(ImageNet)``: float32 [3, H, W]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


class ReferenceDINOAugmentation:
    """The official ``DataAugmentationDINO``: PIL RGB image -> list of ``2 + L`` float32 tensors.

    Args:
        global_crops_scale, local_crops_scale: area ranges.
        local_crops_number: L.
        global_size, local_size: output sides.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_size: int = 224,
        local_size: int = 96,
    ) -> None:
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        self.global_crops_scale = global_crops_scale
        self.local_crops_scale = local_crops_scale
        self.local_crops_number = local_crops_number
        self.global_size = global_size
        self.local_size = local_size

    @staticmethod
    def _flip_and_color_jitter(img: Image.Image) -> Image.Image:
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if random.random() < 0.8:
            img = color_jitter(img)
        if random.random() < 0.2:
            img = img.convert("L").convert("RGB")
        return img

    @staticmethod
    def _blur(img: Image.Image, p: float) -> Image.Image:
        if random.random() <= p:
            img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        """Augment one RGB image; returns float32 tensors [3, Gs, Gs] x 2 and [3, Ls, Ls] x L."""
        crops = []
        x = random_resized_crop(img, self.global_size, self.global_crops_scale)
        x = self._blur(self._flip_and_color_jitter(x), 1.0)
        crops.append(_to_normalized_tensor(x))
        x = random_resized_crop(img, self.global_size, self.global_crops_scale)
        x = self._blur(self._flip_and_color_jitter(x), 0.1)
        if random.random() < 0.2:
            x = ImageOps.solarize(x)
        crops.append(_to_normalized_tensor(x))
        for _ in range(self.local_crops_number):
            x = random_resized_crop(img, self.local_size, self.local_crops_scale)
            x = self._blur(self._flip_and_color_jitter(x), 0.5)
            crops.append(_to_normalized_tensor(x))
        return crops


class ReferenceMultiCropDataset(Dataset):
    """ImageFolder-style dataset applying :class:`ReferenceDINOAugmentation` per image.

    Items: ``(list of 2 + L float32 tensors, label)``.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: ReferenceDINOAugmentation) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"paths and labels differ in length: {len(paths)} vs {len(labels)}")
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        with Image.open(self.paths[i]) as img:
            rgb = img.convert("RGB")
        return self.transform(rgb), self.labels[i]


def build_reference_loader(
    root: str | os.PathLike,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    local_crops_number: int = 8,
    global_size: int = 224,
    local_size: int = 96,
    seed: Optional[int] = None,
) -> DataLoader:
    """The official loader: ImageFolder + ``DataAugmentationDINO`` + shuffled DataLoader.

    Yields ``(crops, labels)``: a list of ``2 + L`` float32 tensors [B, 3, S, S] and int64 [B].
    """
    from dino_fast.data.folder import scan_image_folder

    scan = scan_image_folder(root, num_workers=max(1, num_workers))
    ds = ReferenceMultiCropDataset(
        [r.path for r in scan.records],
        scan.labels,
        ReferenceDINOAugmentation(local_crops_number=local_crops_number, global_size=global_size, local_size=local_size),
    )
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True, generator=g)


# ------------------------------------------------------------------------------------------------
# Strong augmentation (Mugs): timm's RandAugment "rand-m9-mstd0.5-inc1" ops and RandomErasing,
# per image with PIL, from given parameters (the yardstick of dino_fast.data.augment.rand_augment)
# ------------------------------------------------------------------------------------------------
RAND_FILL = (124, 116, 104)


def _signed(v: float, negate: bool) -> float:
    return -v if negate else v


def rand_augment_op_reference(img: Image.Image, name: str, magnitude: float, negate: bool) -> Image.Image:
    """One timm RandAugment op (increasing variants) on an RGB PIL image, as timm's ``AugmentOp``
    computes it at ``magnitude`` (in [0, 10]) with the sign ``negate``; geometric ops bilinear
    with timm's mean fill."""
    level = magnitude / 10.0
    kw = dict(resample=Image.BILINEAR, fillcolor=RAND_FILL)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(_signed(level * 30.0, negate), **kw)
    if name == "PosterizeIncreasing":
        bits = 4 - int(level * 4)
        return img if bits >= 8 else ImageOps.posterize(img, bits)
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, 256 - int(level * 256))
    if name == "SolarizeAdd":
        add = int(level * 110)
        lut = [min(255, i + add) if i < 128 else i for i in range(256)]
        return img.point(lut * 3)
    factor = 1.0 + _signed(level * 0.9, negate)
    if name == "ColorIncreasing":
        return ImageEnhance.Color(img).enhance(factor)
    if name == "ContrastIncreasing":
        return ImageEnhance.Contrast(img).enhance(factor)
    if name == "BrightnessIncreasing":
        return ImageEnhance.Brightness(img).enhance(factor)
    if name == "SharpnessIncreasing":
        return ImageEnhance.Sharpness(img).enhance(factor)
    shear = _signed(level * 0.3, negate)
    shift = _signed(level * 0.45, negate)
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, shear, 0, 0, 1, 0), **kw)
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, shear, 1, 0), **kw)
    if name == "TranslateXRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, shift * img.size[0], 0, 1, 0), **kw)
    if name == "TranslateYRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, shift * img.size[1]), **kw)
    raise ValueError(f"unknown RandAugment op {name!r}")


def rand_augment_reference(img: Image.Image, ops: Sequence[str], apply: Sequence[bool], magnitudes: Sequence[float],
                           negate: Sequence[bool]) -> Image.Image:
    """timm's ``RandAugment.__call__`` on one image with its layers' drawn parameters."""
    for name, on, m, neg in zip(ops, apply, magnitudes, negate):
        if on:
            img = rand_augment_op_reference(img, name, float(m), bool(neg))
    return img


def random_erasing_reference(x: torch.Tensor, box: Sequence[int], noise_seed: int) -> torch.Tensor:
    """timm's ``RandomErasing(mode='pixel')`` of one normalised ``[3, H, W]`` tensor at the drawn
    box ``(top, left, h, w)`` (``h = 0``: unchanged), the noise from ``noise_seed``."""
    top, left, h, w = (int(v) for v in box)
    out = x.clone()
    if h > 0:
        g = torch.Generator().manual_seed(int(noise_seed))
        out[:, top:top + h, left:left + w] = torch.randn((3, h, w), generator=g).to(x.dtype)
    return out

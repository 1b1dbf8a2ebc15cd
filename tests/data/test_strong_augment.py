"""Batched RandAugment ("rand-m9-mstd0.5-inc1" ops) and RandomErasing against the per-image PIL
reference (reference/augment.py, timm's op definitions), and their counter-hash parameters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.data.augment import (
    RAND_OPS,
    StrongParams,
    _apply_op,
    rand_augment,
    random_erasing,
    strong_params_counter,
)
from dino_fast.reference.augment import rand_augment_op_reference, rand_augment_reference, random_erasing_reference

GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def _images(n: int = 6, h: int = 20, w: int = 24) -> torch.Tensor:
    """Smooth-ish random images (noise plus gradients), uint8 levels as float [n, 3, h, w]."""
    base = torch.rand(n, 3, 1, 1) * 160 + torch.linspace(0, 60, w).view(1, 1, 1, w) + torch.linspace(0, 30, h).view(1, 1, h, 1)
    return (base + torch.randn(n, 3, h, w) * 12).clamp(0, 255).round()


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).to(torch.uint8).numpy(), "RGB")


def _levels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("name", RAND_OPS)
def test_each_op_matches_pil(name):
    x = _images()
    m = torch.rand(x.shape[0]) * 10
    neg = torch.rand(x.shape[0]) < 0.5
    got = _apply_op(name, x.clone(), m, neg)
    assert torch.equal(got, got.round()) and got.min() >= 0 and got.max() <= 255
    for i in range(x.shape[0]):
        want = _levels(rand_augment_op_reference(_pil(x[i]), name, float(m[i]), bool(neg[i])))
        diff = (got[i] - want).abs()
        if name in GEOMETRIC:  # bilinear interpolation and border rules differ by rounding only
            assert diff.mean() < 1.5 and (diff > 3).float().mean() < 0.05, (name, i, diff.mean().item())
        else:
            assert diff.max() <= 1, (name, i, diff.max().item(), (diff > 0).float().mean().item())


def test_rand_augment_with_counter_params_matches_the_reference():
    x = _images(n=16) / 255.0
    p = strong_params_counter(0, 1, np.arange(16), np.zeros(16, dtype=np.int64), 20, 24)
    got = rand_augment(x, p) * 255
    for i in range(16):
        ops = [RAND_OPS[int(k)] for k in p.op[i]]
        want = _levels(rand_augment_reference(_pil((x[i] * 255).round()), ops, p.apply[i].tolist(),
                                              p.magnitude[i].tolist(), p.negate[i].tolist()))
        diff = (got[i] - want).abs()
        assert diff.mean() < 2.0 and (diff > 4).float().mean() < 0.06, (i, ops, p.apply[i], diff.mean().item())


def test_params_are_rank_independent_and_distributed_as_timm():
    ids = np.arange(4000)
    crops = np.full(4000, 2)
    p = strong_params_counter(3, 2, ids, crops, 64, 64)
    half = strong_params_counter(3, 2, ids[1::2], crops[1::2], 64, 64)
    for f in ("op", "apply", "magnitude", "negate", "erase_box", "noise_seed"):
        assert torch.equal(getattr(p, f)[1::2], getattr(half, f)), f
    assert p.op.shape == (4000, 2) and set(p.op.unique().tolist()) == set(range(len(RAND_OPS)))
    assert abs(p.apply.float().mean().item() - 0.5) < 0.03
    assert p.magnitude.min() >= 0 and p.magnitude.max() <= 10
    assert abs(p.magnitude.mean().item() - 9.0) < 0.03 and abs(p.magnitude.std().item() - 0.5) < 0.05
    erased = p.erase_box[:, 2] > 0
    assert abs(erased.float().mean().item() - 0.25) < 0.03
    top, left, h, w = p.erase_box[erased].unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    assert (h < 64).all() and (w < 64).all()
    area = (h * w).double() / 4096
    assert area.min() > 0.015 and area.max() < 0.36


def test_random_erasing_matches_the_reference():
    x = torch.randn(5, 3, 16, 12)
    box = torch.tensor([[2, 3, 5, 4], [0, 0, 0, 0], [10, 1, 6, 11], [0, 0, 15, 11], [4, 4, 1, 1]])
    p = StrongParams(op=torch.zeros(5, 2, dtype=torch.long), apply=torch.zeros(5, 2, dtype=torch.bool),
                     magnitude=torch.zeros(5, 2), negate=torch.zeros(5, 2, dtype=torch.bool), erase_box=box,
                     noise_seed=torch.arange(5) * 7919)
    got = random_erasing(x, p)
    for i in range(5):
        assert torch.equal(got[i], random_erasing_reference(x[i], box[i].tolist(), int(p.noise_seed[i])))
    assert torch.equal(got[1], x[1]) and not torch.equal(got[0], x[0])


def test_bad_input_is_refused():
    p = strong_params_counter(0, 0, np.arange(2), np.zeros(2, dtype=np.int64), 8, 8)
    with pytest.raises(TypeError, match=r"x: expected float RGB \[N, 3, H, W\], got torch.uint8"):
        rand_augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), p)
    with pytest.raises(ValueError, match=r"params: expected 3 rows \(one per image\), got 2"):
        rand_augment(torch.zeros(3, 3, 8, 8), p)


def test_multicrop_strong_recipe_replaces_only_the_chosen_rows_and_is_rank_independent():
    from dino_fast.data.augment import MultiCropAugment

    B, G, L = 8, 4, 3
    g = torch.randint(0, 256, (B, G, 3, 16, 16), dtype=torch.uint8)
    loc = torch.randint(0, 256, (B, L, 3, 8, 8), dtype=torch.uint8)
    ids = np.arange(100, 100 + B)
    weak_aug = MultiCropAugment(L, blur_sigma=(0.1, 0.5))
    strong_aug = MultiCropAugment(L, blur_sigma=(0.1, 0.5), strong_p=0.5, strong_from_crop=2)
    weak = weak_aug(g, loc, sample_ids=ids, seed=1, epoch=2)
    strong = strong_aug(g, loc, sample_ids=ids, seed=1, epoch=2)
    flags = strong_aug.last_weak
    assert weak_aug.last_weak is None and flags.dtype == torch.bool and flags.shape == (B,)
    assert 0 < int(flags.sum()) < B
    for c in range(2):                               # the teacher's crops never change
        assert torch.equal(strong[c], weak[c])
    for c in (2, 3):                                 # student global crops: strong together per image
        same = (strong[c] == weak[c]).flatten(1).all(1)
        assert torch.equal(same, flags)
    changed = torch.stack([~(strong[c] == weak[c]).flatten(1).all(1) for c in range(G, G + L)])
    assert 0 < int(changed.sum()) < L * B          # local crops: strong independently
    # rank independence: two halves of the batch give the same crops and flags
    for half in (slice(0, B, 2), slice(1, B, 2)):
        part = strong_aug(g[half], loc[half], sample_ids=ids[half], seed=1, epoch=2)
        assert torch.equal(strong_aug.last_weak, flags[half])
        for c in range(G + L):
            assert torch.equal(part[c], strong[c][half]), c

"""KoLeo regulariser (DINOv2): the function against its float64 definition, the wrapper's
features, and the trainer's use of it (loss = DINO + weight x KoLeo of each global crop)."""
from __future__ import annotations

import math

import pytest
import torch

import dino_fast.methods.dino as loss_mod
from dino_fast.config import ConfigError, load_config
from dino_fast.losses.koleo import koleo_loss
from dino_fast.models import DINOHead, MultiCropWrapper, vit_tiny
from dino_fast.reference.loss import koleo_loss_reference
from dino_fast.train.loop import Trainer
from tests._train_utils import read_losses, tiny_config


@pytest.mark.parametrize("n, d", [(2, 3), (7, 5), (64, 128), (130, 16), (33, 384)])
def test_matches_float64_definition_value_and_gradient(n, d):
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3.0
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la, lb = koleo_loss(a), koleo_loss_reference(b)
    assert la.dtype == torch.float64
    assert la.item() == pytest.approx(lb.item(), rel=1e-12, abs=1e-12)
    w = torch.randn((), generator=g, dtype=torch.float64)  # any upstream gradient
    (w * la).backward()
    (w * lb).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_low_precision_inputs_are_computed_in_fp32(dtype, tol):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 64, generator=g).to(dtype)
    got = koleo_loss(x)
    assert got.dtype == torch.float32
    # the same (rounded) inputs in float64: the only error left is fp32 arithmetic
    assert got.item() == pytest.approx(koleo_loss_reference(x.double()).item(), rel=tol)


def test_under_autocast_stays_fp32():
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = koleo_loss(x)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(koleo_loss_reference(x).item(), rel=1e-5)


def test_identical_rows_give_a_finite_loss_and_gradient():
    x = torch.randn(1, 8).repeat(5, 1).requires_grad_()
    got = koleo_loss(x)
    assert got.item() == pytest.approx(-math.log(1e-8), rel=1e-6)
    got.backward()
    assert torch.isfinite(x.grad).all()


def test_spreading_the_points_lowers_the_loss():
    g = torch.Generator().manual_seed(0)
    tight = torch.randn(1, 16, generator=g) + 0.05 * torch.randn(32, 16, generator=g)
    spread = torch.randn(32, 16, generator=g)
    assert koleo_loss(spread) < koleo_loss(tight)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(1, 4), r"features \[N, D\] with N >= 2, got \(1, 4\)"),
    (torch.randn(4), r"features \[N, D\] with N >= 2, got \(4,\)"),
    (torch.randn(2, 3, 4), r"got \(2, 3, 4\)"),
    (torch.ones(3, 4, dtype=torch.int64), "floating-point features, got torch.int64"),
    ([[1.0, 2.0]], "got list"),
])
def test_bad_inputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        koleo_loss(bad)


def test_wrapper_returns_backbone_features_in_crop_order():
    torch.manual_seed(0)
    model = MultiCropWrapper(vit_tiny(patch_size=8, depth=1), DINOHead(192, 32, hidden_dim=16, bottleneck_dim=8))
    model.eval()
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    logits, feats = model(crops, return_features=True)
    assert torch.equal(logits, model(crops))
    assert feats.shape == (9, 192)
    for i, c in enumerate(crops):
        torch.testing.assert_close(feats[3 * i: 3 * i + 3], model.backbone(c), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.head(feats), logits, rtol=0, atol=0)


def test_trainer_adds_weighted_koleo_of_each_global_crop(data_root, tmp_path, monkeypatch):
    calls = []
    real = loss_mod.koleo_loss

    def spy(features, eps=1e-8):
        out = real(features, eps)
        calls.append((tuple(features.shape), out.item()))
        return out

    monkeypatch.setattr(loss_mod, "koleo_loss", spy)
    plain, reg = tmp_path / "plain", tmp_path / "koleo"
    Trainer(tiny_config(data_root, plain, "train.max_iters=1")).fit()
    assert calls == []
    Trainer(tiny_config(data_root, reg, "train.max_iters=1", "loss.koleo_weight=0.25")).fit()
    assert [shape for shape, _ in calls] == [(4, 192), (4, 192)]  # 2 global crops x batch 4, ViT-Tiny CLS
    # the first step's forward is the same in both runs: the logged losses differ by the KoLeo term
    expected = read_losses(plain)[0] + 0.25 * sum(v for _, v in calls)
    assert read_losses(reg)[0] == pytest.approx(expected, rel=1e-6)


def test_trainer_with_koleo_resumes_exactly(data_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(tiny_config(data_root, full, "train.max_iters=6", "loss.koleo_weight=0.1")).fit()
    Trainer(tiny_config(data_root, part, "train.max_iters=3", "loss.koleo_weight=0.1")).fit()
    Trainer(tiny_config(data_root, part, "train.max_iters=6", "loss.koleo_weight=0.1")).fit()
    a, b = read_losses(full), read_losses(part)
    assert all(math.isfinite(v) for v in a.values())
    assert [a[i] for i in range(6)] == [b[i] for i in range(6)]


@pytest.mark.parametrize("value, shown", [("-0.1", "-0.1"), (".nan", "nan"), (".inf", "inf")])
def test_config_rejects_bad_weight(value, shown):
    with pytest.raises(ConfigError, match=f"loss.koleo_weight must be a finite number >= 0, got {shown}"):
        load_config(None, [f"loss.koleo_weight={value}"])


def test_config_rejects_koleo_with_one_sample_per_rank():
    with pytest.raises(ConfigError, match=r"loss.koleo_weight=0.1 needs data.batch_size_per_gpu >= 2 .* got 1"):
        load_config(None, ["loss.koleo_weight=0.1", "data.batch_size_per_gpu=1"])
    load_config(None, ["loss.koleo_weight=0", "data.batch_size_per_gpu=1"])  # fine without the term

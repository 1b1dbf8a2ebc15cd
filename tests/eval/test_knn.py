"""Weighted k-NN against a brute-force computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from dino_fast.eval.knn import knn_classify


def _brute(train_f, train_y, test_f, test_y, k, T, C):
    top1 = top5 = 0
    for f, y in zip(test_f, test_y):
        sims = [(float(f @ g), int(c)) for g, c in zip(train_f, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * C
        for s, c in sims[:k]:
            votes[c] += math.exp(s / T)
        order = sorted(range(C), key=lambda c: -votes[c])
        top1 += order[0] == y
        top5 += y in order[:5]
    return 100 * top1 / len(test_y), 100 * top5 / len(test_y)


@pytest.mark.parametrize("C", [3, 7, 12])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_brute_force(C, k):
    n, m, d = 60, 25, 16
    centers = F.normalize(torch.randn(C, d, dtype=torch.float64), dim=1)
    train_y = torch.randint(0, C, (n,))
    test_y = torch.randint(0, C, (m,))
    train_f = F.normalize(centers[train_y] + 0.8 * torch.randn(n, d, dtype=torch.float64), dim=1)
    test_f = F.normalize(centers[test_y] + 0.8 * torch.randn(m, d, dtype=torch.float64), dim=1)
    res = knn_classify(train_f, train_y, test_f, test_y, k=k, temperature=0.07, num_classes=C, batch_size=7)
    t1, t5 = _brute(train_f, train_y, test_f, test_y, k, 0.07, C)
    assert res["top1"] == pytest.approx(t1) and res["top5"] == pytest.approx(t5)


def test_bad_inputs():
    f = torch.randn(4, 3)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="feature dims differ"):
        knn_classify(f, y, torch.randn(2, 5), y[:2])
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_classify(f, y, f, y, k=0)
    with pytest.raises(ValueError, match="one label per feature row"):
        knn_classify(f, y[:3], f, y)


def test_an_exported_backbone_keeps_grayscale_input(tmp_path):
    """The flag lives in the run's config, so every evaluation of its checkpoint reads grey."""
    import json

    from dino_fast.eval.knn import load_backbone_from_checkpoint
    from dino_fast.models import vit_tiny

    vit = vit_tiny(patch_size=8, img_size=32, depth=1, grayscale_input=True)
    torch.save(vit.state_dict(), tmp_path / "teacher_backbone.pth")
    model = {"arch": "vit_tiny", "patch_size": 8, "depth": 1}
    for flag in (True, False):
        (tmp_path / "config.json").write_text(json.dumps(
            {"model": {**model, "grayscale_input": flag}, "data": {"global_crops_size": 32}}))
        backbone, cfg = load_backbone_from_checkpoint(tmp_path / "teacher_backbone.pth")
        assert cfg.model.grayscale_input is flag and backbone.grayscale_input is flag

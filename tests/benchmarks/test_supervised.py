"""bench/supervised.py: the random resized crop and the supervised ceiling's training loop."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import supervised  # noqa: E402
from dino_fast.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_random_resized_crop_is_a_resized_window_and_is_seeded():
    ramp = torch.arange(8, dtype=torch.float32).expand(64, 3, 8, 8).contiguous()  # value = column index
    a = supervised.random_resized_crop(ramp, 4, (0.3, 1.0), torch.Generator().manual_seed(3))
    b = supervised.random_resized_crop(ramp, 4, (0.3, 1.0), torch.Generator().manual_seed(3))
    assert a.shape == (64, 3, 4, 4) and torch.equal(a, b)
    assert (a >= -1e-4).all() and (a <= 7 + 1e-4).all()
    d = a[:, 0, 0, 1:] - a[:, 0, 0, :-1]  # each row runs along the window: increasing, or decreasing when flipped
    rising, falling = (d > 0).all(1), (d < 0).all(1)
    assert (rising | falling).all() and 16 <= int(falling.sum()) <= 48  # about half flipped
    assert torch.allclose(a[:, :, 0], a[:, :, 3])  # rows are equal: no vertical change in a column ramp
    assert not torch.equal(a, supervised.random_resized_crop(ramp, 4, (0.3, 1.0), torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_learns_a_separable_problem_and_scores_it(precision):
    """Two classes told apart by which half, top or bottom, is bright (a horizontal flip keeps the
    class): labels must get them all."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.arange(n) % 2
        x = 0.3 * torch.randn(n, 3, 16, 16, generator=g)
        x[y == 0, :, :8] += 2.0
        x[y == 1, :, 8:] += 2.0
        return x, y

    cfg = load_config(str(ROOT / "configs/default.yaml"),
                      ["data.global_crops_size=16", "model.depth=1", "model.drop_path_rate=0.0"])
    res = supervised.train_supervised(cfg, split(64), split(32), epochs=30, lr=0.05, batch_size=16,
                                      crop_scale=(0.8, 1.0), seed=0, precision=precision)
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["steps"] == 120
    with pytest.raises(ValueError, match="precision must be 'bf16' or 'fp32', got 'fp16'"):
        supervised.train_supervised(cfg, split(8), split(8), epochs=1, lr=1e-3, batch_size=4,
                                    crop_scale=(0.8, 1.0), seed=0, precision="fp16")

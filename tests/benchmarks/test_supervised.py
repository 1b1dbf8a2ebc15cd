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
    ids = torch.arange(64)

    def crop(gen_seed, seed=3, epoch=0, samples=ids):
        return supervised.random_resized_crop(ramp, 4, (0.3, 1.0), torch.Generator().manual_seed(gen_seed),
                                              seed=seed, epoch=epoch, samples=samples)

    a, b = crop(3), crop(3)
    assert a.shape == (64, 3, 4, 4) and torch.equal(a, b)
    assert (a >= -1e-4).all() and (a <= 7 + 1e-4).all()
    d = a[:, 0, 0, 1:] - a[:, 0, 0, :-1]  # each row runs along the window: increasing, or decreasing when flipped
    rising, falling = (d > 0).all(1), (d < 0).all(1)
    assert (rising | falling).all() and 16 <= int(falling.sum()) <= 48  # about half flipped
    assert torch.allclose(a[:, :, 0], a[:, :, 3])  # rows are equal: no vertical change in a column ramp
    assert not torch.equal(a, crop(4)) and not torch.equal(a, crop(3, seed=4)) and not torch.equal(a, crop(3, epoch=1))
    # the box is the loaders' (crop_box of the image's own stream), whatever the batch it lands in
    from dino_fast.data.crops import crop_box
    top, left, h, w = crop_box(8, 8, 0.3, 1.0, 3 / 4, 4 / 3, 3, 0, 5, 0)
    want = torch.nn.functional.interpolate(ramp[:1, :, top:top + h, left:left + w], size=(4, 4), mode="bilinear",
                                           align_corners=False, antialias=True)
    got = supervised.random_resized_crop(ramp[:1], 4, (0.3, 1.0), torch.Generator().manual_seed(0), seed=3, epoch=0,
                                         samples=torch.tensor([5]))
    assert torch.equal(got, want) or torch.equal(got, want.flip(3))
    with pytest.raises(ValueError, match=r"samples: expected one index per image, shape \(64,\), got \(3,\)"):
        crop(3, samples=ids[:3])


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

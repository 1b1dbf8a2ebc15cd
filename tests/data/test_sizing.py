"""The small-image rule (data.auto_crops): median image side, evaluation size, the config it gives."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image

from dino_fast.config import ConfigError, apply_auto_crops, load_config
from dino_fast.data.sizing import SMALL_GLOBAL_CROP, SMALL_ITERATION_SCALE, eval_size_for_crops, median_image_side
from tests._train_utils import make_image_folder, tiny_config


def _save(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def test_median_image_side_reads_the_shorter_side_of_class_and_flat_folders(tmp_path):
    for i, (w, h) in enumerate([(32, 40), (50, 20), (64, 64), (100, 90), (16, 200)]):
        _save(tmp_path / "nested" / f"c{i % 2}" / f"{i}.png", w, h)
        _save(tmp_path / "flat" / f"{i}.png", w, h)
    (tmp_path / "flat" / "README.txt").write_text("not an image")
    (tmp_path / "flat" / "broken.jpg").write_bytes(b"not a jpeg")  # unreadable: skipped
    # shorter sides 32, 20, 64, 90, 16 -> sorted 16 20 32 64 90 -> 32
    assert median_image_side(tmp_path / "nested") == 32
    assert median_image_side(tmp_path / "flat") == 32
    (tmp_path / "empty").mkdir()
    assert median_image_side(tmp_path / "empty") is None
    # a sample of 2: the 6 sorted files (0-4.png, broken.jpg) at stride 3 are 0.png (32) and 3.png (90)
    assert median_image_side(tmp_path / "flat", max_images=2) == 90


def test_eval_size_matches_the_mean_crop_side():
    # E[sqrt(s)], s ~ U(0.4, 1) = 2/3 (1 - 0.4^1.5) / 0.6 = 0.8300; 48 / 0.8300 = 57.83 -> 56 (patch 8); 56 * 9/8 = 63
    mean_side = 2 / 3 * (1 - 0.4 ** 1.5) / 0.6
    assert mean_side == pytest.approx(0.8300, abs=1e-4)
    assert eval_size_for_crops(48, (0.4, 1.0), 8) == (56, 63)
    assert eval_size_for_crops(64, (1.0, 1.0), 16) == (64, 72)  # whole-image crops: the crop size itself
    assert eval_size_for_crops(224, (0.4, 1.0), 16) == (272, 306)  # 224 / 0.8300 = 269.9 -> 272
    # never below one patch
    assert eval_size_for_crops(4, (0.4, 1.0), 8) == (8, 9)


def _default():
    return load_config("configs/default.yaml")


def test_small_images_get_48_px_crops_more_iterations_and_the_matching_eval_size():
    cfg = _default()
    assert cfg.data.auto_crops and cfg.data.global_crops_size == 64 and cfg.train.iterations == 720
    new, note = apply_auto_crops(cfg, 32)
    assert (new.data.global_crops_size, new.data.local_crops_size) == (SMALL_GLOBAL_CROP, 24)
    assert new.train.iterations == round(720 * SMALL_ITERATION_SCALE) == 1200
    assert (new.eval.image_size, new.eval.resize_size) == (56, 63)
    assert "32 px" in note and "64/32 -> 48/24" in note and "720 -> 1200" in note and "auto_crops=false" in note
    # nothing else changes
    for section in ("model", "loss", "optim", "method"):
        assert getattr(new, section) == getattr(cfg, section)
    assert dataclasses.replace(new.data, global_crops_size=64, local_crops_size=32) == cfg.data
    assert dataclasses.replace(new.train, iterations=720) == cfg.train
    assert dataclasses.replace(new.eval, image_size=64, resize_size=72) == cfg.eval


@pytest.mark.parametrize("side, overrides", [
    (64, ()),                                    # as large as the crop: kept
    (112, ()),                                   # the built-in dataset's 112 px
    (None, ()),                                  # unknown size
    (32, ("data.auto_crops=false",)),            # the rule is off
    (32, ("data.global_crops_size=48", "data.local_crops_size=24")),  # already small crops
])
def test_large_images_unknown_sizes_or_the_rule_off_keep_the_config(side, overrides):
    cfg = load_config("configs/default.yaml", list(overrides))
    new, note = apply_auto_crops(cfg, side)
    assert new is cfg and note is None


def test_epoch_based_runs_keep_iterations_zero_and_local_crops_stay_at_least_a_patch():
    cfg = load_config("configs/default.yaml", ["train.iterations=0", "train.time_budget_s=0", "train.epochs=3",
                                               "data.local_crops_size=8"])
    new, _ = apply_auto_crops(cfg, 20)
    assert new.train.iterations == 0 and new.train.epochs == 3
    assert new.data.local_crops_size == 8  # round(8 * 0.75) = 6 < one 8 px patch


def test_auto_crops_must_be_a_bool():
    with pytest.raises(ConfigError, match="auto_crops"):
        load_config(None, ["data.auto_crops=maybe"])


def test_the_trainer_applies_the_rule_and_records_it(tmp_path):
    from dino_fast.train.loop import Trainer

    small = make_image_folder(tmp_path / "small", size=30)  # 30 x 38 px images
    cfg = tiny_config(small, tmp_path / "run", "data.global_crops_size=64", "data.local_crops_size=32",
                      "data.auto_crops=true", "train.iterations=3", "train.epochs=1")
    tr = Trainer(cfg)
    assert (tr.cfg.data.global_crops_size, tr.cfg.data.local_crops_size) == (48, 24)
    assert tr.cfg.train.iterations == 5 and tr.cfg.train.epochs == math.ceil(5 / tr.niter_per_epoch)
    assert (tr.cfg.eval.image_size, tr.cfg.eval.resize_size) == (56, 63)
    s = tr.fit()
    assert s["iterations"] == 5
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["global_crops_size"] == 48 and saved["train"]["iterations"] == 5
    # the same folder with the rule off trains at the configured sizes
    off = Trainer(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, auto_crops=False)))
    assert off.cfg.data.global_crops_size == 64 and off.cfg.train.iterations == 3

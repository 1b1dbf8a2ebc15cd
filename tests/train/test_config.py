"""Config loading: YAML + overrides, unknown keys, wrong types, ranges."""
from pathlib import Path

import pytest

from dino_fast.config import VALID_KEYS, ConfigError, TrainConfig, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.global_crops_size % cfg.model.patch_size == 0


def test_paper_recipe_values():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "vit_small16_100ep.yaml")
    assert (cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert cfg.data.local_crops_number == 10 and cfg.data.global_crops_size == 224 and cfg.data.local_crops_size == 96
    assert cfg.train.epochs == 100
    assert cfg.data.batch_size_per_gpu * 16 == 1024


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=0.001", "data.global_crops_scale=[0.3, 1]", "model.depth=2",
                             "train.progress=false", "eval.knn_k=[5]"])
    assert cfg.optim.lr == 0.001 and cfg.data.global_crops_scale == (0.3, 1.0)
    assert cfg.model.depth == 2 and cfg.train.progress is False and cfg.eval.knn_k == (5,)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lrr=1"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "did you mean 'optim.lr'" in msg and "optim.weight_decay" in msg


def test_unknown_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("modle:\n  arch: vit_tiny\n")
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(p)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=abc", "optim.lr expects a number, got 'abc'"),
    ("model.patch_size=7.5", "model.patch_size expects an integer"),
    ("train.progress=maybe", "train.progress expects true/false"),
    ("model.arch=vit_huge", "model.arch must be one of"),
    ("loss.teacher_temp=0", "loss.teacher_temp must be > 0"),
    ("data.global_crops_size=100", "not a multiple of model.patch_size"),
    ("data.local_crops_scale=[0.5, 0.1]", "data.local_crops_scale must be (lo, hi)"),
    ("data.global_crops_scale=[0.5]", "expects 2 values"),
    ("optim.lr", "override must look like section.key=value"),
    ("data.grayscale_p=1.5", "data.grayscale_p must be a probability in [0, 1]"),
    ("data.jitter_p=-0.1", "data.jitter_p must be a probability in [0, 1]"),
    ("data.color_jitter=[0.4, 0.4, 0.2, 0.7]", "hue <= 0.5"),
    ("data.color_jitter=[0.4, -0.4, 0.2, 0.1]", "every value >= 0"),
    ("data.color_jitter=[0.4, 0.4]", "expects 4 values"),
    ("optim.momentum_teacher_end=1.5", "optim.momentum_teacher_end must be in [0, 1]"),
])
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip_through_dict():
    cfg = load_config(None, ["optim.lr=0.003", "data.local_crops_number=3"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(TrainConfig().to_dict()["data"]["global_crops_scale"], list)
    assert "optim.lr" in VALID_KEYS and "model.arch" in VALID_KEYS

"""bench/knn_sweep.py: the summary, the command line, the evaluation split, and one real run."""
from __future__ import annotations

import json

import pytest

from bench import knn_sweep
from dino_fast.config import load_config
from dino_fast.data.builtin import make_dataset


def test_every_variant_is_a_valid_config():
    for _name, over in knn_sweep.VARIANTS.items():
        load_config(str(knn_sweep.ROOT / "configs" / "default.yaml"), [o for o in over if not o.startswith("@")])


def test_summarize_means_min_max_and_order():
    rows = [{"variant": "a", "gain": 10.0, "gain_std": 8.0, "t_train": 60},
            {"variant": "a", "gain": 14.0, "gain_std": 12.0, "t_train": 70},
            {"variant": "b", "gain": 30.0, "gain_std": 29.0, "t_train": 65},
            {"variant": "b", "error": "boom"}]
    got = knn_sweep.summarize(rows)
    assert [d["variant"] for d in got] == ["b", "a"]
    assert got[1] == {"variant": "a", "runs": 2, "gain": 12.0, "min": 10.0, "max": 14.0, "gain_std": 10.0,
                      "t_train_s": 65}


def test_list_and_unknown_variant(capsys):
    assert knn_sweep.main(["--list"]) == 0
    assert "koleo03" in capsys.readouterr().out
    assert knn_sweep.main(["--variants", "nope"]) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err


def test_eval_split_extends_the_builtin_val_split(tmp_path):
    small = make_dataset(tmp_path / "small", train_per_class=2, val_per_class=1)
    ext = knn_sweep.ensure_dataset(tmp_path / "ext", train_per_class=2, val_per_class=3)
    for split, name in (("train", "0001.jpg"), ("val", "0000.jpg")):
        for cls in (small / split).iterdir():
            assert (cls / name).read_bytes() == (ext / split / cls.name / name).read_bytes()
    assert len(list((ext / "val").rglob("*.jpg"))) == 30
    before = (ext / "dataset.json").stat().st_mtime_ns
    assert knn_sweep.ensure_dataset(ext, train_per_class=2, val_per_class=3) == ext  # reused
    assert (ext / "dataset.json").stat().st_mtime_ns == before
    knn_sweep.ensure_dataset(ext, train_per_class=2, val_per_class=4)  # other counts: regenerated
    assert json.loads((ext / "dataset.json").read_text())["val_per_class"] == 4


@pytest.mark.slow
def test_one_real_run_reports_teacher_random_and_gain(tmp_path):
    data = knn_sweep.ensure_dataset(tmp_path / "d", train_per_class=7, val_per_class=2)  # 70 train >= batch 64
    res = knn_sweep.run_one("t", ["train.max_iters=2", "train.precision=fp32", "loss.koleo_weight=0.1"],
                            eval_dir=str(data), std_dir=str(data), work_dir=str(tmp_path / "w"), every=1)
    assert res["iterations"] == 2 and res["traj"] and res["traj"][0][0] == 1
    for k in ("knn_t", "knn_r", "knn_t_std", "knn_r_std"):
        assert 0.0 <= res[k] <= 100.0
    assert res["gain"] == pytest.approx(res["knn_t"] - res["knn_r"], abs=0.11)
    assert res["knn_t"] == res["knn_t_std"]  # the same split twice: the same figure


@pytest.mark.slow
def test_sweep_runs_subprocesses_and_appends_results(tmp_path, capsys):
    data = knn_sweep.ensure_dataset(tmp_path / "d", train_per_class=7, val_per_class=2)
    out = tmp_path / "r.jsonl"
    rc = knn_sweep.main(["--variants", "base", "--seeds", "3", "--more-seeds", "--parallel", "1", "--out", str(out),
                         "--eval-dir", str(data), "--std-dir", str(data), "--every", "0",
                         "train.max_iters=1", "train.precision=fp32"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["variant"] == "base" and rows[0]["name"] == "base__s3", rows
    assert rows[0]["overrides"][-1] == "train.seed=3" and rows[0]["iterations"] == 1
    assert "base" in capsys.readouterr().out

"""The trainer's end-of-epoch collapse check: metrics every epoch, a named warning when the
teacher's outputs are forced uniform, none during warm-up."""
from __future__ import annotations

import json
import logging
import math

from dino_fast.train.loop import Trainer
from tests._train_utils import tiny_config


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_collapse_metrics_logged_each_epoch(data_root, tmp_path) -> None:
    out = tmp_path / "run"
    tr = Trainer(tiny_config(data_root, out, "train.epochs=2", "train.log_every=100"))
    tr.fit()
    recs = [r for r in _records(out) if "collapse/teacher_entropy" in r]
    assert [r["epoch"] for r in recs] == [0, 1]  # the last step of each epoch
    for r in recs:
        assert 0 <= r["collapse/teacher_entropy"] <= r["collapse/teacher_entropy_max"] + 1e-9
        assert r["collapse/teacher_entropy_max"] == math.log(64)  # model.out_dim=64
        assert r["collapse/effective_rank"] >= 1 and r["collapse/feature_std"] > 0


def test_forced_uniform_teacher_is_named(data_root, tmp_path, caplog) -> None:
    # a teacher temperature of 1000 makes the teacher's softmax uniform whatever the logits
    cfg = tiny_config(data_root, tmp_path / "hot", "train.epochs=2", "optim.warmup_epochs=1",
                      "loss.teacher_temp=1000", "loss.warmup_teacher_temp=1000")
    with caplog.at_level(logging.WARNING, logger="dino_fast.train"):
        summary = Trainer(cfg).fit()
    warned = [w for w in summary["collapse_warnings"] if "teacher outputs uniform" in w]
    assert warned and all(w.startswith("epoch 1:") for w in warned), summary["collapse_warnings"]  # not in warm-up
    assert any("teacher outputs uniform" in r.getMessage() for r in caplog.records)


def test_no_check_when_disabled(data_root, tmp_path) -> None:
    out = tmp_path / "off"
    tr = Trainer(tiny_config(data_root, out, "train.epochs=1"))
    tr.collapse_every_epoch = False
    tr.fit()
    assert not any("collapse/teacher_entropy" in r for r in _records(out))


def test_iteration_runs_are_checked_ten_times_and_warned_after_warm_up(data_root, tmp_path) -> None:
    """train.iterations: a check every min(epoch, iterations // 10) iterations and at the end; the
    warnings wait for the warm-up (min(warmup epochs, iterations // 4) iterations)."""
    out = tmp_path / "it"
    cfg = tiny_config(data_root, out, "train.iterations=10", "train.log_every=100", "optim.warmup_epochs=5",
                      "loss.teacher_temp=1000", "loss.warmup_teacher_temp=1000")
    tr = Trainer(cfg)
    every = min(tr.niter_per_epoch, 1)
    assert tr.collapse_check_every == every and tr.warmup_iters == 2
    summary = tr.fit()
    checked = [r["iteration"] for r in _records(out) if "collapse/teacher_entropy" in r]
    assert checked == list(range(10))  # every iteration: 10 // 10 = 1
    warned = [w for w in summary["collapse_warnings"] if "teacher outputs uniform" in w]
    assert len(warned) == 8, summary["collapse_warnings"]  # iterations 2..9, not the two of warm-up

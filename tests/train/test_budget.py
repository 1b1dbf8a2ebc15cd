"""train.time_budget_s: the length rule by hand, the probe's timing, the config's checks, and a
budgeted run that equals a plain run of the capped length, is resumed at that length, and never
times itself again."""
from __future__ import annotations

import json
import math

import pytest

from dino_fast.config import ConfigError
from dino_fast.eval import collapse as collapse_mod
from dino_fast.train import budget as budget_mod
from dino_fast.train.budget import (
    MARGIN,
    MIN_ITERATIONS,
    PROBE_ITERATIONS,
    SHORT_EPOCH,
    EvalEstimate,
    budget_iterations,
    estimate_eval_seconds,
    probe_seconds_per_iteration,
    probe_steps,
)
from dino_fast.train.loop import Trainer
from tests._train_utils import tiny_config


def test_budget_iterations_by_hand():
    assert budget_iterations(0.5, 100.0, 0.0, 1000) == int(MARGIN * 100 / 0.5) == 190
    assert budget_iterations(0.5, 100.0, 20.0, 1000) == int(MARGIN * 80 / 0.5) == 152
    assert budget_iterations(0.5, 100.0, 20.0, 120) == 120  # fits: unchanged
    assert budget_iterations(2.0, 10.0, 9.0, 1000) == MIN_ITERATIONS  # nothing left: the floor
    assert budget_iterations(2.0, 10.0, 50.0, 1000) == MIN_ITERATIONS  # overspent probe: the floor too
    assert budget_iterations(2.0, 10.0, 50.0, 4) == 4  # never longer than asked


@pytest.mark.parametrize("args,match", [
    ((0.0, 100.0, 0.0, 10), "seconds_per_iteration must be a finite number > 0, got 0.0"),
    ((math.nan, 100.0, 0.0, 10), "seconds_per_iteration must be a finite number > 0, got nan"),
    ((0.5, -1.0, 0.0, 10), "budget_s must be a finite number > 0, got -1.0"),
    ((0.5, 100.0, -1.0, 10), "spent_s must be a finite number >= 0, got -1.0"),
    ((0.5, 100.0, 0.0, 0), r"wanted must be a positive int \(train.iterations\), got 0"),
    ((0.5, 100.0, 0.0, True), r"wanted must be a positive int \(train.iterations\), got True"),
])
def test_budget_iterations_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        budget_iterations(*args)


def test_probe_timing_leaves_out_the_first_two_steps():
    assert probe_seconds_per_iteration([9.0, 5.0, 1.0, 3.0, 2.0]) == 2.0  # median of [1, 3, 2]
    assert probe_seconds_per_iteration([9.0, 5.0, 1.5]) == 1.5
    with pytest.raises(ValueError, match=r"the probe ran 2 step\(s\); at least 3 are needed"):
        probe_seconds_per_iteration([1.0, 1.0])
    with pytest.raises(ValueError, match=r"step times must be finite and > 0, got \[1.0, 0.0\]"):
        probe_seconds_per_iteration([1.0, 1.0, 1.0, 0.0])
    # a whole epoch: the mean, so the epoch end's slow step counts once per epoch
    assert probe_seconds_per_iteration([9.0, 5.0, 1.0, 1.0, 4.0], whole_epoch=True) == 2.0


def test_short_epochs_are_timed_whole():
    assert probe_steps(31) == (33, True)  # the photos: one epoch end among the timed steps
    assert probe_steps(SHORT_EPOCH) == (SHORT_EPOCH + 2, True)
    assert probe_steps(SHORT_EPOCH + 1) == (PROBE_ITERATIONS, False)
    for bad in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match="niter_per_epoch must be a positive int"):
            probe_steps(bad)


def test_config_checks_the_budget(data_root, tmp_path):
    assert tiny_config(data_root, tmp_path).train.time_budget_s == 0.0
    with pytest.raises(ConfigError, match=r"train.time_budget_s must be a finite number of seconds >= 0 \(0: no "
                                          r"budget\), got -5.0"):
        tiny_config(data_root, tmp_path, "train.iterations=10", "train.time_budget_s=-5")
    with pytest.raises(ConfigError, match="train.time_budget_s must be a finite number of seconds >= 0"):
        tiny_config(data_root, tmp_path, "train.iterations=10", "train.time_budget_s=.inf")
    with pytest.raises(ConfigError, match=r"train.time_budget_s=30 caps train.iterations, which is 0 here"):
        tiny_config(data_root, tmp_path, "train.time_budget_s=30")
    with pytest.raises(ConfigError, match="train.time_budget_s expects a number, got 'soon'"):
        tiny_config(data_root, tmp_path, "train.iterations=10", "train.time_budget_s=soon")


class _FakeClock:
    """Each call advances 2 s: the probe 'takes' 2 s whatever it really takes."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 2.0
        return self.t - 2.0


def test_budgeted_run_is_the_plain_run_of_the_capped_length_and_resumes_at_it(data_root, tmp_path, monkeypatch):
    """A budget of 20 s at a (patched) 0.5 s per step, after a 2 s probe: int(0.95 * 18 / 0.5) = 34
    of the 40 asked. The probe runs in a temporary directory at the run's own config; the run that
    follows equals a plain train.iterations=34 run to the last loss digit, saves 34 in config.json
    and its checkpoint, and a resumed run takes 34 from the checkpoint without a probe."""
    seen = []
    real = budget_mod.probe_seconds_per_iteration

    def timed(steps, whole_epoch=False):
        seen.append((len(steps), whole_epoch))
        real(steps, whole_epoch=whole_epoch)  # the probe's real step times are well-formed
        return 0.5

    monkeypatch.setattr(budget_mod, "probe_seconds_per_iteration", timed)
    monkeypatch.setattr(budget_mod, "_clock", _FakeClock())
    out = tmp_path / "budget"
    tr = Trainer(tiny_config(data_root, out, "train.iterations=40", "train.time_budget_s=20"))
    assert seen == [(tr.niter_per_epoch + 2, True)]  # 6 iterations an epoch: timed whole
    assert tr.cfg.train.iterations == int(MARGIN * 18 / 0.5) == 34
    assert sorted(p.name for p in out.iterdir()) == []  # the probe wrote nothing here
    summary = tr.fit()
    assert summary["iterations"] == 34 and len(summary["step_seconds"]) == 34
    assert json.loads((out / "config.json").read_text())["train"]["iterations"] == 34

    plain = Trainer(tiny_config(data_root, tmp_path / "plain", "train.iterations=34")).fit()
    assert plain["last_loss"] == summary["last_loss"]

    def no_probe(steps, whole_epoch=False):
        raise AssertionError("a resumed run must not time itself again")

    monkeypatch.setattr(budget_mod, "probe_seconds_per_iteration", no_probe)
    again = Trainer(tiny_config(data_root, out, "train.iterations=40", "train.time_budget_s=20"))
    assert again.cfg.train.iterations == 34
    assert again.fit()["iterations_run"] == 0  # already done: nothing left to run

    monkeypatch.setattr(budget_mod, "probe_seconds_per_iteration", timed)
    fits = Trainer(tiny_config(data_root, tmp_path / "fits", "train.iterations=30", "train.time_budget_s=1000",
                               "train.resume=none"))
    assert fits.cfg.train.iterations == 30  # 30 of 0.5 s fit easily: unchanged


def test_the_probe_leaves_no_loader_worker_behind(data_root, tmp_path, monkeypatch):
    """The throwaway trainer's persistent loader workers are gone once the run's trainer is built
    (its own loader starts its workers only when it is iterated)."""
    import multiprocessing

    monkeypatch.setattr(budget_mod, "probe_seconds_per_iteration", lambda steps, whole_epoch=False: 0.5)
    before = set(multiprocessing.active_children())
    tr = Trainer(tiny_config(data_root, tmp_path, "train.iterations=40", "train.time_budget_s=1000",
                             "data.num_workers=1"))
    assert tr.cfg.train.iterations == 40
    assert set(multiprocessing.active_children()) == before


class _StepClock:
    """Each call advances 1 s: every interval the estimate times is 1 s."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def test_eval_estimate_by_hand(data_root, tmp_path, monkeypatch):
    """With every timed interval 1 s: one pass is 1 s per sampled image, scaled to train + val
    images; the linear probe is 1 s per timed epochs, scaled to eval.linear_epochs and the train
    images, once per backbone; passes are teacher, twin and the twin in grey for a colour model."""
    import torch

    from dino_fast.methods import build_backbone
    from tests._train_utils import make_image_folder

    val = make_image_folder(tmp_path / "val", per_class=3, seed=1)
    n_train, n_val = 3 * 8, 3 * 3
    cfg = tiny_config(data_root, tmp_path / "o", f"data.val_root={val}", "eval.knn_after_training=true",
                      "eval.image_size=32", "eval.resize_size=36", "eval.linear_epochs=10")
    backbone = build_backbone(cfg, teacher=True)
    monkeypatch.setattr(budget_mod, "_clock", _StepClock())
    est = estimate_eval_seconds(cfg, backbone, torch.device("cpu"))
    sample = min(n_train, budget_mod.EVAL_SAMPLE)  # 24: every train image
    assert est.images == n_train + n_val and est.passes == 3
    assert est.pass_seconds == pytest.approx(1.0 / sample * (n_train + n_val))
    assert est.scan_seconds == pytest.approx(1.0 / sample * (n_train + n_val))  # the file checks: 1 s for the sample
    linear_one = 1.0 * (10 / budget_mod.LINEAR_TIMED_EPOCHS) * (n_train / min(n_train, budget_mod.LINEAR_SAMPLE))
    assert est.linear_seconds == pytest.approx(2 * linear_one)
    assert est.seconds == pytest.approx(budget_mod.EVAL_SLACK * (3 * est.pass_seconds + est.linear_seconds)
                                        + est.scan_seconds)

    def with_(*extra):
        c = tiny_config(data_root, tmp_path / "o", f"data.val_root={val}", "eval.knn_after_training=true",
                        "eval.image_size=32", "eval.resize_size=36", *extra)
        return estimate_eval_seconds(c, build_backbone(c, teacher=True), torch.device("cpu"))

    grey = with_("model.grayscale_input=true")
    assert grey.passes == 2  # the grey reading of the twin is what the model already does
    alone = with_("eval.compare_random_init=false", "eval.linear_after_training=false")
    assert alone.passes == 1 and alone.linear_seconds == 0.0
    assert with_("eval.knn_after_training=false") is None
    no_val = tiny_config(data_root, tmp_path / "o", "eval.knn_after_training=true")
    assert estimate_eval_seconds(no_val, backbone, torch.device("cpu")) is None  # nothing to evaluate on
    # a folder above the grey reading's cap: that reading is every 4th image of each split
    monkeypatch.setattr(collapse_mod, "GREY_SAMPLE_IMAGES", 10)  # 33 images: stride 4, 6 train + 3 val
    sampled = with_()
    assert sampled.passes == pytest.approx(2 + (6 + 3) / (n_train + n_val))
    assert sampled.seconds == pytest.approx(budget_mod.EVAL_SLACK * (sampled.passes * sampled.pass_seconds
                                                                     + sampled.linear_seconds) + sampled.scan_seconds)


def test_the_evaluation_estimate_comes_out_of_the_budget(data_root, tmp_path, monkeypatch):
    """Budget 20 s, probe 2 s, evaluation estimated at 6 s, 0.5 s per step:
    int(0.95 * (20 - 2 - 6) / 0.5) = 22 iterations of the 40 asked."""
    monkeypatch.setattr(budget_mod, "probe_seconds_per_iteration", lambda steps, whole_epoch=False: 0.5)
    monkeypatch.setattr(budget_mod, "_clock", _FakeClock())
    monkeypatch.setattr(budget_mod, "estimate_eval_seconds",
                        lambda cfg, backbone, device, train_precision: EvalEstimate(6.0, 100, 2, 2.5, 1.0))
    tr = Trainer(tiny_config(data_root, tmp_path, "train.iterations=40", "train.time_budget_s=20"))
    assert tr.cfg.train.iterations == int(MARGIN * 12 / 0.5) == 22


def _reduce_worker(rank: int, world_size: int, port: int) -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        fake = SimpleNamespace(_collective_device=lambda: torch.device("cpu"))
        got = Trainer._reduce_max(fake, 0.25 + rank)  # rank 1 is the slow one
        assert got == 1.25, (rank, got)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_takes_the_slowest_ranks_step_time():
    """Two gloo ranks measuring 0.25 s and 1.25 s per step both get 1.25 s: the same length on
    every rank (one that stopped earlier would leave the other in a collective)."""
    from tests._dist_utils import free_port, spawn_ranks

    spawn_ranks(_reduce_worker, (2, free_port()), 2, 120, "the two ranks' step-time reduction")


def test_the_trainer_estimates_its_evaluation_on_a_fresh_backbone(data_root, tmp_path, monkeypatch):
    """With an evaluation to run, the budget times it (the real estimate) on a fresh backbone of
    the run's architecture, not on the probe's teacher (sharded under FSDP)."""
    seen = []
    real = budget_mod.estimate_eval_seconds

    def spy(cfg, backbone, device, train_precision="fp32"):
        est = real(cfg, backbone, device, train_precision)
        seen.append((type(backbone).__name__, backbone.embed_dim, len(backbone.blocks), est))
        return est

    monkeypatch.setattr(budget_mod, "probe_seconds_per_iteration", lambda steps, whole_epoch=False: 0.5)
    monkeypatch.setattr(budget_mod, "estimate_eval_seconds", spy)

    def no_teacher(self):
        raise AssertionError("the budget must not read the probe's teacher (FSDP: rank 0's file only)")

    monkeypatch.setattr(Trainer, "eval_backbone", no_teacher)
    tr = Trainer(tiny_config(data_root, tmp_path, "train.iterations=40", "train.time_budget_s=1000",
                             "eval.knn_after_training=true", f"data.val_root={data_root}", "eval.image_size=32",
                             "eval.resize_size=36", "eval.linear_epochs=4"))
    assert tr.cfg.train.iterations == 40
    (name, dim, depth, est), = seen
    assert (name, dim, depth) == ("VisionTransformer", 192, 1)
    assert est.images == 2 * 24 and est.passes == 3 and est.seconds > 0

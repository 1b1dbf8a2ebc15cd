"""Kill and resume: SIGKILL at five named moments, then ``train.resume=auto``, ends bit-identical
to the uninterrupted run; a kill during a checkpoint write leaves the previous one loadable;
SIGTERM writes a checkpoint and exits 0 with a message.

The kills are made deterministic with the test-only hook ``DINO_FAST_FAULT=<point>:<iteration>``
(see :mod:`dino_fast.utils.checkpoint`). The killed runs are real ``python -m dino_fast train``
subprocesses; the resumed runs go through the same ``main`` in this process (saves a second of
interpreter start per run; the code path is the CLI's). Every run uses one CPU thread so that the
arithmetic is reproducible bit for bit.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_fast.train.loop import main
from dino_fast.utils import checkpoint as ck
from tests._train_utils import read_losses, tiny_config, write_config

REPO = Path(__file__).resolve().parents[2]
# 24 images, batch 4: 6 iterations per epoch; checkpoints after iterations 2, 5, 8, 11
RUN = ("train.max_iters=12", "train.checkpoint_every_iters=3", "train.threads=1")


def run_cli(config: Path, *overrides: str, env_extra: dict | None = None, timeout: float = 120.0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DINO_FAST_FAULT", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dino_fast", "train", "--config", str(config), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The uninterrupted run: its final checkpoint and its losses."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["--config", str(write_config(tiny_config(data_root, out, *RUN), out.parent / "ref.yaml"))]) == 0
    return ck.load_checkpoint(out / "checkpoint.pth"), read_losses(out)


def assert_same_final_state(ref: dict, got: dict) -> None:
    assert got["iteration"] == ref["iteration"] == 12
    for side in ("student", "teacher"):
        assert ref[side].keys() == got[side].keys()
        for k, v in ref[side].items():
            assert torch.equal(v, got[side][k]), f"{side}.{k} differs from the uninterrupted run"
    assert torch.equal(ref["method"]["state"]["dino_loss.center"], got["method"]["state"]["dino_loss.center"])
    for pid, st in ref["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(got["optimizer"]["state"][pid][k])), (pid, k)


# (fault, iteration it is injected at, iteration of the checkpoint that must survive the kill)
KILLS = [
    ("mid_iteration", 7, 6),       # after backward, before the optimizer step
    ("checkpoint_write", 5, 3),    # half of the checkpoint after iteration 5 on disk
    ("after_checkpoint", 5, 6),    # right after that checkpoint was renamed into place
    ("data_loading", 10, 9),       # while the loader fetches the batch of iteration 10
    ("before_ema", 4, 3),          # student stepped, teacher not yet averaged
]


@pytest.mark.slow
@pytest.mark.parametrize("point,at,survivor", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_then_resume_is_bit_identical(point, at, survivor, data_root, reference, tmp_path):
    ref_ckpt, ref_losses = reference
    out = tmp_path / "run"
    cfg = write_config(tiny_config(data_root, out, *RUN), tmp_path / "run.yaml")
    killed = run_cli(cfg, env_extra={"DINO_FAST_FAULT": f"{point}:{at}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # the losses logged before the kill are the reference's
    before = read_losses(out)
    assert max(before) == at - (point in ("data_loading", "mid_iteration", "before_ema"))
    assert all(before[i] == ref_losses[i] for i in before)
    # whatever moment it died at, checkpoint.pth is a whole, loadable checkpoint
    survived = ck.load_checkpoint(out / "checkpoint.pth")
    assert survived["iteration"] == survivor
    stale = sorted(p.name for p in out.glob(".checkpoint.pth.*.tmp"))
    assert bool(stale) == (point == "checkpoint_write"), stale  # only a torn write leaves a temporary

    assert main(["--config", str(cfg), "train.resume=auto"]) == 0
    assert not list(out.glob(".checkpoint.pth.*.tmp")), "the resumed run removes the torn temporary"
    assert_same_final_state(ref_ckpt, ck.load_checkpoint(out / "checkpoint.pth"))
    losses = read_losses(out)  # the metrics of the replayed iterations are appended again
    assert [losses[i] for i in range(12)] == [ref_losses[i] for i in range(12)]


def test_fault_spec_is_validated(monkeypatch):
    monkeypatch.setenv("DINO_FAST_FAULT", "mid_iteraton:3")
    with pytest.raises(ValueError, match="one of data_loading, mid_iteration"):
        ck.fault_point("mid_iteration", 3)
    monkeypatch.setenv("DINO_FAST_FAULT", "mid_iteration:3")
    ck.fault_point("mid_iteration", 2)  # another iteration: nothing happens
    ck.fault_point("before_ema", 3)  # another point: nothing happens


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(data_root, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tiny_config(data_root, out, "train.threads=1", "train.epochs=100",
                                   "train.checkpoint_every_iters=0"), tmp_path / "run.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DINO_FAST_FAULT", None)
    proc = subprocess.Popen([sys.executable, "-m", "dino_fast", "train", "--config", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 90
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.05)
        assert not (out / "checkpoint.pth").exists()  # no periodic checkpoint in this run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received at iteration" in err and "resume with train.resume=auto" in err
    st = ck.load_checkpoint(out / "checkpoint.pth")
    last = max(read_losses(out))
    assert st["iteration"] == last + 1  # the checkpoint holds every finished iteration
    assert 3 <= st["iteration"] < 600
    # and the run goes on from there
    n = st["iteration"] + 2
    assert main(["--config", str(cfg), "train.resume=auto", f"train.max_iters={n}"]) == 0
    assert ck.load_checkpoint(out / "checkpoint.pth")["iteration"] == n

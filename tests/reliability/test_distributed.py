"""Distributed on CPU (gloo): 2 ranks at batch b train as 1 process at batch 2b; two "nodes" on
localhost; rank 0 alone writes checkpoints and logs; every rank resumes from them.

Why it can match: the loader gives rank r of W the samples ``order[r::W]`` of one epoch order,
so at every iteration the W per-rank batches are together the single process's batch; the
augmentation parameters are a counter-based hash of (seed, epoch, sample index, crop) (the same
whatever the batch split); the loss is a mean over the batch and DDP averages the gradients;
the center is all-reduced. Drop path is off (``model.drop_path_rate=0``): it draws per-sample
masks from each rank's own random stream, which cannot match one process's stream.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dino_fast.data.augment import MultiCropAugment, counter_uniform
from dino_fast.data.crops import _key, uniform01
from dino_fast.train.loop import Trainer
from dino_fast.utils import checkpoint as ck
from tests._dist_utils import free_port, spawn_ranks
from tests._train_utils import read_losses, tiny_config, write_config

REPO = Path(__file__).resolve().parents[2]
ITERS = 20
# 24 images; 3 iterations per epoch at global batch 8; 7 epochs hold the 20 iterations
COMMON = ("model.drop_path_rate=0", "train.epochs=7", "train.threads=1", "train.dist_backend=gloo",
          "train.checkpoint_every_iters=5")


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    e.pop("DINO_FAST_FAULT", None)
    return e


def torchrun(args: list[str], config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "dino_fast", "train",
            "--config", str(config), *overrides]


def run(cmd: list[str], timeout: float = 240.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single(data_root, tmp_path_factory):
    """One process at batch 8: losses of the 20 iterations and the final center."""
    out = tmp_path_factory.mktemp("single")
    Trainer(tiny_config(data_root, out, *COMMON, "data.batch_size_per_gpu=8", f"train.max_iters={ITERS}")).fit()
    return read_losses(out), ck.load_checkpoint(out / "checkpoint.pth")


def metric_lines(out: Path) -> list[int]:
    return [yaml.safe_load(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_losses_match(single_losses: dict, got: dict, n: int) -> None:
    for i in range(n):
        a, b = single_losses[i], got[i]
        assert math.isfinite(b) and abs(a - b) <= 1e-5 * abs(a), f"iteration {i}: single {a!r}, 2 ranks {b!r}"


@pytest.mark.slow
def test_two_ranks_match_one_process_and_resume_from_rank0_checkpoint(data_root, single, tmp_path):
    single_losses, single_ckpt = single
    out = tmp_path / "ddp"
    cfg = write_config(tiny_config(data_root, out, *COMMON, "data.batch_size_per_gpu=4"), tmp_path / "ddp.yaml")
    launch = ["--standalone", "--nproc_per_node", "2"]
    # first half, then a fresh torchrun that resumes every rank from rank 0's checkpoint
    first = run(torchrun(launch, cfg, "train.max_iters=10"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert ck.load_checkpoint(out / "checkpoint.pth")["world_size"] == 2
    second = run(torchrun(launch, cfg, "train.max_iters=20", "train.resume=auto"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("resumed from") == 1  # logged by rank 0 only; rank 1 resumed silently
    # rank 0 alone logs: one metrics line per iteration, no duplicate from rank 1
    assert metric_lines(out) == list(range(ITERS))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint.pth"]

    assert_losses_match(single_losses, read_losses(out), ITERS)
    got = ck.load_checkpoint(out / "checkpoint.pth")
    assert got["iteration"] == ITERS
    c1, c2 = single_ckpt["method"]["state"]["dino_loss.center"], got["method"]["state"]["dino_loss.center"]
    assert torch.allclose(c1, c2, rtol=1e-5, atol=1e-6), (c1 - c2).abs().max()
    assert not torch.equal(c2, torch.zeros_like(c2))


@pytest.mark.slow
def test_two_nodes_on_localhost(data_root, single, tmp_path):
    single_losses, _ = single
    out = tmp_path / "nodes"
    cfg = write_config(tiny_config(data_root, out, *COMMON, "data.batch_size_per_gpu=4"), tmp_path / "nodes.yaml")
    port = free_port()
    procs = []
    for node in (0, 1):
        args = ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
        procs.append(subprocess.Popen(torchrun(args, cfg, "train.max_iters=6"), cwd=REPO, env=env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=240)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node, (rc, err) in enumerate(results):
        assert rc == 0, f"node {node}: {err[-3000:]}"
    assert metric_lines(out) == list(range(6))
    assert_losses_match(single_losses, read_losses(out), 6)
    assert ck.load_checkpoint(out / "checkpoint.pth")["world_size"] == 2


def test_augmentation_does_not_depend_on_the_batch_split():
    aug = MultiCropAugment(local_crops_number=2)
    g = torch.randint(0, 256, (6, 2, 3, 16, 16), dtype=torch.uint8)
    loc = torch.randint(0, 256, (6, 2, 3, 8, 8), dtype=torch.uint8)
    ids = torch.from_numpy(np.random.default_rng().choice(10_000, 6, replace=False))
    seed, epoch = int(np.random.default_rng().integers(0, 2**40)), 3
    whole = aug(g, loc, sample_ids=ids, seed=seed, epoch=epoch)
    halves = [aug(g[s], loc[s], sample_ids=ids[s], seed=seed, epoch=epoch) for s in (slice(0, 3), slice(3, 6))]
    reordered = aug(g.flip(0), loc.flip(0), sample_ids=ids.flip(0), seed=seed, epoch=epoch)
    for c in range(4):
        assert torch.equal(whole[c], torch.cat([halves[0][c], halves[1][c]]))
        assert torch.equal(whole[c], reordered[c].flip(0))
    other_epoch = aug(g, loc, sample_ids=ids, seed=seed, epoch=epoch + 1)
    assert not all(torch.equal(a, b) for a, b in zip(whole, other_epoch))
    with pytest.raises(ValueError, match=r"sample_ids must have shape \(6,\)"):
        aug(g, loc, sample_ids=ids[:5])


def test_counter_uniform_is_the_crop_hash():
    rng = np.random.default_rng()
    seed, epoch = int(rng.integers(0, 2**62)), int(rng.integers(0, 1000))
    samples = rng.integers(0, 2**40, 5)
    crops = rng.integers(0, 12, 5)
    u = counter_uniform(seed, epoch, samples, crops, 3, first_draw=7)
    for n in range(5):
        key = _key(seed, epoch, int(samples[n]), int(crops[n]))
        for j in range(3):
            bits = int(uniform01(key, 7 + j) * 2**32) >> 8  # the same 32-bit hash, top 24 bits
            assert u[n, j] == np.float32(bits * 2.0**-24)
    assert u.dtype == np.float32 and (u >= 0).all() and (u < 1).all()


def _one_rank_fails_body(rank: int, data_root: str, out: str) -> dict:
    """The two runs of :func:`_one_rank_fails_worker`; returns what this rank raised. The trainers
    (and their DDP reducers, which hold the process group) are locals, gone when it returns."""
    import signal as sig

    from dino_fast.train.loop import NonFiniteLossError, TrainingInterrupted

    res = {}
    cfg = tiny_config(Path(data_root), Path(out), *COMMON, "train.max_iters=12")
    tr = Trainer(cfg)
    orig = tr.train_step

    def step(g, l, epoch, it, sample_ids=None):
        if rank == 1 and it == 2:
            os.kill(os.getpid(), sig.SIGTERM)  # a real signal, to this rank only
        return orig(g, l, epoch, it, sample_ids=sample_ids)

    tr.train_step = step
    try:
        tr.fit()
    except TrainingInterrupted as e:
        res["stop"] = str(e)
    tr2 = Trainer(tiny_config(Path(data_root), Path(out), *COMMON, "train.max_iters=12", "train.resume=auto"))
    fwd = tr2.student.forward
    calls = {"n": 0}

    def poisoned(x):
        y = fwd(x)
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:  # iteration 3 + 2 = 5 after resuming at 3
            y = y.clone()
            y[1 * 4 + 2, 0] = float("nan")  # crop 1, row 2
        return y

    tr2.student.forward = poisoned
    try:
        tr2.fit()
    except NonFiniteLossError as e:
        res["nan"] = str(e)
    return res


def _one_rank_fails_worker(rank: int, world: int, port: int, data_root: str, out: str, result_dir: str) -> None:
    """Rank ``rank`` of a 2-rank gloo run: SIGTERM reaches rank 1 only at iteration 2, then
    (after a resume) rank 1 alone sees a NaN at iteration 5. Writes what each rank raised."""
    import gc
    import json

    import torch.distributed as dist

    from dino_fast.utils.distributed import cleanup

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    res: dict = {}
    ok = False
    try:
        res = _one_rank_fails_body(rank, data_root, out)
        ok = True
    finally:
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(res))
        # Teardown order: every rank past its last collective, the trainers' DDP reducers (which
        # hold the process group) collected, then the group destroyed. Destroying it while a
        # reducer is alive left gloo threads to be torn down at exit, which aborted a rank
        # ("terminate called without an active exception") in some runs.
        if ok and dist.is_initialized():
            dist.barrier()
        gc.collect()
        cleanup()


@pytest.mark.slow
def test_a_signal_or_a_nan_on_one_rank_stops_every_rank_at_the_same_iteration(data_root, tmp_path):
    """No rank is left waiting in a collective: the stop and non-finite flags ride on the
    per-iteration all-reduce, so both ranks stop together, rank 1 names the crop and row."""
    import json

    out, res_dir = tmp_path / "out", tmp_path / "res"
    res_dir.mkdir()
    spawn_ranks(_one_rank_fails_worker, (2, free_port(), str(data_root), str(out), str(res_dir)), 2, 180,
                "the ranks (one stuck in a collective?)")
    r0, r1 = (json.loads((res_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert "SIGTERM received at iteration 2" in r1["stop"]
    assert "a stop signal on another rank received at iteration 2" in r0["stop"]
    assert "at iteration 5" in r0["nan"] and "at iteration 5" in r1["nan"]
    assert "student_output has a non-finite value (nan) at crop 1, row 2" in r1["nan"] and "on rank 1" in r1["nan"]
    assert "another rank holds the non-finite value" in r0["nan"]
    st = ck.load_checkpoint(out / "checkpoint.pth")
    assert st["iteration"] == 5  # written after iteration 4 (checkpoint_every_iters=5), the last good one

"""Mugs on 2 ranks (gloo, torchrun) at batch b against 1 process at batch 2b: the same losses, the
same group center, and queues and memories that hold the same rows. The gather is rank-major, so
within each step's block the rows are a permutation of the single process's (rank r holds the
samples ``order[r::2]``); a queue or memory is compared as a set of rows, which is all a loss or a
top-k lookup reads. Drop path is off (it draws from each rank's own stream)."""
from __future__ import annotations

import pytest
import torch

from dino_fast.train.loop import Trainer
from dino_fast.utils import checkpoint as ck
from tests._train_utils import read_losses, tiny_config, write_config
from tests.reliability.test_distributed import assert_losses_match, run, torchrun

ITERS = 6
COMMON = ("method.name=mugs", "model.drop_path_rate=0", "train.epochs=3", "train.threads=1",
          "train.dist_backend=gloo", "mugs.queue_size=32", "mugs.memory_size=24")


def _same_rows(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """Every row of a has a partner in b within tol and vice versa (a and b: [n, d], same n)."""
    d = torch.cdist(a.double(), b.double())
    return a.shape == b.shape and bool((d.min(1).values < tol).all() and (d.min(0).values < tol).all())


@pytest.mark.slow
def test_two_ranks_match_one_process(data_root, tmp_path):
    single = tmp_path / "single"
    Trainer(tiny_config(data_root, single, *COMMON, "data.batch_size_per_gpu=8", f"train.max_iters={ITERS}")).fit()
    out = tmp_path / "ddp"
    cfg = write_config(tiny_config(data_root, out, *COMMON, "data.batch_size_per_gpu=4"), tmp_path / "ddp.yaml")
    proc = run(torchrun(["--standalone", "--nproc_per_node", "2"], cfg, f"train.max_iters={ITERS}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_losses_match(read_losses(single), read_losses(out), ITERS)
    a = ck.load_checkpoint(single / "checkpoint.pth")["method"]["state"]
    b = ck.load_checkpoint(out / "checkpoint.pth")["method"]["state"]
    assert torch.allclose(a["group_loss.center"], b["group_loss.center"], rtol=1e-5, atol=1e-6)
    for key in ("instance_loss.queue", "local_group_loss.queue", "student_memory.memory", "teacher_memory.memory"):
        assert _same_rows(a[key], b[key]), key
    for key in ("instance_loss.queue_ptr", "local_group_loss.queue_ptr", "student_memory.ptr", "teacher_memory.ptr"):
        assert int(a[key]) == int(b[key]), key

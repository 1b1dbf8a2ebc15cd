"""Sinkhorn-Knopp teacher targets against DINOv2's formulation in float64, their marginals,
overflow safety, 2 ranks = 1 process, and the DINO method with loss.centering=sinkhorn_knopp."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dino_fast.config import ConfigError, load_config
from dino_fast.losses.sinkhorn import sinkhorn_knopp_targets
from dino_fast.reference.sinkhorn import sinkhorn_knopp_reference
from dino_fast.train.loop import Trainer
from tests._dist_utils import free_port
from tests._train_utils import tiny_config


@pytest.mark.parametrize("rows,K,tau", [(2, 3, 0.1), (8, 64, 0.04), (64, 1000, 0.07), (5, 7, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_dinov2_in_float64(rows, K, tau, dtype):
    T = (2 * torch.randn(rows, K)).to(dtype)
    got = sinkhorn_knopp_targets(T, tau)
    want = sinkhorn_knopp_reference(T.double(), tau)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (rows, K)
    # fp32: log-domain values up to |T|/tau ~ 100 carry ~1e-7 relative error, ~1e-5 relative in Q
    torch.testing.assert_close(got.double(), want, rtol=1e-4 if dtype != torch.float64 else 1e-12, atol=1e-12)
    torch.testing.assert_close(got.sum(1).double(), torch.ones(rows, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_marginals_approach_uniform_with_iterations():
    T = torch.randn(32, 16, dtype=torch.float64)
    gaps = []
    for n in (1, 3, 200):
        Q = sinkhorn_knopp_targets(T, 0.5, n_iterations=n)
        gaps.append((Q.sum(0) - 32 / 16).abs().max().item())  # each prototype's mass -> rows / K
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4


def test_large_logits_stay_finite():
    """T / tau far above 88: DINOv2's fp32 formulation overflows, the max-subtracted one does not."""
    T = torch.randn(16, 32) * 4  # T / tau up to ~400
    assert not torch.isfinite(sinkhorn_knopp_reference(T, 0.04)).all()  # the failure mode avoided
    got = sinkhorn_knopp_targets(T, 0.04)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), sinkhorn_knopp_reference(T.double(), 0.04), rtol=1e-4, atol=1e-10)


def test_far_below_prototype_keeps_its_mass():
    """A prototype whose logits all lie ~1000/tau below the others: exp underflows to 0 for it in
    fp32 whatever maximum is subtracted; the log-domain iterations still give it mass 1/K."""
    T0 = torch.randn(8, 5)
    T = T0.clone()
    T[:, 2] -= 40.0
    Q = sinkhorn_knopp_targets(T, 0.04)
    assert torch.isfinite(Q).all()
    assert not torch.isfinite(sinkhorn_knopp_reference(T.double(), 0.04)).all()  # even float64 loses it
    # a constant added to a whole column cancels in the first prototype normalisation, up to the
    # fp32 rounding of T / tau near -1000 (ulp 6.1e-5 in the log): over 300 seeds the worst
    # relative error in Q was 1.6e-4 (native kernel) and 1.5e-4 (eager log-domain path), so 1e-4
    # failed ~2 % of seeds on both paths
    torch.testing.assert_close(Q.double(), sinkhorn_knopp_reference(T0.double(), 0.04), rtol=4e-4, atol=1e-9)


@pytest.mark.parametrize("bad,match", [(torch.randn(3), "non-empty"), (torch.zeros(0, 4), "non-empty"),
                                       (torch.ones(2, 3, dtype=torch.long), "floating point")])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn_knopp_targets(bad, 0.1)
    with pytest.raises(ValueError, match="teacher_temp must be a positive"):
        sinkhorn_knopp_targets(torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp_targets(torch.randn(2, 3), 0.1, n_iterations=0)


def _rank_worker(rank: int, world: int, port: int, T: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = T.shape[0] // world
        Q = sinkhorn_knopp_targets(T[rank * rows:(rank + 1) * rows], 0.07)
        torch.save(Q, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    T = 2 * torch.randn(12, 40, dtype=torch.float64)
    mp.start_processes(_rank_worker, args=(2, free_port(), T, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)])
    torch.testing.assert_close(got, sinkhorn_knopp_targets(T, 0.07), rtol=1e-12, atol=1e-15)


def test_dino_with_sinkhorn_knopp_trains_and_keeps_the_center(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path, "train.max_iters=3", "loss.centering=sinkhorn_knopp")
    tr = Trainer(cfg)
    summary = tr.fit()
    assert math.isfinite(summary["last_loss"])
    assert torch.count_nonzero(tr.method.dino_loss.center) == 0  # no center in this mode
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/dino"]) for r in rec)
    with pytest.raises(ConfigError, match="loss.centering must be one of"):
        load_config(None, ["loss.centering=softmax"])


def test_sinkhorn_loss_is_the_cross_entropy_to_the_targets():
    """DINOLoss.sinkhorn_forward (the DINO and DINOv2 methods' SK loss) equals the official pair
    loop with the SK targets as teacher probs."""
    from dino_fast.losses.dino import DINOLoss

    loss = DINOLoss(50, 4, 0.04, 0.04, 0, 2, backend="torch")
    S, T = torch.randn(4 * 3, 50, dtype=torch.float64), torch.randn(2 * 3, 50, dtype=torch.float64)
    got = loss.sinkhorn_forward(S, T, 0)
    Q = sinkhorn_knopp_reference(T, 0.04).chunk(2)
    logp = torch.log_softmax(S / 0.1, -1).chunk(4)
    want = sum(-(Q[i] * logp[v]).sum(-1).mean() for i in range(2) for v in range(4) if v != i) / 6
    assert abs(got.item() - want.item()) < 1e-9

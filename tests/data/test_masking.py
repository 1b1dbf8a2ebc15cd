"""DINOv2 block masks from the counter hash: equal to the op-by-op restatement of DINOv2's
generator on the same draws, stratified ratios, determinism, 2 ranks = 1 process."""
from __future__ import annotations

import random

import numpy as np
import pytest

from dino_fast.data.loader import epoch_order, shard_indices
from dino_fast.data.masking import CounterStream, block_mask, global_crop_masks, mask_positions
from dino_fast.reference.masking import collate_masks_reference, mask_generator_reference


class _StreamRandom:
    """Python-``random``-like view of a CounterStream (uniform(a, b), inclusive randint)."""

    def __init__(self, stream: CounterStream) -> None:
        self.s = stream

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.s.uniform()

    def randint(self, a: int, b: int) -> int:
        return a + int(self.s.uniform() * (b - a + 1))


def _seed() -> int:
    return random.SystemRandom().randrange(0, 2**31)


@pytest.mark.parametrize("H,W", [(16, 16), (14, 14), (8, 8), (5, 9), (2, 2)])
def test_block_mask_equals_the_dinov2_restatement_on_the_same_draws(H, W):
    seed = _seed()
    N = H * W
    rs = np.random.default_rng(seed)
    for k in range(60):
        target = int(rs.integers(0, N // 2 + 2))
        got = block_mask(CounterStream(seed, 1, k, 0), H, W, target, max_num_patches=int(0.5 * N))
        want = mask_generator_reference(_StreamRandom(CounterStream(seed, 1, k, 0)), H, W, target,
                                        max_num_patches=int(0.5 * N))
        assert np.array_equal(got, want), (seed, k, target)
        assert got.sum() <= target


def test_block_mask_blocks_respect_the_max_and_the_target():
    seed = _seed()
    for k in range(200):
        m = block_mask(CounterStream(seed, 0, k, 1), 16, 16, 128, max_num_patches=128)
        assert 0 < m.sum() <= 128
    assert not block_mask(CounterStream(seed, 0, 0, 0), 16, 16, 0).any()
    with pytest.raises(ValueError, match="num_masking_patches must be >= 0"):
        block_mask(CounterStream(seed, 0, 0, 0), 4, 4, -1)


def _masks(seed, epoch, batch, ids, rank=0, world=1, grid=(16, 16), **kw):
    return global_crop_masks(seed=seed, epoch=epoch, batch=batch, sample_ids=ids, rank=rank, world_size=world,
                             grid=grid, **kw)


def test_stratified_ratios_and_half_of_the_crops_masked():
    """Exactly int(G * 0.5) crops get a (non-empty) mask; sorted by size, the masked counts never
    exceed their stratum's upper end int(N * probs[i+1]) and, on average over batches, they sit
    in their strata (block growth can stop short of the target, never above it)."""
    seed = _seed()
    B, N = 32, 256
    G = 2 * B
    n_masked = G // 2
    probs = np.linspace(0.1, 0.5, n_masked + 1)
    sorted_counts = []
    for batch in range(20):
        m = _masks(seed, 0, batch, np.arange(batch * B, (batch + 1) * B))
        assert m.shape == (G, N) and m.dtype == bool
        counts = m.sum(1)
        assert (counts > 0).sum() == n_masked
        c = np.sort(counts[counts > 0])
        assert (c <= (N * probs[1:]).astype(int)).all()
        sorted_counts.append(c)
    mean = np.mean(sorted_counts, axis=0) / N
    mid = (probs[:-1] + probs[1:]) / 2
    assert np.abs(mean - mid).max() < 0.06, (mean, mid)
    assert mean[0] < 0.15 and mean[-1] > 0.4


def test_ratio_statistics_match_the_dinov2_collate_restatement():
    """Mean and spread of the masked counts: counter-hash masks vs DINOv2's collate restated with
    Python's random, over 40 batches of 64 crops on a 16 x 16 grid."""
    seed = _seed()
    rng = random.Random(seed)
    ours, theirs = [], []
    for batch in range(40):
        ours.append(_masks(seed, 2, batch, np.arange(32) + 32 * batch).sum(1))
        theirs.append(collate_masks_reference(rng, 64, 16, 16)["masks"].sum(1))
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    assert (ours > 0).mean() == (theirs > 0).mean() == 0.5
    mo, mt = ours[ours > 0].mean(), theirs[theirs > 0].mean()
    so = ours[ours > 0].std()
    assert abs(mo - mt) < 4 * so / np.sqrt(ours.size / 2) * 1.5, (mo, mt)
    assert abs(so - theirs[theirs > 0].std()) < 0.15 * so


def test_reference_collate_outputs():
    rng = random.Random(_seed())
    out = collate_masks_reference(rng, 8, 14, 14)
    m = out["masks"]
    assert (m.sum(1) > 0).sum() == 4
    assert np.array_equal(out["mask_indices"], np.flatnonzero(m))
    w = np.zeros(m.shape)
    w[m] = out["masks_weight"]
    assert np.allclose(w.sum(1)[m.sum(1) > 0], 1.0)
    assert out["n_masked_patches"] == m.sum()


def test_masks_are_deterministic_and_depend_on_seed_epoch_batch():
    seed = _seed()
    ids = np.arange(16) * 3
    a = _masks(seed, 1, 2, ids)
    assert np.array_equal(a, _masks(seed, 1, 2, ids))
    assert not np.array_equal(a, _masks(seed + 1, 1, 2, ids))
    assert not np.array_equal(a, _masks(seed, 2, 2, ids))
    assert not np.array_equal(a, _masks(seed, 1, 3, ids))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_draw_the_masks_of_one_process(world):
    """W ranks at batch b (sharded as the loader shards) = one process at batch W*b, crop by crop."""
    seed = _seed()
    b, n, epoch = 5, 200, 3
    order = epoch_order(n, seed, epoch)
    one_ids = shard_indices(order, 0, 1, True)
    for batch in range(3):
        ids1 = one_ids[batch * world * b:(batch + 1) * world * b]
        one = _masks(seed, epoch, batch, ids1, grid=(14, 14))
        by_id = {}
        for c in range(2):
            for k, s in enumerate(ids1):
                by_id[(int(s), c)] = one[c * world * b + k]
        for r in range(world):
            ids = shard_indices(order, r, world, True)[batch * b:(batch + 1) * b]
            part = _masks(seed, epoch, batch, ids, rank=r, world=world, grid=(14, 14))
            for c in range(2):
                for k, s in enumerate(ids):
                    assert np.array_equal(part[c * b + k], by_id[(int(s), c)]), (r, c, k)


def test_positions_and_bad_arguments():
    assert mask_positions(3, 1, 2).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        mask_positions(3, 2, 2)
    with pytest.raises(ValueError, match="sample_ids must not be empty"):
        _masks(0, 0, 0, [])
    with pytest.raises(ValueError, match="mask_probability must be in"):
        _masks(0, 0, 0, [1], mask_probability=1.5)
    with pytest.raises(ValueError, match="ratio_min_max"):
        _masks(0, 0, 0, [1], ratio_min_max=(0.5, 0.1))
    with pytest.raises(ValueError, match="grid must be"):
        _masks(0, 0, 0, [1], grid=(0, 4))

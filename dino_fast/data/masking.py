"""DINOv2's block masks for the iBOT loss, from the counter hash (rank- and resume-independent).

Semantics (DINOv2's ``MaskingGenerator`` and ``collate_data_and_cast``, restated op by op in
:mod:`dino_fast.reference.masking`):

- Of the ``G`` global crops of a batch, ``n_masked = int(G * mask_probability)`` (DINOv2: 0.5)
  get a mask. The ``i``-th of them (``i < n_masked``) targets ``int(N * r)`` patches with
  ``r ~ U(probs[i], probs[i+1])``, ``probs = linspace(lo, hi, n_masked + 1)`` (DINOv2:
  ``lo, hi = 0.1, 0.5``): the ratios are stratified over ``[lo, hi]``. The others get an empty
  mask. The masks are then assigned to the crops in a random order.
- A mask is grown block by block: each block tries up to 10 rectangles of area
  ``U(min_num_patches, max_left)`` (``max_left = min(target - masked so far, max_num_patches)``)
  and aspect ratio ``exp(U(log 0.3, log(1/0.3)))``, placed uniformly; the first one that adds
  between 1 and ``max_left`` new patches is taken. Growth stops at the target or when a block
  adds nothing, so a mask has at most its target count. DINOv2 uses ``max_num_patches = 0.5 N``.

Where the randomness comes from (the difference to DINOv2, which draws from Python's global
``random`` per data-loader worker): every draw of crop ``c`` of sample ``s`` is
``counter_uniform(seed, epoch, s, c, draw)`` (:func:`dino_fast.data.augment.counter_uniform`,
draws from :data:`MASK_DRAW0` on, disjoint from the crop-box and photometric draws), and the
order in which the stratified masks are dealt to the crops is a permutation seeded by
``(seed, epoch, batch)`` over the **global** batch (all ranks). A crop's slot in that batch is
``crop * B_global + position``, where ``position = k * world_size + rank`` for the ``k``-th
sample of a rank's batch (the loader's sharding, :func:`dino_fast.data.loader.shard_indices`).
Hence the masks of 2 ranks at batch ``b`` are exactly those of one process at batch ``2b``, and
a resumed run draws the same masks. Stratification is therefore over the global batch, not per
GPU as in DINOv2 (the same distribution per crop; per rank the masked fraction varies around
``mask_probability`` instead of being exactly it).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .augment import counter_uniform

__all__ = ["MASK_DRAW0", "CounterStream", "block_mask", "global_crop_masks", "mask_positions"]

MASK_DRAW0 = 1 << 20  # first draw index of the mask streams (crop boxes use 0..39, photometry 64..)
_CHUNK = 256


class CounterStream:
    """The uniforms ``counter_uniform(seed, epoch, sample, crop, MASK_DRAW0 + j)``, j = 0, 1, ...

    Drawn lazily in chunks; :meth:`uniform` returns a Python float in [0, 1) (24 random bits).
    """

    def __init__(self, seed: int, epoch: int, sample: int, crop: int, first_draw: int = MASK_DRAW0) -> None:
        self._args = (int(seed), int(epoch), np.array([int(sample)]), np.array([int(crop)]))
        self._next = int(first_draw)
        self._buf: list[float] = []
        self._pos = 0

    def uniform(self) -> float:
        """The next draw in [0, 1)."""
        if self._pos == len(self._buf):
            seed, epoch, s, c = self._args
            self._buf = counter_uniform(seed, epoch, s, c, _CHUNK, first_draw=self._next)[0].tolist()
            self._next += _CHUNK
            self._pos = 0
        u = self._buf[self._pos]
        self._pos += 1
        return u


def block_mask(stream: CounterStream, height: int, width: int, num_masking_patches: int, *,
               min_num_patches: int = 4, max_num_patches: Optional[int] = None,
               min_aspect: float = 0.3) -> np.ndarray:
    """One DINOv2 block mask: bool ``[height, width]`` with at most ``num_masking_patches`` True.

    Args:
        stream: the crop's draws (anything with ``uniform() -> float in [0, 1)``).
        height, width: the patch grid (>= 1).
        num_masking_patches: target count (>= 0; 0 gives an empty mask and draws nothing).
        min_num_patches: smallest block area drawn (DINOv2: 4).
        max_num_patches: largest block area (DINOv2: half the grid); None: the target.
        min_aspect: aspect ratios are log-uniform in (min_aspect, 1 / min_aspect).

    Draw order per try (4 draws, as DINOv2's calls): area, log aspect ratio, and, for a block
    that fits, top then left (``randint(0, H - h)`` as ``floor(u * (H - h + 1))``).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}, {width}")
    if num_masking_patches < 0:
        raise ValueError(f"num_masking_patches must be >= 0, got {num_masking_patches}")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    mask = np.zeros((height, width), dtype=bool)
    max_block = num_masking_patches if max_num_patches is None else int(max_num_patches)
    la, lb = math.log(min_aspect), math.log(1.0 / min_aspect)
    count = 0
    while count < num_masking_patches:
        max_left = min(num_masking_patches - count, max_block)
        delta = 0
        for _ in range(10):
            area = min_num_patches + (max_left - min_num_patches) * stream.uniform()
            aspect = math.exp(la + (lb - la) * stream.uniform())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top = int(stream.uniform() * (height - h + 1))
                left = int(stream.uniform() * (width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_left:
                    block[...] = True
                    delta += new
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return mask


def mask_positions(batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Positions in the global batch (int64 ``[batch_size]``) of a rank's samples:
    ``k * world_size + rank`` (the loader takes every ``world_size``-th sample of the epoch order)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return np.arange(batch_size, dtype=np.int64) * world_size + rank


def global_crop_masks(
    *, seed: int, epoch: int, batch: int, sample_ids: Sequence[int], rank: int = 0, world_size: int = 1,
    n_global: int = 2, grid: tuple[int, int], mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5), max_patches_fraction: float = 0.5,
    min_num_patches: int = 4, min_aspect: float = 0.3,
) -> np.ndarray:
    """DINOv2 masks of this rank's global crops: bool ``[n_global * B, H * W]``, crop-major
    (row ``c * B + k`` is global crop ``c`` of the rank's ``k``-th sample, the order of the
    crops the method gets), flattened row-major over the ``(H, W) = grid`` patch grid.

    Args:
        seed, epoch, batch: the run seed, the epoch and the batch index within the epoch (>= 0).
        sample_ids: the rank's ``B`` dataset indices of the batch (the loader's ``batch_indices``).
        rank, world_size: this rank and the number of ranks (global batch ``B * world_size``).
        n_global: global crops per sample (DINOv2: 2).
        grid: patch grid of a global crop.
        mask_probability: fraction of the global batch's crops that are masked (DINOv2: 0.5).
        ratio_min_max: the stratified mask-ratio range (DINOv2: (0.1, 0.5)).
        max_patches_fraction: largest block as a fraction of the grid (DINOv2: 0.5).
        min_num_patches, min_aspect: as :func:`block_mask`.

    A pure function of (seed, epoch, batch, sample id, global position, crop): see the module doc.
    """
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    B = int(ids.size)
    if B == 0:
        raise ValueError("sample_ids must not be empty")
    for name, v in (("seed", seed), ("epoch", epoch), ("batch", batch)):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if n_global < 1:
        raise ValueError(f"n_global must be >= 1, got {n_global}")
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be (H, W) with H, W >= 1, got {grid!r}")
    if not 0 <= mask_probability <= 1:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    lo, hi = ratio_min_max
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"ratio_min_max must be (lo, hi) with 0 <= lo <= hi <= 1, got {ratio_min_max!r}")
    if not 0 < max_patches_fraction <= 1:
        raise ValueError(f"max_patches_fraction must be in (0, 1], got {max_patches_fraction}")
    H, W = int(grid[0]), int(grid[1])
    N = H * W
    pos = mask_positions(B, rank, world_size)
    g_batch = B * world_size
    n_slots = n_global * g_batch
    order = np.random.default_rng([int(seed), int(epoch), int(batch), 0x4D41534B]).permutation(n_slots)
    crops = np.repeat(np.arange(n_global, dtype=np.int64), B)
    samples = np.tile(ids, n_global)
    slots = crops * g_batch + np.tile(pos, n_global)
    # one uniform per crop for its ratio inside the stratum (draw MASK_DRAW0 - 1 of its stream)
    u_ratio = counter_uniform(int(seed), int(epoch), samples, crops, 1, first_draw=MASK_DRAW0 - 1)[:, 0]
    n_masked = int(n_slots * mask_probability)
    probs = np.linspace(lo, hi, n_masked + 1)
    max_block = int(max_patches_fraction * N)
    out = np.zeros((n_global * B, N), dtype=bool)
    for row in range(n_global * B):
        i = int(order[slots[row]])
        if i >= n_masked:
            continue
        target = int(N * (probs[i] + float(u_ratio[row]) * (probs[i + 1] - probs[i])))
        if target <= 0:
            continue
        stream = CounterStream(seed, epoch, int(samples[row]), int(crops[row]))
        out[row] = block_mask(stream, H, W, target, min_num_patches=min_num_patches,
                              max_num_patches=max_block, min_aspect=min_aspect).reshape(-1)
    return out

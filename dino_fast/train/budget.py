"""Fitting a run's length to a wall-clock budget (``train.time_budget_s``).

A run of ``train.iterations`` iterations takes whatever the host makes of it: the built-in
default took 412 s of training on one 2-core machine and 710 s on another. With a budget, the
trainer first times a few real steps (a throwaway trainer on the same config and data, in a
temporary directory), then caps ``train.iterations`` at what fits the rest of the budget. The run
that follows is the ordinary run of that many iterations (its schedules, epochs and warm-up are
those of the capped ``train.iterations``), so it is reproducible from its config.json, and a
resumed run keeps the length its checkpoint was trained with instead of timing again.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dino_fast.config import TrainConfig

log = logging.getLogger("dino_fast.train")

PROBE_ITERATIONS = 12  # steps the probe runs; the first two (lazy init, worker start) are not timed
SHORT_EPOCH = 48  # epochs of at most this many iterations are timed whole (see probe_steps)
MARGIN = 0.95  # of the remaining budget: per-epoch costs (checkpoints, collapse checks) the probe misses
MIN_ITERATIONS = 10  # never shorter: a run that cannot fit this many steps is not worth the budget
_clock = time.perf_counter  # the budget's clock (tests replace it)


def budget_iterations(seconds_per_iteration: float, budget_s: float, spent_s: float, wanted: int) -> int:
    """The iterations a run may take: ``min(wanted, floor(MARGIN * (budget_s - spent_s) / s_it))``,
    at least :data:`MIN_ITERATIONS` (or ``wanted`` when that is fewer).

    Args:
        seconds_per_iteration: measured wall-clock seconds per training step, > 0.
        budget_s: the training budget in seconds, > 0.
        spent_s: seconds of it already spent (the probe), >= 0.
        wanted: the configured ``train.iterations``, > 0.
    """
    for name, v in (("seconds_per_iteration", seconds_per_iteration), ("budget_s", budget_s)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if not (math.isfinite(spent_s) and spent_s >= 0):
        raise ValueError(f"spent_s must be a finite number >= 0, got {spent_s!r}")
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted <= 0:
        raise ValueError(f"wanted must be a positive int (train.iterations), got {wanted!r}")
    fits = int(MARGIN * max(budget_s - spent_s, 0.0) / seconds_per_iteration)
    return min(wanted, max(fits, MIN_ITERATIONS))


def probe_steps(niter_per_epoch: int) -> tuple[int, bool]:
    """How long the probe runs and how it reads its steps: ``(steps, whole_epoch)``.

    Every epoch end costs a checkpoint write and a loader restart (its first batch is not
    prefetched): about 2 s on 2 cores, a step's worth or more. In a short epoch that is a large
    part of the cost per iteration (the photos, 31 iterations an epoch: 0.612 s per step run
    against a 0.544 s median of steps 3-12), so an epoch of at most :data:`SHORT_EPOCH`
    iterations is timed whole: ``niter_per_epoch + 2`` steps, the mean of steps 3 to
    ``niter_per_epoch + 2``, which hold one epoch end. A longer epoch amortises it: the median of
    steps 3 to :data:`PROBE_ITERATIONS`.
    """
    if isinstance(niter_per_epoch, bool) or not isinstance(niter_per_epoch, int) or niter_per_epoch < 1:
        raise ValueError(f"niter_per_epoch must be a positive int, got {niter_per_epoch!r}")
    if niter_per_epoch <= SHORT_EPOCH:
        return niter_per_epoch + 2, True
    return PROBE_ITERATIONS, False


def probe_seconds_per_iteration(step_seconds: list[float], *, whole_epoch: bool = False) -> float:
    """Seconds per iteration from a probe's per-step wall clock (``Trainer.fit()['step_seconds']``),
    leaving out the first two steps (lazy initialisation, loader workers starting): their mean
    when they span a whole epoch (``whole_epoch``, epoch-end costs included), else their median.

    Raises:
        ValueError: fewer than 3 steps (nothing left to time) or a step time that is not > 0.
    """
    timed = list(step_seconds)[2:]
    if not timed:
        raise ValueError(f"the probe ran {len(step_seconds)} step(s); at least 3 are needed to time one "
                         "(the first two are not timed)")
    if not all(math.isfinite(t) and t > 0 for t in timed):
        raise ValueError(f"step times must be finite and > 0, got {timed}")
    return statistics.fmean(timed) if whole_epoch else statistics.median(timed)


def resumed_iterations(cfg: TrainConfig, out_dir: Path) -> Optional[int]:
    """``train.iterations`` of the checkpoint this run will resume from (``train.resume``: ``auto``
    finds the latest in ``out_dir``, or a path), or ``None`` when it starts fresh or the checkpoint
    holds no config."""
    from dino_fast.utils import checkpoint as ckpt_mod

    path = ckpt_mod.resume_path(cfg.train.resume, out_dir)
    if path is None or not path.is_file():
        return None
    # the trainer loads it again to resume: only its config is read here (tensors memory-mapped)
    saved = ckpt_mod.load_checkpoint(path, map_location="cpu", mmap=True).get("config", {})
    value = saved.get("train", {}).get("iterations")
    return value if isinstance(value, int) and value > 0 else None


def fit_to_budget(cfg: TrainConfig, make_trainer: Callable[[TrainConfig], Any], *, out_dir: Path,
                  is_main: bool = True, reduce_max: Callable[[float], float] = lambda x: x) -> TrainConfig:
    """``cfg`` with ``train.iterations`` capped to what fits ``train.time_budget_s`` (``cfg``
    unchanged when the budget is 0 or the iterations already fit).

    Args:
        cfg: a config with ``train.iterations > 0`` and ``train.time_budget_s > 0``, its data sizes
            already final (``data.auto_crops`` applied: the probe runs with it off).
        make_trainer: builds a trainer for a config (``Trainer``, with the caller's process group).
        out_dir: the run's output directory (where a checkpoint to resume from would be).
        is_main: whether this rank logs.
        reduce_max: the maximum over ranks of a float (the slowest rank sets the pace; identity
            for one process), so that every rank takes the same length.

    A resumed run (a checkpoint that ``train.resume`` would load) keeps the checkpoint's
    ``train.iterations`` and is not timed again.
    """
    budget = cfg.train.time_budget_s
    if budget <= 0:
        return cfg
    if cfg.train.iterations <= 0:
        raise ValueError("train.time_budget_s needs train.iterations > 0 (the length it caps), "
                         f"got train.iterations={cfg.train.iterations}")
    resumed = resumed_iterations(cfg, out_dir)
    if resumed is not None:
        if is_main:
            log.info("train.time_budget_s: resuming a run of %d iterations (its checkpoint's length, not timed again)",
                     resumed)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iterations=resumed))
    t0 = _clock()
    with tempfile.TemporaryDirectory(prefix="dino_fast_probe_") as tmp:
        probe_cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, auto_crops=False),
            train=dataclasses.replace(cfg.train, time_budget_s=0.0, output_dir=tmp, resume="none", progress=False,
                                      tensorboard=False, saveckp_freq=0, checkpoint_every_iters=0),
        )
        quiet = logging.getLogger("dino_fast")  # the probe's own set-up lines would read as the run's
        level = quiet.level
        quiet.setLevel(max(level, logging.WARNING))
        try:
            probe = make_trainer(probe_cfg)
            steps, whole_epoch = probe_steps(probe.niter_per_epoch)  # the epoch length is known once it is built
            probe.cfg = dataclasses.replace(probe.cfg, train=dataclasses.replace(probe.cfg.train, max_iters=steps))
            s_it = probe_seconds_per_iteration(probe.fit()["step_seconds"], whole_epoch=whole_epoch)
        finally:
            quiet.setLevel(level)
        del probe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    s_it = reduce_max(s_it)
    spent = reduce_max(_clock() - t0)
    iterations = budget_iterations(s_it, budget, spent, cfg.train.iterations)
    if is_main:
        verdict = ("fit" if iterations == cfg.train.iterations else
                   f"do not fit: train.iterations {cfg.train.iterations} -> {iterations}")
        log.info("train.time_budget_s=%g: %.3f s per iteration over %d probe steps (%s; %.1f s spent probing); "
                 "%d iterations %s", budget, s_it, steps - 2, "one epoch end included" if whole_epoch else "median",
                 spent, cfg.train.iterations, verdict)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iterations=iterations))

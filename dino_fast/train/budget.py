"""Fitting a run's length to a wall-clock budget (``train.time_budget_s``).

A run of ``train.iterations`` iterations takes whatever the host makes of it: the built-in
default took 412 s of training on one 2-core machine and 710 s on another. With a budget, the
trainer first times a few real steps (a throwaway trainer on the same config and data, in a
temporary directory) and the end-of-run evaluation on a sample of its images
(:func:`estimate_eval_seconds`: its cost grows with the folders, 2 x 60 000 images of forward
passes for CIFAR-10), then caps ``train.iterations`` at what fits the rest of the budget. The run
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
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from dino_fast.config import TrainConfig
from dino_fast.eval.collapse import grey_sample_stride
from dino_fast.methods import build_backbone

log = logging.getLogger("dino_fast.train")

PROBE_ITERATIONS = 12  # steps the probe runs; the first two (lazy init, worker start) are not timed
SHORT_EPOCH = 48  # epochs of at most this many iterations are timed whole (see probe_steps)
MARGIN = 0.95  # of the remaining budget: per-epoch costs (checkpoints, collapse checks) the probe misses
MIN_ITERATIONS = 10  # never shorter: a run that cannot fit this many steps is not worth the budget
EVAL_SAMPLE = 256  # images decoded and run through the backbone to time the evaluation's passes
LINEAR_SAMPLE = 4096  # at most this many train features to time the linear probe on
LINEAR_TIMED_EPOCHS = 2  # epochs of the probe timed (its cost is linear in the epochs)
# the evaluation after a training run took 1.29-1.34x what the same passes and probes take timed
# alone (CIFAR-10, 6 000 images, 2 cores; docs/NOTEBOOK.md): the k-NN, the folder scans, the
# loaders' start, and whatever the finished run leaves running
EVAL_SLACK = 1.35
_clock = time.perf_counter  # the budget's clock (tests replace it)


def budget_iterations(seconds_per_iteration: float, budget_s: float, spent_s: float, wanted: int) -> int:
    """The iterations a run may take: ``min(wanted, floor(MARGIN * (budget_s - spent_s) / s_it))``,
    at least :data:`MIN_ITERATIONS` (or ``wanted`` when that is fewer).

    Args:
        seconds_per_iteration: measured wall-clock seconds per training step, > 0.
        budget_s: the run's budget in seconds, > 0.
        spent_s: seconds of it already spent (the probe) or set aside (the evaluation), >= 0.
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


class EvalEstimate(NamedTuple):
    """What :func:`estimate_eval_seconds` expects the end-of-run evaluation to cost."""

    seconds: float  # all of it: the feature passes, the linear probes (and a margin for the k-NN)
    images: int  # train + val images one pass reads
    passes: float  # backbone passes over them (teacher, random-init twin, its grey reading: a fraction of a
    # pass on a folder above GREY_SAMPLE_IMAGES)
    pass_seconds: float  # one pass over all the images
    linear_seconds: float  # every linear probe together
    scan_seconds: float = 0.0  # the evaluation loaders' validation of every train and val file


def _eval_passes(cfg: TrainConfig, backbone: nn.Module, n_train: int, n_val: int) -> float:
    """Backbone passes of :func:`dino_fast.train.loop.run_eval_report` over ``n_train + n_val``
    images: the teacher, the random-init twin, and the twin once more in grey where the model reads
    colour (only when the gain warning fires, so an upper bound), which reads every
    :func:`~dino_fast.eval.collapse.grey_sample_stride`-th image of each split: a whole pass up to
    :data:`~dino_fast.eval.collapse.GREY_SAMPLE_IMAGES` images, a fraction of one above."""
    if not cfg.eval.compare_random_init:
        return 1.0
    if not (hasattr(backbone, "grayscale_input") and not backbone.grayscale_input):
        return 2.0
    stride = grey_sample_stride(n_train + n_val)
    return 2.0 + (math.ceil(n_train / stride) + math.ceil(n_val / stride)) / (n_train + n_val)


def estimate_eval_seconds(cfg: TrainConfig, backbone: nn.Module, device: torch.device,
                          train_precision: str = "fp32") -> Optional[EvalEstimate]:
    """Time the end-of-run evaluation of a run described by ``cfg`` on this host, before training.

    The evaluation reads every train and val image once per backbone pass, then fits the linear
    probes on the features: its cost is nothing on a 4 000-image folder and minutes on CIFAR-10's
    60 000. Estimated here from real work, as the probe times real steps:

    - one pass: :data:`EVAL_SAMPLE` train images taken at an even stride, decoded and
      resized exactly as the evaluation does (``eval.image_size`` / ``eval.resize_size``), run
      through ``backbone`` under ``eval.precision`` in this process (decoding and the forward one
      after the other, as they share 2 cores; the first batch, which warms up, not timed),
      scaled to the number of train + val images (counted by extension, nothing opened), in
      the precision the evaluation will use;
    - the linear probe (``eval.linear_after_training``, at least 2 classes): the probe's own code
      (:func:`dino_fast.eval.linear.linear_eval_features`: the lr sweep and the refit) on random
      features of the backbone's width, for :data:`LINEAR_TIMED_EPOCHS` epochs on up to
      :data:`LINEAR_SAMPLE` rows, scaled linearly to ``eval.linear_epochs`` and the train images;
    - the number of passes and probes: :func:`_eval_passes`; all of it times :data:`EVAL_SLACK`;
    - plus the evaluation loaders' check of every file (:func:`dino_fast.data.folder.scan_image_folder`
      opens each one): the same check timed on the sample, scaled to the train + val images.

    Args:
        cfg: the run's config, data sizes final (``data.auto_crops`` applied).
        backbone: a backbone of the run's architecture (its weights do not matter); left in eval mode.
        device: where the evaluation will run.
        train_precision: the training's resolved precision (``eval.precision=auto`` follows it
            on large folders: :func:`dino_fast.train.precision.resolve_eval_precision`).

    Returns:
        The estimate, or ``None`` when the run evaluates nothing (``eval.knn_after_training``
        off, no val folder, a .beton, or no image found).
    """
    from dino_fast.data.folder import available_cores, list_image_files, validate_image_files
    from dino_fast.data.loader import EvalImageFolder
    from dino_fast.eval.knn import run_eval_roots
    from dino_fast.eval.linear import extract_probe_features, linear_eval_features
    from dino_fast.train.precision import autocast_context, resolve_eval_precision

    if not cfg.eval.knn_after_training:
        return None
    roots = run_eval_roots(cfg)
    if roots is None or any(r.suffix == ".beton" or not r.is_dir() for r in roots):
        return None
    classes, train_files = list_image_files(roots[0])
    _, val_files = list_image_files(roots[1])
    n_images = len(train_files) + len(val_files)
    if not train_files or not val_files:
        return None
    stride = max(1, len(train_files) // EVAL_SAMPLE)
    sample = train_files[::stride][:EVAL_SAMPLE]
    t0 = _clock()  # the evaluation's loaders validate every file first (scan_image_folder), with these threads
    validate_image_files([p for p, _ in sample], num_workers=max(1, min(cfg.data.num_workers, available_cores())))
    scan_seconds = (_clock() - t0) / len(sample) * n_images
    ds = EvalImageFolder.from_samples(sample, classes, image_size=cfg.eval.image_size,
                                      resize_size=cfg.eval.resize_size)
    bs = max(1, min(cfg.eval.batch_size, len(sample) // 4 or 1))
    warm = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(min(bs, len(ds)))), batch_size=bs)
    timed = torch.utils.data.DataLoader(ds, batch_size=bs)
    with autocast_context(device, resolve_eval_precision(cfg.eval.precision, n_images, train_precision)):
        extract_probe_features(backbone, warm, device)
        t0 = _clock()
        sample_feats, _ = extract_probe_features(backbone, timed, device)
        per_image = (_clock() - t0) / len(ds)
    passes = _eval_passes(cfg, backbone, len(train_files), len(val_files))
    pass_seconds = per_image * n_images
    linear_seconds = 0.0
    if cfg.eval.linear_after_training and len(classes) >= 2:
        n_train = len(train_files)
        rows = min(n_train, LINEAR_SAMPLE)
        gen = torch.Generator().manual_seed(0)
        feats = torch.randn(rows, sample_feats.shape[1], generator=gen)  # the probe's own feature width
        labels = torch.arange(rows) % len(classes)
        epochs = max(1, min(LINEAR_TIMED_EPOCHS, cfg.eval.linear_epochs))
        t0 = _clock()
        linear_eval_features(feats, labels, feats[:64], labels[:64], device=device, num_classes=len(classes),
                             epochs=epochs, seed=0)
        one = (_clock() - t0) * (cfg.eval.linear_epochs / epochs) * (n_train / rows)
        linear_seconds = one * (2 if cfg.eval.compare_random_init else 1)
    seconds = EVAL_SLACK * (passes * pass_seconds + linear_seconds) + scan_seconds
    return EvalEstimate(seconds, n_images, passes, pass_seconds, linear_seconds, scan_seconds)


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

    The budget covers the probe, the training loop and the end-of-run evaluation: the probe
    times real steps (:func:`probe_steps`) and the evaluation (:func:`estimate_eval_seconds`,
    the maximum over ranks of each), and the iterations fill what is left.

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
            # a fresh backbone of the run's architecture: the weights do not change the time, and
            # under FSDP the probe's teacher is sharded (its unsharded copy is only on rank 0's disk)
            estimate = estimate_eval_seconds(cfg, build_backbone(cfg, teacher=True).to(probe.device), probe.device,
                                             probe.precision)
        finally:
            quiet.setLevel(level)
        del probe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    s_it = reduce_max(s_it)
    eval_s = reduce_max(estimate.seconds if estimate is not None else 0.0)
    spent = reduce_max(_clock() - t0)
    iterations = budget_iterations(s_it, budget, spent + eval_s, cfg.train.iterations)
    if is_main:
        verdict = ("fit" if iterations == cfg.train.iterations else
                   f"do not fit: train.iterations {cfg.train.iterations} -> {iterations}")
        evaluation = ("no end-of-run evaluation" if estimate is None else
                      f"the end-of-run evaluation estimated at {eval_s:.1f} s ({estimate.passes:.3g} pass(es) over "
                      f"{estimate.images} images at {estimate.pass_seconds:.1f} s each, linear probes "
                      f"{estimate.linear_seconds:.1f} s, file checks {estimate.scan_seconds:.1f} s)")
        log.info("train.time_budget_s=%g: %.3f s per iteration over %d probe steps (%s; %.1f s spent probing), "
                 "%s; %d iterations %s", budget, s_it, steps - 2,
                 "one epoch end included" if whole_epoch else "median", spent, evaluation, cfg.train.iterations,
                 verdict)
        if eval_s > 0.5 * budget:
            log.warning("train.time_budget_s=%g: the end-of-run evaluation alone is estimated at %.0f s, over half "
                        "the budget (%d train + val images): eval.precision=bf16 halves its passes on hosts with "
                        "native bf16, eval.compare_random_init=false drops the random-init twin, "
                        "eval.linear_after_training=false the linear probes", budget, eval_s, estimate.images)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iterations=iterations))

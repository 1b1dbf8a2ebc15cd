"""The training loop and the ``dino-fast train`` command: one loop for every method.

One iteration (docs/DESIGN.md, "The training step"):
    lr / weight decay from their per-iteration schedules
    crops = augment(uint8 crops)                      (batched, on the training device)
    out = method.forward_step(crops, epoch, it)       (named, weighted loss terms; the method runs
                                                       its networks under the trainer's autocast)
    backward of sum(weight * term); clip gradients (per parameter); drop last-layer grads in
    the first epoch(s); AdamW step; teacher <- EMA(student) over ``method.ema_modules()``;
    method.after_step(it)

The trainer imports no method: :func:`dino_fast.methods.build_method` builds ``method.name``.

Data parallelism: DDP by default when distributed; ``train.sharding=fsdp`` shards student and
teacher with ``fully_shard`` instead (:mod:`dino_fast.train.fsdp`; checkpoints keep the
non-sharded format, docs/DESIGN.md "Sharded training (FSDP)").

Exact resume: every iteration reseeds its random streams from (seed, rank, iteration), the
loader's order is a function of (seed, epoch), and checkpoints hold everything else (weights,
optimizer, grad scaler, loss center, position, RNG states), so a run stopped anywhere and
resumed with ``train.resume=auto`` ends with the same weights as an uninterrupted one.

Rank independence: the photometric augmentation draws each sample's parameters from a
counter-based hash of (seed, epoch, global sample index, crop), so W ranks at batch b augment
exactly as one process at batch W*b (drop path still draws from the per-rank stream).

Reliability (README, "what survives what"): every iteration all-reduces one small tensor holding the loss,
a non-finite flag and a stop flag, so every rank stops at the same iteration on a NaN/inf
(with ``train.check_finite`` the student and teacher outputs are checked, and the rank that holds
the bad value names its crop and row) and on SIGTERM/SIGINT (a checkpoint, then exit 0).
The test-only fault-injection hook is documented in :mod:`dino_fast.utils.checkpoint`.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dino_fast.config import CUDA_GRAPH_COMPILE_MODES, ConfigError, TrainConfig, apply_auto_crops, load_config
from dino_fast.data import MultiCropAugment, MultiCropConfig, build_multicrop_loader
from dino_fast.data.builtin import ensure_builtin_dataset
from dino_fast.data.sizing import median_image_side
from dino_fast.eval.collapse import collapse_stats, diagnose, diagnose_colour, diagnose_gain, grey_sample_stride
from dino_fast.eval.knn import eval_loaders, knn_classify, run_eval_roots
from dino_fast.eval.linear import extract_probe_features, linear_eval_features
from dino_fast.methods import BatchInfo, Method, StepOutput, build_backbone, build_method, get_method
from dino_fast.ops.ema import NonFiniteEMAError, TeacherEMA
from dino_fast.train import fsdp as fsdp_mod
from dino_fast.train.budget import fit_to_budget
from dino_fast.train.optim import build_adamw, cancel_gradients_last_layer, clip_gradients
from dino_fast.train.precision import autocast_context, resolve_eval_precision, resolve_precision, set_speed_flags
from dino_fast.utils import checkpoint as ckpt_mod
from dino_fast.utils.distributed import DistInfo, barrier, cleanup, init_distributed, is_dist
from dino_fast.utils.faults import fault_point
from dino_fast.utils.finite import NonFiniteError, all_finite, check_finite
from dino_fast.utils.schedules import cosine_scheduler

log = logging.getLogger("dino_fast.train")
# the k-NN report's key for the random-init twin read in grey (run_eval_report)
GREY_TWIN = "random_init_grayscale"
# ... and the same twin in colour on the same images, where the grey reading read a sample of a large folder
GREY_TWIN_COLOUR = "random_init_sample"


class NonFiniteLossError(RuntimeError):
    """The loss, the model outputs or the student's weights became NaN/inf; the run stops at that
    iteration (on every rank) and the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run stops cleanly."""


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------

def _iteration_seed(seed: int, rank: int, it: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + it * 104_729) % (2**63 - 1)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def iteration_schedules(cfg: TrainConfig, base_lr: float, niter_per_epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lr, weight-decay and teacher-momentum schedules of a run of ``cfg.train.iterations`` iterations.

    Each cosine ends exactly at ``T = cfg.train.iterations`` (its first ``T`` values are
    :func:`cosine_scheduler` over ``T`` one-iteration steps); the lr warm-up lasts
    ``min(optim.warmup_epochs * niter_per_epoch, T // 4)`` iterations. The arrays are padded with
    their last value to ``cfg.train.epochs * niter_per_epoch`` (the derived whole epochs) so that
    indexing by iteration never falls off; the trainer stops at ``T``.

    Returns:
        three float64 arrays of shape ``(cfg.train.epochs * niter_per_epoch,)``.
    """
    T = cfg.train.iterations
    if T <= 0:
        raise ValueError(f"train.iterations must be > 0 here, got {T}")
    length = max(cfg.train.epochs * niter_per_epoch, T)
    warmup = min(cfg.optim.warmup_epochs * niter_per_epoch, T // 4)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.full(length - T, a[-1])])

    o = cfg.optim
    return (pad(cosine_scheduler(base_lr, o.min_lr, T, 1, warmup_epochs=warmup)),
            pad(cosine_scheduler(o.weight_decay, o.weight_decay_end, T, 1)),
            pad(cosine_scheduler(o.momentum_teacher, o.momentum_teacher_end, T, 1)))


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """A pretraining run of ``cfg.method.name`` described by a :class:`TrainConfig`.

    Usage: ``Trainer(cfg).fit()``; returns a summary dict (iterations run, last loss, paths).
    ``trainer.method`` is the :class:`~dino_fast.methods.Method` (student, teacher, losses).
    """

    def __init__(self, cfg: TrainConfig, dist_info: Optional[DistInfo] = None) -> None:
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.train.dist_backend)
        self.device = self.dist.device
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        set_speed_flags(self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.out_dir = Path(cfg.train.output_dir)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

        # data
        root = self.train_root()
        if cfg.data.auto_crops and root.is_dir():  # a .beton keeps the sizes it was written for
            cfg, note = apply_auto_crops(cfg, median_image_side(root))
            self.cfg = cfg
            if note and self.dist.is_main:
                log.info("%s", note)
        if cfg.train.time_budget_s > 0:  # time a few real steps, then cap train.iterations (budget.py)
            cfg = fit_to_budget(cfg, lambda c: Trainer(c, self.dist), out_dir=self.out_dir, is_main=self.dist.is_main,
                                reduce_max=self._reduce_max)
            self.cfg = cfg
        with warnings.catch_warnings(record=True) as caught:  # skipped files, named, into the log
            warnings.simplefilter("always")
            self.loader = build_multicrop_loader(
                MultiCropConfig(
                    root=str(root), backend=cfg.data.backend,
                    # the teacher's global crops plus any separate student global crops (Mugs)
                    global_crops_number=cfg.data.global_crops_number
                    + get_method(cfg.method.name).extra_global_crops(cfg),
                    global_crops_size=cfg.data.global_crops_size,
                    global_crops_scale=tuple(cfg.data.global_crops_scale),
                    local_crops_number=cfg.data.local_crops_number,
                    local_crops_size=cfg.data.local_crops_size,
                    local_crops_scale=tuple(cfg.data.local_crops_scale),
                    batch_size=cfg.data.batch_size_per_gpu, num_workers=cfg.data.num_workers,
                    seed=cfg.train.seed, drop_last=True,
                ),
                rank=self.dist.rank, world_size=self.dist.world_size,
            )
        for w in caught:
            if self.dist.is_main:
                log.warning("%s", w.message)
        self.niter_per_epoch = len(self.loader)
        if self.niter_per_epoch == 0:
            bs, ws, n = cfg.data.batch_size_per_gpu, self.dist.world_size, self.loader.dataset_size
            fix = f" to at most {n // ws}" if n >= ws else ""
            raise ValueError(
                f"the training set at {root} holds {n} images, fewer than one batch of {bs} per rank over "
                f"{ws} rank(s) (data.batch_size_per_gpu x ranks = {bs * ws}): add images or lower "
                f"data.batch_size_per_gpu{fix}"
            )
        if cfg.train.iterations > 0:  # the run's length in iterations: derive the epochs from the data size
            epochs = -(-cfg.train.iterations // self.niter_per_epoch)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))
            self.cfg = cfg
            if self.dist.is_main:
                log.info("train.iterations=%d at %d iterations per epoch: %d epoch(s)",
                         cfg.train.iterations, self.niter_per_epoch, epochs)
        self.augment = MultiCropAugment(
            local_crops_number=cfg.data.local_crops_number, blur_sigma=tuple(cfg.data.blur_sigma),
            jitter_p=cfg.data.jitter_p, brightness=cfg.data.color_jitter[0], contrast=cfg.data.color_jitter[1],
            saturation=cfg.data.color_jitter[2], hue=cfg.data.color_jitter[3], grayscale_p=cfg.data.grayscale_p,
            **dict(zip(("strong_p", "strong_from_crop"), get_method(cfg.method.name).strong_augmentation(cfg))),
        ).to(self.device)

        # the method: student, teacher, losses and their state
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.method: Method = build_method(cfg).to(self.device)
        self.method.set_autocast(lambda: autocast_context(self.device, self.precision))
        if cfg.model.compile:
            mode = cfg.model.compile_mode
            for m in (self.method.student, self.method.teacher):
                m.backbone.compile_blocks(**({} if mode == "default" else {"mode": mode}))
        # CUDA graphs (model.compile_mode reduce-overhead / max-autotune): every step is a new
        # cudagraph-trees generation, so the previous step's graph outputs may be overwritten
        self._cudagraph_steps = cfg.model.compile and cfg.model.compile_mode in CUDA_GRAPH_COMPILE_MODES
        self.student_ddp: nn.Module = self.method.student
        self.fsdp = cfg.train.sharding == "fsdp"
        if self.fsdp:
            self._shard_method()
        elif self.dist.distributed:
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.method.student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
            self.method.set_student_forward(self.student_ddp)
        ema_teacher, ema_student = self.method.ema_modules()
        self.ema = TeacherEMA(ema_teacher, ema_student, backend=cfg.optim.ema_backend,
                              check_finite=cfg.train.check_finite)

        # optimisation
        self.global_batch = cfg.data.batch_size_per_gpu * self.dist.world_size
        self.base_lr = cfg.optim.lr * self.global_batch / 256.0
        self.optimizer = build_adamw(self.method.student, cfg.optim.patch_embed_lr_mult, cfg.optim.layerwise_decay,
                                     num_layers=getattr(self.method.student.backbone, "depth", 0))
        # each group's name, lr multiplier and decay rule, from this config (restored after a resume)
        self._group_meta = [{k: g[k] for k in ("name", "lr_mult", "scheduled_wd")} for g in self.optimizer.param_groups]
        n = self.niter_per_epoch
        e = cfg.train.epochs
        if cfg.train.iterations > 0:
            self.lr_schedule, self.wd_schedule, self.momentum_schedule = iteration_schedules(cfg, self.base_lr, n)
        else:
            self.lr_schedule = cosine_scheduler(self.base_lr, cfg.optim.min_lr, e, n, warmup_epochs=cfg.optim.warmup_epochs)
            self.wd_schedule = cosine_scheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, e, n)
            self.momentum_schedule = cosine_scheduler(cfg.optim.momentum_teacher, cfg.optim.momentum_teacher_end, e, n)
        # the head's last layer gets no gradient for optim.freeze_last_layer epochs (it < F x n is
        # the official epoch < F), at most a quarter of a train.iterations run
        self.freeze_last_layer_iters = cfg.optim.freeze_last_layer * n
        # collapse warnings once the lr warm-up is over (it >= W x n is the epoch >= W of epoch runs)
        self.warmup_iters = cfg.optim.warmup_epochs * n
        # the collapse check runs at the end of every epoch; in a train.iterations run at least
        # ten times (every min(n, iterations // 10) iterations: a one-epoch run is checked too)
        self.collapse_check_every = n
        if cfg.train.iterations > 0:
            self.freeze_last_layer_iters = min(self.freeze_last_layer_iters, cfg.train.iterations // 4)
            self.warmup_iters = min(self.warmup_iters, cfg.train.iterations // 4)
            self.collapse_check_every = min(n, max(1, cfg.train.iterations // 10))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        self.start_epoch = 0
        self.start_batch = 0
        self.iteration = 0
        self.last_loss = float("nan")
        self._stop_signal: Optional[int] = None
        self._stop_all = False
        self._metrics_file = None
        self._tb = None
        self.last_terms: dict[str, float] = {}
        self.collapse_every_epoch = True  # collapse statistics at the last step of each epoch
        self._collapse_due = False
        self.last_collapse: Optional[dict[str, Any]] = None
        self._bar_collapse = ""  # the last check's teacher entropy / ln K, for the progress bar
        self.collapse_warnings: list[tuple[int, str]] = []  # (epoch, warning) seen in this run

    def _shard_method(self) -> None:
        """``train.sharding=fsdp``: ``fully_shard`` the student and the teacher the same way on one
        mesh of all ranks (:func:`dino_fast.train.fsdp.shard_module`); no DDP wrapper (FSDP
        modifies the modules in place, and the method keeps calling ``method.student``)."""
        method = self.method
        reason = type(method).fsdp_unsupported
        if reason:
            raise ValueError(f"method {method.name!r} does not support train.sharding=fsdp: {reason}; "
                             f"use train.sharding=none (DDP)")
        if not is_dist():
            raise ValueError("train.sharding=fsdp needs torch.distributed initialised: launch with torchrun "
                             f"(WORLD_SIZE >= 2); this process has world size {self.dist.world_size} and no "
                             f"process group")
        mesh = fsdp_mod.build_mesh(self.device)
        param_dtype = fsdp_mod.fsdp_param_dtype(self.cfg.train.fsdp_param_dtype, self.precision)
        block_reduce = torch.bfloat16 if self.cfg.train.fsdp_block_reduce_dtype == "bf16" else torch.float32
        fsdp_mod.shard_module(method.student, mesh, param_dtype=param_dtype, block_reduce_dtype=block_reduce)
        fsdp_mod.shard_module(method.teacher, mesh, param_dtype=param_dtype, block_reduce_dtype=block_reduce,
                              reshard_root=True)
        self.mesh = mesh
        if self.dist.is_main:
            log.info("FSDP: student and teacher sharded over %d ranks (param dtype %s, block reduce %s, heads "
                     "reduce float32)", self.dist.world_size, param_dtype or torch.float32, block_reduce)

    @property
    def student(self) -> nn.Module:
        """The method's student (unwrapped)."""
        return self.method.student

    @property
    def teacher(self) -> nn.Module:
        """The method's teacher."""
        return self.method.teacher

    # ---------------------------------------------------------------- data paths
    def train_root(self) -> Path:
        """Training data: ``data.root``, or the built-in dataset's train split (generated once)."""
        if self.cfg.data.root:
            root = Path(self.cfg.data.root)
            if not root.exists():
                raise FileNotFoundError(f"data.root {root} does not exist")
            return root
        return self.builtin_root() / "train"

    def builtin_root(self) -> Path:
        """The built-in dataset's folder (generated by rank 0, others wait)."""
        if self.dist.is_main:
            path = ensure_builtin_dataset(self.cfg.data.builtin_dir)
        barrier()
        if not self.dist.is_main:
            path = ensure_builtin_dataset(self.cfg.data.builtin_dir)
        return Path(path)

    # ---------------------------------------------------------------- checkpoints
    def _gather_sharded(self) -> dict[str, Any]:
        """Under FSDP: the full student, teacher and optimizer state dicts on rank 0's CPU (``{}``
        entries on the other ranks), in the format of a non-sharded run. A collective: every rank
        calls it."""
        return {"student": fsdp_mod.full_model_state_dict(self.method.student),
                "teacher": fsdp_mod.full_model_state_dict(self.method.teacher),
                "optimizer": fsdp_mod.full_optimizer_state_dict(self.method.student, self.optimizer)}

    def state(self, next_epoch: int, next_batch: int, gathered: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Everything needed for an exact resume at (next_epoch, next_batch). Under FSDP the
        weights and optimizer state come from ``gathered`` (:meth:`_gather_sharded`, called on
        every rank first), so the checkpoint has the format of a non-sharded run."""
        if self.fsdp and gathered is None:
            raise RuntimeError("Trainer.state under train.sharding=fsdp needs the gathered state dicts "
                               "(Trainer._gather_sharded, a collective every rank calls)")
        return {
            "format_version": ckpt_mod.FORMAT_VERSION,
            "student": gathered["student"] if gathered else self.method.student.state_dict(),
            "teacher": gathered["teacher"] if gathered else self.method.teacher.state_dict(),
            "method": {"name": self.method.name, "state": self.method.method_state_dict()},
            "optimizer": gathered["optimizer"] if gathered else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": next_epoch,
            "batch": next_batch,
            "iteration": self.iteration,
            "world_size": self.dist.world_size,
            "rng": _rng_state(),
            "config": self.cfg.to_dict(),
        }

    def save(self, next_epoch: int, next_batch: int, *, numbered: bool = False) -> Optional[Path]:
        """Write ``checkpoint.pth`` atomically (rank 0 only); optionally a numbered copy."""
        path = None
        error: Optional[BaseException] = None
        gathered = self._gather_sharded() if self.fsdp else None  # every rank, before rank 0 writes
        if self.dist.is_main:
            try:
                st = self.state(next_epoch, next_batch, gathered)
                path = ckpt_mod.atomic_save(st, self.out_dir / ckpt_mod.CHECKPOINT_NAME)
                if numbered:
                    ckpt_mod.atomic_save(st, self.out_dir / ckpt_mod.numbered_name(next_epoch))
            except Exception as e:  # noqa: BLE001 - told to every rank below, then re-raised
                error = e
        if is_dist():  # every rank learns whether rank 0's write failed (no rank left in a barrier)
            flag = torch.tensor([1.0 if error is not None else 0.0], device=self._collective_device())
            torch_dist.all_reduce(flag)
            if error is None and flag.item() > 0:
                raise ckpt_mod.CheckpointError("rank 0 could not write the checkpoint (see its log); stopping")
        if error is not None:
            raise error
        return path

    def _reduce_max(self, x: float) -> float:
        """The maximum of ``x`` over ranks (``x`` itself in one process)."""
        if not is_dist():
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self._collective_device())
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return float(t.item())

    def _collective_device(self) -> torch.device:
        return self.device if (is_dist() and torch_dist.get_backend() == "nccl") else torch.device("cpu")

    def maybe_resume(self) -> bool:
        """Resume per ``train.resume``: ``auto`` (latest in output_dir, if any), ``none``, or a path."""
        mode = self.cfg.train.resume
        if self.dist.is_main and self.out_dir.is_dir():
            for p in ckpt_mod.remove_stale_temporaries(self.out_dir):
                log.info("removed %s, left by a checkpoint write that was interrupted", p.name)
        path = ckpt_mod.resume_path(mode, self.out_dir)
        if path is None:
            return False
        ck = ckpt_mod.load_checkpoint(path, map_location="cpu")
        method_state = self._method_state(ck, path)
        ckpt_mod.check_state_dict_compatible(self.student, ck["student"], "student")
        ckpt_mod.check_state_dict_compatible(self.teacher, ck["teacher"], "teacher")
        if ck.get("world_size", 1) != self.dist.world_size:
            log.warning("checkpoint was written with world size %s, resuming with %s",
                        ck.get("world_size"), self.dist.world_size)
        if self.fsdp:  # every rank read the full dicts; each keeps its shard
            fsdp_mod.load_full_model_state_dict(self.method.student, ck["student"])
            fsdp_mod.load_full_model_state_dict(self.method.teacher, ck["teacher"])
        else:
            self.method.student.load_state_dict(ck["student"])
            self.method.teacher.load_state_dict(ck["teacher"])
        self.method.load_method_state_dict(method_state)
        saved = [g.get("name") for g in ck["optimizer"]["param_groups"]]
        here = [m["name"] for m in self._group_meta]
        if saved != here:
            raise ckpt_mod.CheckpointError(
                f"{path} has optimizer param groups {saved}, this run builds {here} (optim.patch_embed_lr_mult="
                f"{self.cfg.optim.patch_embed_lr_mult}, optim.layerwise_decay={self.cfg.optim.layerwise_decay}: a value "
                f"!= 1 puts the patch embedding, or each layer, in groups of its own); resume with the values the "
                f"checkpoint was written with")
        if self.fsdp:
            fsdp_mod.load_full_optimizer_state_dict(self.method.student, self.optimizer, ck["optimizer"])
        else:
            self.optimizer.load_state_dict(ck["optimizer"])
        for g, meta in zip(self.optimizer.param_groups, self._group_meta):
            g.update(meta)  # this config's multipliers (checkpoints before them hold none)
        self.scaler.load_state_dict(ck["scaler"])
        self.start_epoch, self.start_batch = int(ck["epoch"]), int(ck["batch"])
        self.iteration = int(ck["iteration"])
        _set_rng_state(ck["rng"])
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d, batch %d (iteration %d)", path, self.start_epoch,
                     self.start_batch, self.iteration)
        return True

    def _method_state(self, ck: dict[str, Any], path: Path) -> dict[str, Any]:
        """The method state of checkpoint ``ck``: its ``method`` entry, or what the method
        recovers from an older format (e.g. DINO's ``dino_loss``); errors name the mismatch."""
        entry = ck.get("method")
        if entry is None:
            state = type(self.method).legacy_method_state(ck)
            if state is None:
                raise ckpt_mod.CheckpointError(f"{path} has no 'method' entry and no state method "
                                               f"{self.method.name!r} can recover")
            log.warning("%s is in the format before methods (no 'method' entry); its %s state was recovered",
                        path, self.method.name)
            return state
        if entry.get("name") != self.method.name:
            raise ckpt_mod.CheckpointError(f"{path} was written by method {entry.get('name')!r}, this run trains "
                                           f"method.name={self.method.name!r}")
        return entry["state"]

    # ---------------------------------------------------------------- logging
    def _log_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        if self._metrics_file is None:
            self._metrics_file = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        self._metrics_file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self._tb.add_scalar(k, v, record["iteration"])

    def _open_tensorboard(self) -> None:
        if not (self.cfg.train.tensorboard and self.dist.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # tensorboard not installed
            log.warning("train.tensorboard=true but TensorBoard is not available (%s); metrics go to "
                        "metrics.jsonl only", e)
            return
        self._tb = SummaryWriter(str(self.out_dir / "tb"))

    # ---------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> list[tuple[int, Any]]:
        def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
            self._stop_signal = signum

        previous = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous.append((sig, signal.signal(sig, handler)))
            except ValueError:  # not the main thread
                pass
        return previous

    # ---------------------------------------------------------------- one step
    def train_step(self, global_crops: torch.Tensor, local_crops: torch.Tensor, epoch: int, it: int,
                   sample_ids: Optional[np.ndarray] = None) -> float:
        """One optimisation step on a batch of uint8 crops; returns the loss (a Python float).

        Args:
            global_crops: uint8 ``[B, G, 3, Gs, Gs]``; local_crops: uint8 ``[B, L, 3, Ls, Ls]``.
            epoch, it: the epoch and the global iteration (0-based).
            sample_ids: int ``[B]`` dataset indices of the batch's samples; when given, the
                augmentation is a function of (seed, epoch, sample id) (rank-independent), else
                of the per-iteration generator.

        Returns the total loss averaged over ranks (the global-batch loss); the per-term values
        (unweighted, averaged over ranks) are in :attr:`last_terms`.

        Raises:
            NonFiniteLossError: NaN/inf in the loss, in the model outputs (``train.check_finite``)
                or in the student's weights after the step (``train.check_finite``); raised on
                every rank at the same iteration.
        """
        cfg = self.cfg
        lr, wd = float(self.lr_schedule[it]), float(self.wd_schedule[it])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]  # 1.0, or optim.patch_embed_lr_mult for the patch embedding
            if group["scheduled_wd"]:  # only the regularized groups get weight decay
                group["weight_decay"] = wd
        self.method.set_batch_info(BatchInfo(  # per-sample randomness of the method (DINOv2's masks)
            seed=cfg.train.seed, epoch=epoch, batch=it - epoch * self.niter_per_epoch, sample_ids=sample_ids,
            rank=self.dist.rank, world_size=self.dist.world_size))
        seed = _iteration_seed(cfg.train.seed, self.dist.rank, it)
        torch.manual_seed(seed)  # drop path and anything else drawing from the global stream
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        nb = self.device.type == "cuda"
        crops = self.augment(global_crops.to(self.device, non_blocking=nb),
                             local_crops.to(self.device, non_blocking=nb), generator=gen,
                             sample_ids=sample_ids, seed=cfg.train.seed, epoch=epoch)
        if self.augment.strong_p > 0:
            self.method.set_weak_flags(self.augment.last_weak)
        return self.step_on_crops(crops, epoch, it)

    def step_on_crops(self, crops: Sequence[torch.Tensor], epoch: int, it: int) -> float:
        """The step after the augmentation: the method's loss terms, the finite checks and the
        all-reduce, backward, clipping, last-layer freeze, optimizer step, teacher EMA and
        ``method.after_step``. ``crops``: float ``[B, 3, H, W]`` tensors on the training device,
        the global crops first. Learning rate and weight decay are whatever the param groups hold
        (:meth:`train_step` sets them from the schedules first). Returns the total loss averaged
        over ranks; raises :class:`NonFiniteLossError` as :meth:`train_step` does."""
        cfg = self.cfg
        if self._cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.method.forward_step(crops, epoch, it)
        loss = out.total()
        outputs = [t for t, _ in out.outputs.values()]
        if cfg.train.check_finite and outputs:  # one min/max read of each output, no sync yet
            bad = ~all_finite(*outputs)
        else:
            bad = torch.zeros((), dtype=torch.bool, device=loss.device)
        # one small all-reduce: [loss, each term, ranks with non-finite outputs, ranks asked to stop]
        names = list(out.terms)
        stats = torch.stack([loss.detach().float()] + [out.terms[n].value.detach().float() for n in names]
                            + [bad.float(), torch.tensor(float(self._stop_signal is not None), device=bad.device)])
        if is_dist():
            stats = stats.to(self._collective_device())
            torch_dist.all_reduce(stats)
            stats[: 1 + len(names)] /= self.dist.world_size
        values = stats.tolist()
        loss_value, n_bad, n_stop = values[0], values[-2], values[-1]
        self.last_terms = dict(zip(names, values[1:1 + len(names)]))
        if self._collapse_due:
            self._collapse_due = False
            inputs = self.method.collapse_inputs(out, epoch)
            if inputs is not None:
                with torch.no_grad():
                    stats = collapse_stats(**inputs)
                self.last_collapse = {"stats": stats, "warnings": diagnose(stats), "epoch": epoch}
        self._stop_all = n_stop > 0
        if n_bad > 0 or not math.isfinite(loss_value):
            detail = self._non_finite_detail(out)
            raise NonFiniteLossError(
                f"loss is {loss_value} at iteration {it} (epoch {epoch}){detail}; stopping. The last good "
                f"checkpoint in {self.out_dir} is kept"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.method.student.parameters(), cfg.optim.clip_grad, cfg.optim.clip_mode)
        cancel_gradients_last_layer(it, self.method.student, self.freeze_last_layer_iters)
        fault_point("mid_iteration", it)
        self.scaler.step(self.optimizer)  # skipped (and the scale lowered) when a gradient is inf/NaN
        self.scaler.update()
        fault_point("before_ema", it)
        try:
            self.ema.update(float(self.momentum_schedule[it]))
        except NonFiniteEMAError as e:  # identical weights on every rank: every rank raises
            raise NonFiniteLossError(
                f"non-finite student weights after the optimizer step at iteration {it} (epoch {epoch}): {e}; "
                f"stopping. The last good checkpoint in {self.out_dir} is kept"
            ) from e
        self.method.after_step(it)
        return loss_value

    def _report_collapse(self, epoch: int, it: int) -> dict[str, float]:
        """The collapse statistics of this step as ``collapse/<name>`` metrics (empty when none
        were computed), and a warning per symptom once warm-up is over (``optim.warmup_epochs``:
        a network near its random init has near-uniform outputs by construction). The progress
        bar then shows the teacher entropy as a fraction of ln K (``H/lnK``)."""
        rep = self.last_collapse
        if rep is None:
            return {}
        stats = rep["stats"]
        metrics = {f"collapse/{k}": float(v) for k, v in stats.as_dict().items()
                   if v is not None and k not in ("feature_dim", "feature_rows", "teacher_rows")}
        if self.dist.is_main:
            log.info("epoch %d (iteration %d) collapse check: teacher entropy %.3f of ln K = %.3f, "
                     "prototype usage %.3f, student entropy %.3f, feature std %s, effective rank %s",
                     epoch, it + 1, stats.teacher_entropy,
                     stats.teacher_entropy_max, stats.prototype_entropy, stats.student_entropy,
                     "n/a" if stats.feature_std is None else f"{stats.feature_std:.4f}",
                     "n/a" if stats.effective_rank is None else f"{stats.effective_rank:.1f}")
            self._bar_collapse = f"{stats.teacher_entropy / stats.teacher_entropy_max:.2f}"
            if it >= self.warmup_iters:
                for w in rep["warnings"]:
                    self.collapse_warnings.append((epoch, w))
                    log.warning("epoch %d: %s", epoch, w)
        return metrics

    def _non_finite_detail(self, out: StepOutput) -> str:
        """Where the first NaN/inf of this rank's outputs is (crop and row), or which rank has it."""
        try:
            for name, (tensor, rows_per_crop) in out.outputs.items():
                check_finite(tensor.detach(), name, max(rows_per_crop, 1))
        except NonFiniteError as e:
            where = f" on rank {self.dist.rank}" if self.dist.distributed else ""
            return f": {e}{where}"
        if self.dist.distributed:
            return " (this rank's outputs are finite: another rank holds the non-finite value; see its log)"
        return " (the model outputs are finite: the loss overflowed)"

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train until ``train.epochs`` (or ``train.max_iters``) and return a summary: ``iterations``
        (done in all), ``iterations_run`` (by this call), ``last_loss``, ``step_seconds`` (wall
        clock of each step of this call, data wait included), ``output_dir``, ``interrupted`` and
        ``collapse_warnings``."""
        cfg = self.cfg
        self.maybe_resume()
        self._open_tensorboard()
        previous = self._install_signal_handlers()
        if self.dist.is_main:
            log.info("global batch %d (%d per rank x %d ranks), lr %.3g, %d iterations per epoch, precision %s",
                     self.global_batch, cfg.data.batch_size_per_gpu, self.dist.world_size, self.base_lr,
                     self.niter_per_epoch, self.precision)
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        total = cfg.train.epochs * self.niter_per_epoch
        if cfg.train.iterations > 0:
            total = min(total, cfg.train.iterations)
        if cfg.train.max_iters > 0:
            total = min(total, cfg.train.max_iters)
        bar = tqdm(total=total, initial=self.iteration, disable=not (cfg.train.progress and self.dist.is_main),
                   dynamic_ncols=True, desc="train")
        images = cfg.data.batch_size_per_gpu * self.dist.world_size
        iters_run = 0
        step_seconds: list[float] = []  # wall clock per step of this run, data wait included
        t_last = time.perf_counter()
        interrupted = False
        try:
            for epoch in range(self.start_epoch, cfg.train.epochs):
                start = self.start_batch if epoch == self.start_epoch else 0
                self.loader.set_epoch(epoch)
                epoch_ids = self.loader.batch_indices()
                batches = self.loader.iter_from(start) if start else iter(self.loader)
                for i, (g, l, _) in enumerate(batches, start=start):
                    it = epoch * self.niter_per_epoch + i
                    if it >= total:
                        break
                    self.student.train()
                    last_of_epoch = i + 1 == self.niter_per_epoch or it + 1 >= total
                    self._collapse_due = self.collapse_every_epoch and (
                        last_of_epoch or (it + 1) % self.collapse_check_every == 0)
                    self.last_collapse = None
                    loss = self.train_step(g, l, epoch, it, sample_ids=epoch_ids[i])
                    self.iteration = it + 1
                    self.last_loss = loss
                    iters_run += 1
                    now = time.perf_counter()
                    dt, t_last = now - t_last, now
                    step_seconds.append(dt)
                    bar.update(1)
                    terms = self.last_terms if len(self.last_terms) > 1 else {}
                    collapse = self._report_collapse(epoch, it)
                    bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in terms.items()},
                                    lr=f"{self.lr_schedule[it]:.2e}", img_s=f"{images / max(dt, 1e-9):.1f}",
                                    **({"H/lnK": self._bar_collapse} if self._bar_collapse else {}))
                    if collapse or it % max(cfg.train.log_every, 1) == 0 or self.iteration == total:
                        self._log_metrics({**collapse, "iteration": it, "epoch": epoch, "loss": loss,
                                           **{f"loss/{k}": v for k, v in self.last_terms.items()},
                                           "lr": float(self.lr_schedule[it]), "wd": float(self.wd_schedule[it]),
                                           "momentum": float(self.momentum_schedule[it]),
                                           **self.method.scalars(epoch, it),
                                           "images_per_s": images / max(dt, 1e-9)})
                    next_epoch, next_batch = (epoch, i + 1) if i + 1 < self.niter_per_epoch else (epoch + 1, 0)
                    if self._stop_all:  # agreed by every rank in train_step's all-reduce
                        self.save(next_epoch, next_batch)
                        interrupted = True
                        sig = signal.Signals(self._stop_signal).name if self._stop_signal else "a stop signal on another rank"
                        raise TrainingInterrupted(
                            f"{sig} received at iteration {it}: checkpoint "
                            f"written to {self.out_dir / ckpt_mod.CHECKPOINT_NAME}; resume with train.resume=auto"
                        )
                    every = cfg.train.checkpoint_every_iters
                    end_of_epoch = next_batch == 0
                    if end_of_epoch:
                        numbered = cfg.train.saveckp_freq > 0 and next_epoch % cfg.train.saveckp_freq == 0
                        self.save(next_epoch, next_batch, numbered=numbered)
                    elif every > 0 and self.iteration % every == 0:
                        self.save(next_epoch, next_batch)
                    if self.iteration >= total:
                        if not end_of_epoch:
                            self.save(next_epoch, next_batch)
                        break
                if self.iteration >= total:
                    break
        finally:
            bar.close()
            for sig, h in previous:
                signal.signal(sig, h)
            if self._metrics_file is not None:
                self._metrics_file.close()
                self._metrics_file = None
            if self._tb is not None:
                self._tb.close()
        if self.dist.is_main or self.fsdp:  # under FSDP every rank takes part in the gather
            self.export_teacher_backbone()
        return {"iterations": self.iteration, "iterations_run": iters_run, "last_loss": self.last_loss,
                "step_seconds": step_seconds, "output_dir": str(self.out_dir), "interrupted": interrupted,
                "collapse_warnings": [f"epoch {e}: {w}" for e, w in self.collapse_warnings]}

    def export_teacher_backbone(self) -> Path:
        """Write the teacher backbone alone (official DINO key layout) to teacher_backbone.pth
        (rank 0). Under FSDP a collective (the full teacher is gathered to rank 0): every rank calls it."""
        path = self.out_dir / "teacher_backbone.pth"
        if self.fsdp:
            full = fsdp_mod.full_model_state_dict(self.method.teacher)
            if self.dist.is_main:
                ckpt_mod.atomic_save({k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")},
                                     path)
            return path
        ckpt_mod.atomic_save(self.method.teacher.backbone.state_dict(), path)
        return path

    def eval_backbone(self) -> nn.Module:
        """The teacher backbone for rank 0's evaluation after training: ``teacher.backbone`` itself,
        or under FSDP (where it is sharded and a forward would need every rank) an unsharded copy
        loaded from the exported ``teacher_backbone.pth`` (call after :meth:`fit`)."""
        if not self.fsdp:
            return self.method.teacher.backbone
        backbone = build_backbone(self.cfg, teacher=True)
        backbone.load_state_dict(torch.load(self.out_dir / "teacher_backbone.pth", map_location="cpu",
                                            weights_only=True))
        return backbone.to(self.device)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


class EvalReport(NamedTuple):
    """What :func:`run_eval_report` measured: ``knn`` is ``{backbone: {str(k): {"top1": %, "top5": %}}}``,
    ``linear`` ``{backbone: linear_eval's dict}``, ``labels_per_class`` the number of train-split
    images in its smallest class (what the probes could learn from), ``None`` where fewer than
    2 classes or no evaluation."""

    knn: dict[str, Any]
    linear: dict[str, Any]
    labels_per_class: Optional[int] = None


def run_eval_report(trainer: Trainer, *, linear: bool = True) -> EvalReport:
    """The end-of-training evaluation on the val split: weighted k-NN (every k of
    ``eval.knn_k``) and, with ``linear``, the linear probe
    (:func:`dino_fast.eval.linear.linear_eval_features`: last block's CLS, SGD with a cosine schedule and a
    held-out lr choice), of the trained teacher and, with ``eval.compare_random_init``, of a
    random-init twin (seeded ``train.seed + 12345``).

    Each backbone runs once over the train and val folders (centre crops, ``eval.image_size``
    after a resize to ``eval.resize_size``; under bf16 autocast with ``eval.precision: bf16``):
    its CLS features after the final norm (fp32) feed the linear probe as they are and the k-NN
    L2-normalised, which are the features both evaluations define.

    When the teacher's k-NN (at the first k) barely beats the twin's
    (:func:`dino_fast.eval.collapse.diagnose_gain` fires) and the model reads colour, the twin's
    weights are read once more with ``grayscale_input`` on (k-NN only, key ``GREY_TWIN``; a
    backbone without that option is left out), so that the report can say whether colour
    carries the classes or hides them (:func:`dino_fast.eval.collapse.diagnose_colour`). Above
    :data:`dino_fast.eval.collapse.GREY_SAMPLE_IMAGES` train + val images that reading takes every
    :func:`~dino_fast.eval.collapse.grey_sample_stride`-th image of each split, and the twin's colour
    features of the same images give its counterpart (key ``GREY_TWIN_COLOUR``).

    Returns:
        An :class:`EvalReport`; ``EvalReport({}, {})`` without an image-folder val split, and its
        ``linear`` is ``{}`` when not asked for or when the folders name fewer than 2 classes
        (logged). ``labels_per_class`` is counted on the labels the train features were read with.
    """
    cfg = trainer.cfg
    roots = run_eval_roots(cfg)  # no barrier here: only rank 0 evaluates
    if roots is None:
        log.info("no data.val_root given: skipping the k-NN evaluation")
        return EvalReport({}, {})
    train_root, val_root = roots
    if train_root.suffix == ".beton":
        log.info("k-NN evaluation needs an image folder, data.root is a .beton: skipping")
        return EvalReport({}, {})
    loaders, classes = eval_loaders(train_root, val_root, image_size=cfg.eval.image_size,
                                    resize_size=cfg.eval.resize_size, batch_size=cfg.eval.batch_size,
                                    num_workers=cfg.data.num_workers)
    if linear and len(classes) < 2:
        log.info("the linear probe needs at least 2 classes, %s names %d: skipping it", train_root, len(classes))
        linear = False
    backbones = {"teacher": trainer.eval_backbone()}
    if cfg.eval.compare_random_init:
        torch.manual_seed(cfg.train.seed + 12345)
        backbones["random_init"] = build_backbone(cfg, teacher=True).to(trainer.device)

    n_images = len(loaders[0].dataset) + len(loaders[1].dataset)
    precision = resolve_eval_precision(cfg.eval.precision, n_images, trainer.precision)
    if precision != cfg.eval.precision:
        log.info("eval.precision=%s: %s for %d train + val images", cfg.eval.precision, precision, n_images)

    def features(backbone: nn.Module, pair: Sequence[Any] = loaders
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast_context(trainer.device, precision):
            train_f, train_y = extract_probe_features(backbone, pair[0], trainer.device)
            val_f, val_y = extract_probe_features(backbone, pair[1], trainer.device)
        return train_f, train_y, val_f, val_y

    def knn_of(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor,
               val_y: torch.Tensor) -> dict[str, Any]:
        train_n, val_n = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
        return {str(k): knn_classify(train_n, train_y, val_n, val_y, k=k, temperature=cfg.eval.knn_temperature,
                                     num_classes=len(classes) or None) for k in cfg.eval.knn_k}

    knn: dict[str, Any] = {}
    probe: dict[str, Any] = {}
    labels_per_class: Optional[int] = None
    twin_features: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None
    for name, backbone in backbones.items():
        train_f, train_y, val_f, val_y = features(backbone)
        if name == "random_init":
            twin_features = (train_f, train_y, val_f, val_y)
        if labels_per_class is None and len(classes) >= 2:
            labels_per_class = int(torch.bincount(train_y.long(), minlength=len(classes)).min())
        knn[name] = knn_of(train_f, train_y, val_f, val_y)
        if linear:
            probe[name] = linear_eval_features(train_f, train_y, val_f, val_y, device=trainer.device,
                                               num_classes=len(classes), epochs=cfg.eval.linear_epochs,
                                               seed=cfg.train.seed)
    k = str(cfg.eval.knn_k[0])  # the k the report reads
    twin = backbones.get("random_init")
    if twin is not None and hasattr(twin, "grayscale_input") and not twin.grayscale_input \
            and diagnose_gain(knn["teacher"][k]["top1"], knn["random_init"][k]["top1"]) is not None:
        # the same random weights read in grey (the flag adds no parameter): does colour help the
        # classes or hide them? (a backbone without the option is left out)
        twin.grayscale_input = True
        stride = grey_sample_stride(n_images)
        if stride == 1:
            knn[GREY_TWIN] = knn_of(*features(twin))
        else:  # a large folder: every stride-th image of each split, read in grey and (already) in colour
            picks = [torch.arange(0, len(loader.dataset), stride) for loader in loaders]
            sample = [torch.utils.data.DataLoader(torch.utils.data.Subset(loader.dataset, idx.tolist()),
                                                  batch_size=loader.batch_size, shuffle=False,
                                                  num_workers=loader.num_workers, drop_last=False)
                      for loader, idx in zip(loaders, picks)]
            assert twin_features is not None
            train_f, train_y, val_f, val_y = twin_features
            knn[GREY_TWIN_COLOUR] = knn_of(train_f[picks[0]], train_y[picks[0]], val_f[picks[1]], val_y[picks[1]])
            knn[GREY_TWIN] = knn_of(*features(twin, sample))
            log.info("the random-init twin's grey reading: every %d-th image (%d train + %d val of %d), against "
                     "its colour features of the same images (%s)", stride, len(picks[0]), len(picks[1]),
                     n_images, GREY_TWIN_COLOUR)
    return EvalReport(knn, probe, labels_per_class)


def _print_linear_report(report: dict[str, Any], labels_per_class: Optional[int] = None) -> None:
    print("linear probe on the val split (frozen backbone, last-block CLS):")
    for name, res in report.items():
        print(f"  {name:<12} top1 {res['top1']:.1f} top5 {res['top5']:.1f} (lr {res['lr']:g}, {res['epochs']} epochs)")
    if "teacher" in report and "random_init" in report:
        gain = report["teacher"]["top1"] - report["random_init"]["top1"]
        print(f"  teacher vs random init: {gain:+.1f} points top-1")
        warning = diagnose_gain(report["teacher"]["top1"], report["random_init"]["top1"],
                                labels_per_class=labels_per_class)
        if warning:
            log.warning("linear probe: %s", warning)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-fast train --config configs/X.yaml [key=value ...]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="dino-fast train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=0.001")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"dino-fast train: {e}", file=sys.stderr)
        return 2
    dist_info = init_distributed(cfg.train.dist_backend)
    _setup_logging(dist_info.is_main)
    t0 = time.perf_counter()
    trainer: Optional[Trainer] = None
    try:
        trainer = Trainer(cfg, dist_info)
        summary = trainer.fit()
        if dist_info.is_main:
            log.info("trained %d iterations (%d in this run) in %.1f s, last loss %.4f; output in %s",
                     summary["iterations"], summary["iterations_run"], time.perf_counter() - t0,
                     summary["last_loss"], summary["output_dir"])
            (trainer.out_dir / "summary.json").write_text(json.dumps(
                {**{k: summary[k] for k in ("iterations", "iterations_run", "last_loss", "collapse_warnings")},
                 "train_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
            n_warn = len(summary["collapse_warnings"])
            print(f"collapse check: {'no warning' if n_warn == 0 else f'{n_warn} warning(s), see the log above'}")
            if cfg.eval.knn_after_training:
                knn, linear, few = run_eval_report(trainer, linear=cfg.eval.linear_after_training)
                if knn:
                    _print_knn_report(knn, labels_per_class=few)
                    (trainer.out_dir / "knn.json").write_text(json.dumps(knn, indent=2))
                if linear:
                    _print_linear_report(linear, labels_per_class=few)
                    (trainer.out_dir / "linear.json").write_text(json.dumps(linear, indent=2))
            print(f"total time {time.perf_counter() - t0:.1f} s")
        return 0
    except TrainingInterrupted as e:
        log.warning("%s", e)
        return 0
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    except (ConfigError, ckpt_mod.CheckpointError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    finally:
        # DDP's reducer holds the process group: release it before the group is destroyed, or
        # gloo's threads are torn down at interpreter exit and can abort the process
        trainer = None
        gc.collect()
        cleanup()


def _print_knn_report(report: dict[str, Any], labels_per_class: Optional[int] = None) -> None:
    print("k-NN on the val split (weighted, cosine, T=0.07):")
    width = max(12, *(len(name) for name in report))
    for name, res in report.items():
        cells = ", ".join(f"k={k}: top1 {v['top1']:.1f} top5 {v['top5']:.1f}" for k, v in res.items())
        print(f"  {name:<{width}} {cells}")
    if "teacher" in report and "random_init" in report:
        k = next(iter(report["teacher"]))
        gain = report["teacher"][k]["top1"] - report["random_init"][k]["top1"]
        print(f"  teacher vs random init at k={k}: {gain:+.1f} points top-1")
        warning = diagnose_gain(report["teacher"][k]["top1"], report["random_init"][k]["top1"],
                                labels_per_class=labels_per_class)
        if warning:
            log.warning("k-NN at k=%s: %s", k, warning)
        if GREY_TWIN in report:
            colour = report.get(GREY_TWIN_COLOUR, report["random_init"])  # the same images as the grey reading
            log.warning("k-NN at k=%s: %s", k, diagnose_colour(colour[k]["top1"], report[GREY_TWIN][k]["top1"]))

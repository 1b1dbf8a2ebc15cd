"""The DINO training loop and the ``dino-fast train`` command.

One iteration (official DINO recipe, DESIGN.md section 1):
    lr / weight decay from their per-iteration schedules
    crops = augment(uint8 crops)                      (batched, on the training device)
    t = teacher(crops[:2]);  s = student(crops)       (autocast bf16 on GPU by default)
    loss = DINOLoss(s, t, epoch)                      (fused loss; center updated inside)
    backward; clip gradients (per parameter); drop last-layer grads in the first epoch(s)
    AdamW step; teacher <- EMA(student) with the cosine momentum schedule

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
The test-only fault-injection hook is documented in :mod:`dino_fast.train.checkpoint`.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from dino_fast.train import checkpoint as ckpt_mod
from dino_fast.train.config import ConfigError, TrainConfig, load_config
from dino_fast.train.checkpoint import fault_point
from dino_fast.train.distributed import DistInfo, barrier, cleanup, init_distributed, is_dist
from dino_fast.train.optim import build_adamw, cancel_gradients_last_layer, clip_gradients

log = logging.getLogger("dino_fast.train")


class NonFiniteLossError(RuntimeError):
    """The loss, the model outputs or the student's weights became NaN/inf; the run stops at that
    iteration (on every rank) and the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run stops cleanly."""


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------

def build_backbone(cfg: TrainConfig, *, teacher: bool) -> nn.Module:
    """The ViT backbone of the student (with drop path) or of the teacher (without)."""
    from dino_fast import models

    factory = getattr(models, cfg.model.arch)
    kwargs: dict[str, Any] = dict(
        patch_size=cfg.model.patch_size,
        img_size=cfg.data.global_crops_size,
        drop_path_rate=0.0 if teacher else cfg.model.drop_path_rate,
        attn_backend=cfg.model.attn_backend,
    )
    if cfg.model.depth is not None:
        kwargs["depth"] = cfg.model.depth
    return factory(**kwargs)


def build_student_teacher(cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """Student and teacher :class:`MultiCropWrapper` s with DINO heads; the teacher starts as a
    copy of the student and never receives gradients."""
    from dino_fast.models import DINOHead, MultiCropWrapper

    def head() -> nn.Module:
        return DINOHead(
            embed_dim, cfg.model.out_dim, use_bn=cfg.model.use_bn_in_head,
            norm_last_layer=cfg.model.norm_last_layer, hidden_dim=cfg.model.head_hidden_dim,
            bottleneck_dim=cfg.model.head_bottleneck_dim,
        )

    s_backbone = build_backbone(cfg, teacher=False)
    t_backbone = build_backbone(cfg, teacher=True)
    embed_dim = s_backbone.embed_dim
    fused = cfg.model.fused_multicrop_attention
    student = MultiCropWrapper(s_backbone, head(), fused_attention=fused)
    teacher = MultiCropWrapper(t_backbone, head(), fused_attention=fused)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


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


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when the CPU has bf16 dot-product instructions (the ``avx512_bf16`` or ``amx_bf16``
    flag in Linux's ``/proc/cpuinfo``); False elsewhere or when the file cannot be read. Without
    them bf16 matmuls are emulated and slower than fp32."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[-1].split()))
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA (fp16 on GPUs without bf16); on CPU bf16 where the CPU has native
    bf16 instructions (:func:`cpu_has_native_bf16`: a training step 1.6-1.7x faster than fp32 on
    an AVX512-BF16 machine), fp32 otherwise."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _set_speed_flags(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """A DINO pretraining run described by a :class:`TrainConfig`.

    Usage: ``Trainer(cfg).fit()``; returns a summary dict (iterations run, last loss, paths).
    """

    def __init__(self, cfg: TrainConfig, dist_info: Optional[DistInfo] = None) -> None:
        from dino_fast.data import MultiCropAugment, MultiCropConfig, build_multicrop_loader
        from dino_fast.ema import TeacherEMA
        from dino_fast.loss import DINOLoss
        from dino_fast.train.schedules import cosine_scheduler

        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.train.dist_backend)
        self.device = self.dist.device
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        _set_speed_flags(self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.out_dir = Path(cfg.train.output_dir)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

        # data
        root = self.train_root()
        with warnings.catch_warnings(record=True) as caught:  # skipped files, named, into the log
            warnings.simplefilter("always")
            self.loader = build_multicrop_loader(
                MultiCropConfig(
                    root=str(root), backend=cfg.data.backend,
                    global_crops_number=cfg.data.global_crops_number,
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
            raise ValueError(
                f"the training set at {root} gives 0 batches of {cfg.data.batch_size_per_gpu} per rank "
                f"over {self.dist.world_size} rank(s): it needs at least batch_size_per_gpu x world_size images"
            )
        self.augment = MultiCropAugment(
            local_crops_number=cfg.data.local_crops_number, blur_sigma=tuple(cfg.data.blur_sigma),
            jitter_p=cfg.data.jitter_p, brightness=cfg.data.color_jitter[0], contrast=cfg.data.color_jitter[1],
            saturation=cfg.data.color_jitter[2], hue=cfg.data.color_jitter[3], grayscale_p=cfg.data.grayscale_p,
        ).to(self.device)

        # models
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        student, teacher = build_student_teacher(cfg)
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device)
        if cfg.model.compile:
            for m in (self.student, self.teacher):
                m.backbone.compile_blocks()
        self.student_ddp: nn.Module = self.student
        if self.dist.distributed:
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.ema = TeacherEMA(self.teacher, self.student_ddp, backend=cfg.optim.ema_backend,
                              check_finite=cfg.train.check_finite)

        ncrops = cfg.data.global_crops_number + cfg.data.local_crops_number
        self.dino_loss = DINOLoss(
            cfg.model.out_dim, ncrops, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
            cfg.loss.warmup_teacher_temp_epochs, cfg.train.epochs, student_temp=cfg.loss.student_temp,
            center_momentum=cfg.loss.center_momentum, backend=cfg.loss.backend,
            async_center=cfg.loss.async_center, check_finite=False,  # checked in train_step, on all ranks
        ).to(self.device)

        # optimisation
        self.global_batch = cfg.data.batch_size_per_gpu * self.dist.world_size
        self.base_lr = cfg.optim.lr * self.global_batch / 256.0
        self.optimizer = build_adamw(self.student)
        n = self.niter_per_epoch
        e = cfg.train.epochs
        self.lr_schedule = cosine_scheduler(self.base_lr, cfg.optim.min_lr, e, n, warmup_epochs=cfg.optim.warmup_epochs)
        self.wd_schedule = cosine_scheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, e, n)
        self.momentum_schedule = cosine_scheduler(cfg.optim.momentum_teacher, cfg.optim.momentum_teacher_end, e, n)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        self.start_epoch = 0
        self.start_batch = 0
        self.iteration = 0
        self.last_loss = float("nan")
        self._stop_signal: Optional[int] = None
        self._stop_all = False
        self._metrics_file = None
        self._tb = None

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
        from dino_fast.data.builtin import ensure_builtin_dataset

        if self.dist.is_main:
            path = ensure_builtin_dataset(self.cfg.data.builtin_dir)
        barrier()
        if not self.dist.is_main:
            path = ensure_builtin_dataset(self.cfg.data.builtin_dir)
        return Path(path)

    # ---------------------------------------------------------------- checkpoints
    def state(self, next_epoch: int, next_batch: int) -> dict[str, Any]:
        """Everything needed for an exact resume at (next_epoch, next_batch)."""
        return {
            "format_version": ckpt_mod.FORMAT_VERSION,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "dino_loss": self.dino_loss.state_dict(),
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
        if self.dist.is_main:
            try:
                st = self.state(next_epoch, next_batch)
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

    def _collective_device(self) -> torch.device:
        return self.device if (is_dist() and torch_dist.get_backend() == "nccl") else torch.device("cpu")

    def maybe_resume(self) -> bool:
        """Resume per ``train.resume``: ``auto`` (latest in output_dir, if any), ``none``, or a path."""
        mode = self.cfg.train.resume
        if self.dist.is_main and self.out_dir.is_dir():
            for p in ckpt_mod.remove_stale_temporaries(self.out_dir):
                log.info("removed %s, left by a checkpoint write that was interrupted", p.name)
        if mode == "none":
            return False
        path = ckpt_mod.find_latest(self.out_dir) if mode == "auto" else Path(mode)
        if path is None:
            return False
        ck = ckpt_mod.load_checkpoint(path, map_location="cpu")
        ckpt_mod.check_state_dict_compatible(self.student, ck["student"], "student")
        ckpt_mod.check_state_dict_compatible(self.teacher, ck["teacher"], "teacher")
        if ck.get("world_size", 1) != self.dist.world_size:
            log.warning("checkpoint was written with world size %s, resuming with %s",
                        ck.get("world_size"), self.dist.world_size)
        self.student.load_state_dict(ck["student"])
        self.teacher.load_state_dict(ck["teacher"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.dino_loss.load_state_dict(ck["dino_loss"])
        self.start_epoch, self.start_batch = int(ck["epoch"]), int(ck["batch"])
        self.iteration = int(ck["iteration"])
        _set_rng_state(ck["rng"])
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d, batch %d (iteration %d)", path, self.start_epoch,
                     self.start_batch, self.iteration)
        return True

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

        Returns the loss averaged over ranks (the global-batch loss).

        Raises:
            NonFiniteLossError: NaN/inf in the loss, in the model outputs (``train.check_finite``)
                or in the student's weights after the step (``train.check_finite``); raised on
                every rank at the same iteration.
        """
        cfg = self.cfg
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[it])
            if i == 0:  # only the regularized group gets weight decay
                group["weight_decay"] = float(self.wd_schedule[it])
        seed = _iteration_seed(cfg.train.seed, self.dist.rank, it)
        torch.manual_seed(seed)  # drop path and anything else drawing from the global stream
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        nb = self.device.type == "cuda"
        crops = self.augment(global_crops.to(self.device, non_blocking=nb),
                             local_crops.to(self.device, non_blocking=nb), generator=gen,
                             sample_ids=sample_ids, seed=cfg.train.seed, epoch=epoch)
        with _autocast(self.device, self.precision):
            teacher_out = self.teacher(crops[: cfg.data.global_crops_number])
            if cfg.loss.koleo_weight > 0:
                student_out, student_features = self.student_ddp(crops, return_features=True)
            else:
                student_out = self.student_ddp(crops)
        if cfg.train.check_finite:  # one min/max read of each output, no sync yet
            from dino_fast.loss import all_finite

            bad = ~all_finite(student_out, teacher_out)
        else:
            bad = torch.zeros((), dtype=torch.bool, device=student_out.device)
        loss = self.dino_loss(student_out, teacher_out, epoch)
        if cfg.loss.koleo_weight > 0:  # DINOv2: one KoLeo term per global crop, on the backbone CLS features
            from dino_fast.loss import koleo_loss

            n_global = cfg.data.global_crops_number * crops[0].shape[0]
            koleo = sum(koleo_loss(f) for f in student_features[:n_global].chunk(cfg.data.global_crops_number))
            loss = loss + cfg.loss.koleo_weight * koleo
        # one small all-reduce: [loss, ranks with non-finite outputs, ranks asked to stop]
        stats = torch.stack([loss.detach().float(), bad.float(),
                             torch.tensor(float(self._stop_signal is not None), device=bad.device)])
        if is_dist():
            stats = stats.to(self._collective_device())
            torch_dist.all_reduce(stats)
            stats[0] /= self.dist.world_size
        loss_value, n_bad, n_stop = stats.tolist()
        self._stop_all = n_stop > 0
        if n_bad > 0 or not math.isfinite(loss_value):
            detail = self._non_finite_detail(student_out, teacher_out)
            raise NonFiniteLossError(
                f"loss is {loss_value} at iteration {it} (epoch {epoch}){detail}; stopping. The last good "
                f"checkpoint in {self.out_dir} is kept"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.student.parameters(), cfg.optim.clip_grad, cfg.optim.clip_mode)
        cancel_gradients_last_layer(epoch, self.student, cfg.optim.freeze_last_layer)
        fault_point("mid_iteration", it)
        self.scaler.step(self.optimizer)  # skipped (and the scale lowered) when a gradient is inf/NaN
        self.scaler.update()
        fault_point("before_ema", it)
        from dino_fast.ema import NonFiniteEMAError

        try:
            self.ema.update(float(self.momentum_schedule[it]))
        except NonFiniteEMAError as e:  # identical weights on every rank: every rank raises
            raise NonFiniteLossError(
                f"non-finite student weights after the optimizer step at iteration {it} (epoch {epoch}): {e}; "
                f"stopping. The last good checkpoint in {self.out_dir} is kept"
            ) from e
        return loss_value

    def _non_finite_detail(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> str:
        """Where the first NaN/inf of this rank's outputs is (crop and row), or which rank has it."""
        from dino_fast.loss import NonFiniteError, _check_finite

        rows = max(student_out.shape[0] // max(self.dino_loss.ncrops, 1), 1)
        try:
            _check_finite(student_out.detach(), "student_output", rows)
            _check_finite(teacher_out.detach(), "teacher_output", rows)
        except NonFiniteError as e:
            where = f" on rank {self.dist.rank}" if self.dist.distributed else ""
            return f": {e}{where}"
        if self.dist.distributed:
            return " (this rank's outputs are finite: another rank holds the non-finite value; see its log)"
        return " (the model outputs are finite: the loss overflowed)"

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train until ``train.epochs`` (or ``train.max_iters``) and return a summary."""
        from tqdm import tqdm

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
        if cfg.train.max_iters > 0:
            total = min(total, cfg.train.max_iters)
        bar = tqdm(total=total, initial=self.iteration, disable=not (cfg.train.progress and self.dist.is_main),
                   dynamic_ncols=True, desc="train")
        images = cfg.data.batch_size_per_gpu * self.dist.world_size
        iters_run = 0
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
                    loss = self.train_step(g, l, epoch, it, sample_ids=epoch_ids[i])
                    self.iteration = it + 1
                    self.last_loss = loss
                    iters_run += 1
                    now = time.perf_counter()
                    dt, t_last = now - t_last, now
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_schedule[it]:.2e}",
                                    img_s=f"{images / max(dt, 1e-9):.1f}")
                    if it % max(cfg.train.log_every, 1) == 0 or self.iteration == total:
                        self._log_metrics({"iteration": it, "epoch": epoch, "loss": loss,
                                           "lr": float(self.lr_schedule[it]), "wd": float(self.wd_schedule[it]),
                                           "momentum": float(self.momentum_schedule[it]),
                                           "teacher_temp": float(self.dino_loss.teacher_temp_schedule[epoch]),
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
        if self.dist.is_main:
            self.export_teacher_backbone()
        return {"iterations": self.iteration, "iterations_run": iters_run, "last_loss": self.last_loss,
                "output_dir": str(self.out_dir), "interrupted": interrupted}

    def export_teacher_backbone(self) -> Path:
        """Write the teacher backbone alone (official DINO key layout) to teacher_backbone.pth."""
        path = self.out_dir / "teacher_backbone.pth"
        ckpt_mod.atomic_save(self.teacher.backbone.state_dict(), path)
        return path


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_knn_report(trainer: Trainer) -> dict[str, Any]:
    """k-NN top-1/top-5 of the trained teacher and of a random-init twin on the val split."""
    from dino_fast.eval.knn import knn_eval_backbone, run_eval_roots

    cfg = trainer.cfg
    roots = run_eval_roots(cfg)  # no barrier here: only rank 0 evaluates
    if roots is None:
        log.info("no data.val_root given: skipping the k-NN evaluation")
        return {}
    train_root, val_root = roots
    if train_root.suffix == ".beton":
        log.info("k-NN evaluation needs an image folder, data.root is a .beton: skipping")
        return {}
    report: dict[str, Any] = {}
    report["teacher"] = knn_eval_backbone(
        trainer.teacher.backbone, train_root, val_root, ks=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
        image_size=cfg.eval.image_size, resize_size=cfg.eval.resize_size, batch_size=cfg.eval.batch_size,
        device=trainer.device,
    )
    if cfg.eval.compare_random_init:
        torch.manual_seed(cfg.train.seed + 12345)
        random_backbone = build_backbone(cfg, teacher=True).to(trainer.device)
        report["random_init"] = knn_eval_backbone(
            random_backbone, train_root, val_root, ks=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
            image_size=cfg.eval.image_size, resize_size=cfg.eval.resize_size, batch_size=cfg.eval.batch_size,
            device=trainer.device,
        )
    return report


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
            if cfg.eval.knn_after_training:
                report = run_knn_report(trainer)
                if report:
                    _print_knn_report(report)
                    (trainer.out_dir / "knn.json").write_text(json.dumps(report, indent=2))
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


def _print_knn_report(report: dict[str, Any]) -> None:
    print("k-NN on the val split (weighted, cosine, T=0.07):")
    for name, res in report.items():
        cells = ", ".join(f"k={k}: top1 {v['top1']:.1f} top5 {v['top5']:.1f}" for k, v in res.items())
        print(f"  {name:<12} {cells}")
    if "teacher" in report and "random_init" in report:
        k = next(iter(report["teacher"]))
        gain = report["teacher"][k]["top1"] - report["random_init"][k]["top1"]
        print(f"  teacher vs random init at k={k}: {gain:+.1f} points top-1")

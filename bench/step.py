"""End-to-end training step: the reference eager implementation vs dino-fast, side by side.

``python -m bench.step [--quick]`` from the repository root (also ``dino-fast bench step``).

One full DINO step on crops already in memory (float, normalised), phase by phase:

==========  ==============================================  =============================================
phase       reference (official DINO, eager)                dino-fast
==========  ==============================================  =============================================
forward     teacher(2 global) + student(all crops),         the same modules with ``attn_backend="sdpa"``
            ViT with explicit-softmax attention ("math")    (xformers / auto on CUDA)
loss        ``DINOLossReference`` (loop over crop pairs,    ``DINOLoss`` fused (``backend="torch"`` on
            one log_softmax per pair) + ``loss.item()``     CPU, Triton on CUDA) + ``loss.item()``
backward    ``zero_grad(); loss.backward()``                the same
clip        official per-parameter loop (``norm``,          ``dino_fast.train.optim.clip_gradients``
            ``.item()``, ``mul_`` per tensor), clip 3.0     (``_foreach_norm`` + ``_foreach_mul_``)
optimizer   ``torch.optim.AdamW(param_groups)`` as the      AdamW with ``foreach=True`` or ``fused=True``,
            official code builds it (defaults: the          whichever is faster in this run's own
            per-tensor loop on CPU, foreach on CUDA)        measurement (all variants are reported)
ema         official per-parameter ``mul_().add_()`` loop   ``TeacherEMA.update`` (one lerp over a flat
                                                            buffer on CPU, one Triton launch on CUDA)
==========  ==============================================  =============================================

Both sides hold the same weights (one state dict), see the same crops and reseed the global
generator identically before each step (drop path 0.1 on the student), so they compute the same
math: the first step's losses agree to float rounding (checked by tests/benchmarks/test_step.py).
The step runs at epoch 1 (after the official one-epoch freeze of the head's last layer, so the
optimizer and EMA cover every parameter, as in the steady state of a run).

Timing: the two sides alternate step by step (interleaved rounds, the order swapped every round)
so load from other processes hits both alike; each phase is timed with ``time.perf_counter`` on
CPU (every op is synchronous there) and with CUDA events on a GPU; figures are medians over the
rounds and the speed-up is the median of per-round ratios. Threads: torch's setting, the same
for both sides. Bar: ViT-S/16, 2 x 224 + 8 x 96 crops, CPU: dino-fast >= 1.5x the reference.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from bench import common
from bench.report import PHASES, step_phase_rows
from dino_fast.reference.optim import clip_gradients_reference

BAR_SPEEDUP = 1.5
BAR_DEFAULT_RUN = 1.5  # issue 19: the default run's step >= 1.5x the step before it
EPOCH = 1  # past the official one-epoch freeze of the last layer: every parameter is trained
MOMENTUM = 0.996
OPTIMIZER_VARIANTS = ("default", "foreach", "fused")


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """Shapes of one benchmarked step.

    Attributes:
        arch: ``"vit_tiny" | "vit_small" | "vit_base"`` (patch 16).
        batch: images per step (B); the student sees ``(2 + n_local) * B`` crops.
        n_local: local crops per image.
        global_size, local_size: crop sides in pixels (224 and 96 in DINO).
        out_dim: K, the head's output size (65536 in DINO).
        hidden_dim, bottleneck_dim: DINO head MLP sizes (2048, 256 in DINO).
        depth: ViT depth override (``None``: 12).
        drop_path: student drop-path rate (0.1 in DINO; the teacher has none).
        clip: per-parameter gradient clipping threshold (3.0 in DINO).
        device: ``"cpu"`` or ``"cuda"``.
        autocast: ``"none"`` or ``"bf16"`` (forward under bf16 autocast, both sides alike).
    """

    arch: str = "vit_small"
    batch: int = 2
    n_local: int = 8
    global_size: int = 224
    local_size: int = 96
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    depth: Optional[int] = None
    drop_path: float = 0.1
    clip: float = 3.0
    device: str = "cpu"
    autocast: str = "none"

    def __post_init__(self) -> None:
        if self.arch not in ("vit_tiny", "vit_small", "vit_base"):
            raise ValueError(f"arch must be 'vit_tiny', 'vit_small' or 'vit_base', got {self.arch!r}")
        for name in ("batch", "global_size", "local_size", "out_dim", "hidden_dim", "bottleneck_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.n_local, bool) or not isinstance(self.n_local, int) or self.n_local < 0:
            raise ValueError(f"n_local must be an int >= 0, got {self.n_local!r}")
        if self.autocast not in ("none", "bf16"):
            raise ValueError(f"autocast must be 'none' or 'bf16', got {self.autocast!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    @property
    def ncrops(self) -> int:
        """Student crops per image: 2 global + ``n_local``."""
        return 2 + self.n_local

    def label(self) -> str:
        """Short description, e.g. ``vit_small/16 B=2 2x224+8x96 K=65536``."""
        d = "" if self.depth is None else f" depth={self.depth}"
        return (f"{self.arch}/16{d} B={self.batch} 2x{self.global_size}+{self.n_local}x{self.local_size} "
                f"K={self.out_dim}")


# --------------------------------------------------------------------------------------------
# the two sides
# --------------------------------------------------------------------------------------------

def build_models(setup: StepSetup, attn_backend: str) -> tuple[nn.Module, nn.Module]:
    """Student (drop path ``setup.drop_path``) and teacher (none) ``MultiCropWrapper`` s with DINO
    heads, on ``setup.device``, float32. The teacher does not require gradients."""
    from dino_fast import models

    factory = getattr(models, setup.arch)
    kw: dict[str, Any] = {} if setup.depth is None else {"depth": setup.depth}

    def one(dp: float) -> nn.Module:
        vit = factory(16, img_size=setup.global_size, drop_path_rate=dp, attn_backend=attn_backend, **kw)
        head = models.DINOHead(vit.embed_dim, setup.out_dim, hidden_dim=setup.hidden_dim,
                               bottleneck_dim=setup.bottleneck_dim)
        return models.MultiCropWrapper(vit, head)

    student, teacher = one(setup.drop_path).to(setup.device), one(0.0).to(setup.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def set_schedule_values(optimizer: torch.optim.Optimizer, setup: "StepSetup") -> None:
    """The learning rate and weight decay every side uses (the schedules' values at some step):
    lr 5e-4 x batch / 256 on every group, weight decay 0.04 on the ``regularized`` group."""
    for group in optimizer.param_groups:
        group["lr"] = 5e-4 * setup.batch / 256
        if group.get("name") == "regularized":
            group["weight_decay"] = 0.04


def make_optimizer(params: list[dict], variant: str) -> torch.optim.Optimizer:
    """AdamW over ``params`` (param groups): ``"default"`` (torch's choice, as the official code
    builds it), ``"foreach"``, ``"fused"`` or ``"apex"`` (NVIDIA apex ``FusedAdam(adam_w_mode=True)``,
    CUDA only). Raises ``ValueError`` for an unknown variant, ``ImportError`` when apex is missing."""
    if variant == "default":
        return torch.optim.AdamW(params)
    if variant == "foreach":
        return torch.optim.AdamW(params, foreach=True)
    if variant == "fused":
        return torch.optim.AdamW(params, fused=True)
    if variant == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(params, adam_w_mode=True, weight_decay=0.01)
    raise ValueError(f"optimizer variant must be one of {OPTIMIZER_VARIANTS + ('apex',)}, got {variant!r}")


class StepSide:
    """One side of the comparison: models, loss, optimizer, clipping and EMA of one implementation.

    Args:
        setup: shapes.
        kind: ``"reference"`` (official eager algorithm) or ``"ours"`` (dino-fast).
        state_dict: initial weights, loaded into both student and teacher (same on both sides).
        optimizer: AdamW variant (see :func:`make_optimizer`); ``None``: ``"default"`` for the
            reference, ``"fused"`` for ours.
    """

    def __init__(self, setup: StepSetup, kind: str, state_dict: dict[str, torch.Tensor],
                 optimizer: Optional[str] = None, compiled: bool = False) -> None:
        from dino_fast.train.optim import param_groups

        if kind not in ("reference", "ours"):
            raise ValueError(f"kind must be 'reference' or 'ours', got {kind!r}")
        self.compiled = compiled
        self.setup, self.kind = setup, kind
        cuda = setup.device == "cuda"
        attn = "math" if kind == "reference" else ("auto" if cuda else "sdpa")
        self.student, self.teacher = build_models(setup, attn)
        self.student.load_state_dict(state_dict)
        self.teacher.load_state_dict(state_dict)
        self.optimizer_variant = optimizer or ("default" if kind == "reference" else "fused")
        if kind == "reference":
            from dino_fast.reference.loss import DINOLossReference

            self.loss = DINOLossReference(setup.out_dim, setup.ncrops, 0.04, 0.07, 30, 100).to(setup.device)
            t_params, s_params = list(self.teacher.parameters()), list(self.student.parameters())

            def ema(m: float) -> None:
                from dino_fast.reference.ema import reference_ema_update_

                reference_ema_update_(t_params, s_params, m)

            self.clip: Callable[[], Any] = lambda: clip_gradients_reference(self.student.parameters(), setup.clip)
        else:
            from dino_fast.losses.dino import DINOLoss
            from dino_fast.ops.ema.teacher import TeacherEMA
            from dino_fast.train.optim import clip_gradients

            self.loss = DINOLoss(setup.out_dim, setup.ncrops, 0.04, 0.07, 30, 100,
                                 backend="auto" if cuda else "torch").to(setup.device)
            # TeacherEMA re-packs both modules' parameters into flat buffers (views): build it
            # before the optimizer so the optimizer holds the final tensors.
            self._ema = TeacherEMA(self.teacher, self.student, backend="auto")
            ema = self._ema.update
            params = list(self.student.parameters())
            self.clip = lambda: clip_gradients(params, setup.clip)
        self.ema: Callable[[float], None] = ema
        self.optimizer = make_optimizer(param_groups(self.student), self.optimizer_variant)
        set_schedule_values(self.optimizer, setup)
        # what a user gets for free: torch.compile (default mode) of the networks and the loss
        self._student_fwd: Callable[..., Any] = torch.compile(self.student) if compiled else self.student
        self._teacher_fwd: Callable[..., Any] = torch.compile(self.teacher) if compiled else self.teacher
        self._loss_fwd: Callable[..., Any] = torch.compile(self.loss) if compiled else self.loss

    def _autocast(self) -> Any:
        import contextlib

        if self.setup.autocast == "bf16":
            return torch.autocast(self.setup.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, crops: Sequence[torch.Tensor], seed: int) -> tuple[float, dict[str, float]]:
        """One training step on ``crops`` (list of ``2 + n_local`` float tensors ``[B, 3, S, S]``).

        Returns ``(loss, seconds per phase)``; phases as in :data:`PHASES` plus ``"total"``.
        """
        cuda = self.setup.device == "cuda"
        marks: list[Any] = []

        def mark() -> None:
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append(ev)
            else:
                marks.append(time.perf_counter())

        self.student.train()
        torch.manual_seed(seed)  # drop path draws from the global generator: same masks on both sides
        mark()
        with self._autocast():
            t_out = self._teacher_fwd(list(crops[:2]))
            s_out = self._student_fwd(list(crops))
        mark()
        loss = self._loss_fwd(s_out, t_out, EPOCH)
        loss_value = loss.item()
        mark()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        self.clip()
        mark()
        self.optimizer.step()
        mark()
        self.ema(MOMENTUM)
        mark()
        if cuda:
            torch.cuda.synchronize()
            secs = [a.elapsed_time(b) * 1e-3 for a, b in zip(marks[:-1], marks[1:])]
        else:
            secs = [b - a for a, b in zip(marks[:-1], marks[1:])]
        out = dict(zip(PHASES, secs))
        out["total"] = sum(secs)
        return loss_value, out


class TrainerSide:
    """dino-fast's own training step: :meth:`dino_fast.train.loop.Trainer.step_on_crops` (the
    method's loss terms, finite checks, the per-step all-reduce, backward, clipping, last-layer
    freeze, the Trainer's AdamW, EMA) of a Trainer whose config matches ``setup``, on the same
    crops and initial weights as the other sides. Timed as a whole (``total``).

    Args:
        setup: shapes. state_dict: initial weights (student and teacher). workdir: a folder for
            the Trainer's (unused) image folder and output directory. extra: more config
            overrides (a lever measured on and off, e.g. ``model.compile=true``).
    """

    def __init__(self, setup: StepSetup, state_dict: dict[str, torch.Tensor], workdir: str,
                 extra: Sequence[str] = ()) -> None:
        from pathlib import Path

        from PIL import Image

        from dino_fast.config import load_config
        from dino_fast.train.loop import Trainer

        root = Path(workdir) / "images" / "c0"
        root.mkdir(parents=True, exist_ok=True)
        for i in range(setup.batch):  # the Trainer builds a loader; the benchmark feeds crops directly
            Image.new("RGB", (32, 32), (i * 40 % 255, 90, 160)).save(root / f"{i}.png")
        cuda = setup.device == "cuda"
        overrides = [
            f"model.arch={setup.arch}", "model.patch_size=16", f"model.out_dim={setup.out_dim}",
            f"model.head_hidden_dim={setup.hidden_dim}", f"model.head_bottleneck_dim={setup.bottleneck_dim}",
            f"model.drop_path_rate={setup.drop_path}", f"model.attn_backend={'auto' if cuda else 'sdpa'}",
            f"data.root={root.parent}", "data.backend=folder", "data.num_workers=0",
            f"data.global_crops_size={setup.global_size}", f"data.local_crops_size={setup.local_size}",
            f"data.local_crops_number={setup.n_local}", f"data.batch_size_per_gpu={setup.batch}",
            # the other sides' DINOLoss(out_dim, ncrops, 0.04, 0.07, 30, 100) at epoch EPOCH
            "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07", "loss.warmup_teacher_temp_epochs=30",
            "train.epochs=100", f"loss.backend={'auto' if cuda else 'torch'}", f"optim.clip_grad={setup.clip}",
            f"optim.momentum_teacher={MOMENTUM}", "optim.freeze_last_layer=1",
            f"train.precision={'bf16' if setup.autocast == 'bf16' else 'fp32'}",
            f"train.output_dir={Path(workdir) / 'out'}", "train.progress=false", "eval.knn_after_training=false",
        ]
        if setup.depth is not None:
            overrides.append(f"model.depth={setup.depth}")
        overrides += list(extra)
        self.setup = setup
        self.trainer = Trainer(load_config(None, overrides))
        self.trainer.method.student.load_state_dict(state_dict)
        self.trainer.method.teacher.load_state_dict(state_dict)
        set_schedule_values(self.trainer.optimizer, setup)
        self.student = self.trainer.method.student
        self.optimizer_variant = type(self.trainer.optimizer).__name__ + (
            " fused" if self.trainer.optimizer.defaults.get("fused") else
            " foreach" if self.trainer.optimizer.defaults.get("foreach") else "")

    def step(self, crops: Sequence[torch.Tensor], seed: int) -> tuple[float, dict[str, float]]:
        """One Trainer step on ``crops``; returns ``(loss, {"total": seconds})``."""
        cuda = self.setup.device == "cuda"
        self.student.train()
        torch.manual_seed(seed)
        _sync(self.setup.device)
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        loss = self.trainer.step_on_crops(list(crops), EPOCH, 0)  # it=0: momentum MOMENTUM
        if cuda:
            b.record()
            torch.cuda.synchronize()
            secs = a.elapsed_time(b) * 1e-3
        else:
            secs = time.perf_counter() - t0
        return loss, {"total": secs}


def make_crops(setup: StepSetup, seed: int = 0) -> list[torch.Tensor]:
    """``2`` global crops ``[B, 3, G, G]`` and ``n_local`` local crops ``[B, 3, L, L]``, float32,
    standard-normal (already normalised images), on ``setup.device``."""
    g = torch.Generator().manual_seed(seed)
    B = setup.batch
    crops = [torch.randn(B, 3, setup.global_size, setup.global_size, generator=g) for _ in range(2)]
    crops += [torch.randn(B, 3, setup.local_size, setup.local_size, generator=g) for _ in range(setup.n_local)]
    return [c.to(setup.device) for c in crops]


def build_pair(setup: StepSetup, seed: int = 0, ours_optimizer: str = "fused") -> tuple[StepSide, StepSide]:
    """Reference and dino-fast sides with identical initial weights (drawn with ``seed``)."""
    torch.manual_seed(seed)
    student, _ = build_models(dataclasses.replace(setup, device="cpu"), "math")
    sd = {k: v.to(setup.device) for k, v in student.state_dict().items()}
    del student
    return StepSide(setup, "reference", sd), StepSide(setup, "ours", sd, optimizer=ours_optimizer)


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def optimizer_variants(setup: StepSetup, side: StepSide, repeats: int) -> dict[str, Any]:
    """Time ``optimizer.step()`` alone for each AdamW variant on a copy of ``side``'s student
    with gradients from one backward pass; returns ``{variant: median seconds or a reason}``."""
    student = copy.deepcopy(side.student)
    from dino_fast.train.optim import param_groups

    crops = make_crops(dataclasses.replace(setup, batch=1), seed=1)
    student(list(crops)).float().square().mean().backward()
    variants = list(OPTIMIZER_VARIANTS) + (["apex"] if setup.device == "cuda" else [])
    opts: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for v in variants:
        try:
            opts[v] = make_optimizer(param_groups(student), v)
            opts[v].step()  # creates the state
        except (ImportError, RuntimeError, ValueError) as e:
            out[v] = ("apex not installed" if isinstance(e, ImportError) and v == "apex"
                      else f"unavailable: {type(e).__name__}: {e}".split("\n")[0][:160])
    times: dict[str, list[float]] = {v: [] for v in opts}
    for _ in range(repeats):
        for v, opt in opts.items():
            _sync(setup.device)
            t0 = time.perf_counter()
            opt.step()
            _sync(setup.device)
            times[v].append(time.perf_counter() - t0)
    for v, ts in times.items():
        out[v] = statistics.median(ts)
    if "apex" not in out and setup.device != "cuda":
        out["apex"] = "apex: CUDA only, not timed on CPU" if _apex_installed() else "apex not installed"
    del student, opts
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (a whole step: forward, loss, backward), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; the
    elementwise work is not counted, as in every MFU figure)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def count_host_syncs(fn: Callable[[], Any], device: str) -> Optional[int]:
    """Host-device synchronisations in one call of ``fn`` on CUDA, counted with
    ``torch.cuda.set_sync_debug_mode("warn")`` (one warning per synchronising call: ``.item()``,
    ``.tolist()``, a device-to-host copy, ``nonzero``; an explicit ``torch.cuda.synchronize()`` is
    not counted). ``None`` on CPU: there is no device for the host to wait on. The debug mode is
    restored afterwards."""
    if device != "cuda":
        return None
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def peak_matmul_flops(device: str, dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
                      n: Optional[int] = None, repeats: int = 5) -> dict[str, float]:
    """The device's dense-matmul throughput in FLOP/s per dtype: the best of ``repeats`` square
    ``n x n @ n x n`` products (n = 2048 on CPU, 8192 on CUDA), measured now, in this process."""
    n = n or (8192 if device == "cuda" else 2048)
    out = {}
    for dt in dtypes:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        best = math.inf
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            if i > 0:  # the first call warms up
                best = min(best, time.perf_counter() - t0)
        out[str(dt).replace("torch.", "")] = 2.0 * n ** 3 / best
        del a, b
    return out


def add_flop_rates(row: dict[str, Any], flops: int, peaks: dict[str, float], dtype: str,
                   sides: Sequence[str]) -> None:
    """Put ``flops`` per step, achieved FLOP/s per side (median total) and the ratio to the
    measured peak of ``dtype`` into ``row`` (in place)."""
    row["flops_per_step"] = flops
    row["peak_flops_dtype"] = dtype
    row["peak_flops"] = peaks[dtype]
    row["achieved"] = {}
    for side in sides:
        t = row[side]["total"]
        rate = flops / t if t > 0 else math.nan
        row["achieved"][side] = {"flops_per_s": rate, "of_peak": rate / peaks[dtype]}


def _apex_installed() -> bool:
    try:
        import apex  # noqa: F401
    except ImportError:
        return False
    return True


def _round_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round speed-ups ``num[r] / den[r]`` of two sides timed in the same interleaved rounds."""
    return [a / b for a, b in zip(num, den)]


def _rel_diff(value: float, ref: float) -> float:
    """``|value - ref| / |ref|`` (the denominator floored at 1e-30)."""
    return abs(value - ref) / max(abs(ref), 1e-30)


def bench_setup(setup: StepSetup, rounds: int, warmup: int, ours_optimizer: Optional[str] = None,
                optimizer_repeats: int = 3, compiled_reference: bool = True,
                peaks: Optional[dict[str, float]] = None,
                trainer_variants: Sequence[tuple[str, Sequence[str]]] = ()) -> dict[str, Any]:
    """Measure one setup: optimizer variants, then interleaved reference / dino-fast / Trainer
    steps (and the reference under ``torch.compile`` when ``compiled_reference``).

    ``trainer_variants``: ``(name, overrides)`` pairs, each another Trainer built with those
    config overrides on top (a lever on: ``("trainer_compile", ["model.compile=true"])``),
    interleaved with the other sides and reported under ``row["trainer_variants"][name]``
    against the plain Trainer step (the lever off) of the same rounds.

    ``ours_optimizer=None`` picks the faster of ``foreach`` and ``fused`` from the variant timings.
    ``peaks``: the device's measured matmul FLOP/s per dtype (:func:`peak_matmul_flops`), for the
    achieved / peak columns. Returns a JSON-ready row (median seconds per phase for every side,
    speed-ups, losses, FLOPs per step and achieved FLOP/s).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    ref, ours = build_pair(setup, seed=0, ours_optimizer="fused")
    variants = optimizer_variants(setup, ours, optimizer_repeats)
    if ours_optimizer is None:
        cands = {v: variants[v] for v in ("foreach", "fused") if isinstance(variants.get(v), float)}
        ours_optimizer = min(cands, key=cands.get) if cands else "default"
    if ours_optimizer != ours.optimizer_variant:
        from dino_fast.train.optim import param_groups

        ours.optimizer_variant = ours_optimizer
        ours.optimizer = make_optimizer(param_groups(ours.student), ours_optimizer)
        set_schedule_values(ours.optimizer, setup)
    crops = make_crops(setup)
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="bench_step_")
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in ref.student.state_dict().items()}
    trainer = TrainerSide(setup, sd, tmp.name)
    sides: tuple[tuple[str, Any], ...] = (("reference", ref), ("ours", ours), ("trainer", trainer))
    if compiled_reference:
        sides += (("reference_compiled", StepSide(setup, "reference", sd, compiled=True)),)
    for i, (vname, extra) in enumerate(trainer_variants):
        if vname in dict(sides) or not vname.startswith("trainer_"):
            raise ValueError(f"trainer variant names must start with 'trainer_' and be unique, got {vname!r}")
        sides += ((vname, TrainerSide(setup, sd, os.path.join(tmp.name, f"v{i}"), extra)),)
    first_losses = {}
    for i in range(warmup):
        for name, side in sides:
            loss, _ = side.step(crops, seed=1000 + i)
            first_losses.setdefault(name, loss)
    phase_times: dict[str, dict[str, list[float]]] = {
        n: {p: [] for p in PHASES + ("total",)} for n in ("reference", "ours")}
    phase_times["trainer"] = {"total": []}
    for vname, _ in trainer_variants:
        phase_times[vname] = {"total": []}
    if compiled_reference:
        phase_times["reference_compiled"] = {p: [] for p in PHASES + ("total",)}
    losses: dict[str, list[float]] = {name: [] for name, _ in sides}
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for name, side in order:
            loss, secs = side.step(crops, seed=2000 + r)
            losses[name].append(loss)
            first_losses.setdefault(name, loss)
            for p, s in secs.items():
                phase_times[name][p].append(s)
    row: dict[str, Any] = {
        "model": setup.arch, "setup": setup.label(), "batch": setup.batch, "crops": f"2x{setup.global_size}+"
        f"{setup.n_local}x{setup.local_size}", "K": setup.out_dim, "device": setup.device,
        "autocast": setup.autocast,
        "params": sum(p.numel() for p in ref.student.parameters()),
        "param_tensors": sum(1 for _ in ref.student.parameters()),
        "rounds": rounds, "warmup": warmup,
        "reference_attention": "math", "ours_attention": ours.student.backbone.resolve_attn_backend(setup.device),
        "reference_optimizer": "AdamW default (" + ("per-tensor loop" if setup.device == "cpu" else "torch's choice")
        + ")", "ours_optimizer": f"AdamW {ours_optimizer}",
        "optimizer_variants_s": variants,
        "first_loss_reference": first_losses["reference"], "first_loss_ours": first_losses["ours"],
        "loss_rel_diff_first_step": _rel_diff(first_losses["ours"], first_losses["reference"]),
    }
    for name in ("reference", "ours"):
        row[name] = {p: statistics.median(ts) for p, ts in phase_times[name].items()}
        row[name + "_min"] = {p: min(ts) for p, ts in phase_times[name].items()}
    ratios = _round_ratios(phase_times["reference"]["total"], phase_times["ours"]["total"])
    row["speedup"] = statistics.median(ratios)
    row["speedup_min_max"] = [min(ratios), max(ratios)]
    # best-of-rounds ratio: the least disturbed step of each side (robust on a loaded machine)
    row["speedup_of_min_totals"] = row["reference_min"]["total"] / row["ours_min"]["total"]
    row["phase_speedup"] = {p: row["reference"][p] / row["ours"][p] if row["ours"][p] > 0 else math.inf
                            for p in PHASES}
    row["saved_s"] = {p: row["reference"][p] - row["ours"][p] for p in PHASES}
    row["images_per_s_reference"] = setup.batch / row["reference"]["total"]
    row["images_per_s_ours"] = setup.batch / row["ours"]["total"]
    # Amdahl: the best speed-up reachable without touching forward+backward
    fb = row["reference"]["forward"] + row["reference"]["backward"]
    row["speedup_ceiling_if_forward_backward_unchanged"] = row["reference"]["total"] / fb if fb > 0 else math.inf
    # the Trainer's own step (what `dino-fast train` runs), on the same crops and weights
    row["trainer"] = {"total": statistics.median(phase_times["trainer"]["total"])}
    row["trainer_min"] = {"total": min(phase_times["trainer"]["total"])}
    row["trainer_optimizer"] = trainer.optimizer_variant
    row["first_loss_trainer"] = first_losses["trainer"]
    row["loss_rel_diff_first_step_trainer"] = _rel_diff(first_losses["trainer"], first_losses["reference"])
    t_ratios = _round_ratios(phase_times["reference"]["total"], phase_times["trainer"]["total"])
    row["trainer_speedup"] = statistics.median(t_ratios)
    row["trainer_speedup_min_max"] = [min(t_ratios), max(t_ratios)]
    row["images_per_s_trainer"] = setup.batch / row["trainer"]["total"]
    if compiled_reference:
        rc = phase_times["reference_compiled"]
        row["reference_compiled"] = {p: statistics.median(ts) for p, ts in rc.items()}
        row["reference_compiled_min"] = {p: min(ts) for p, ts in rc.items()}
        row["trainer_speedup_vs_compiled_reference"] = statistics.median(
            _round_ratios(rc["total"], phase_times["trainer"]["total"]))
        row["first_loss_reference_compiled"] = first_losses["reference_compiled"]
    if trainer_variants:
        row["trainer_variants"] = {}
    for vname, extra in trainer_variants:
        vt = phase_times[vname]["total"]
        v_ratios = _round_ratios(phase_times["trainer"]["total"], vt)
        row[vname] = {"total": statistics.median(vt)}  # beside the other sides (achieved FLOP/s)
        row["trainer_variants"][vname] = {
            "overrides": list(extra), "total": statistics.median(vt), "min": min(vt),
            "images_per_s": setup.batch / statistics.median(vt),
            "speedup_vs_trainer": statistics.median(v_ratios),
            "speedup_vs_trainer_min_max": [min(v_ratios), max(v_ratios)],
            "first_loss": first_losses[vname],
            "loss_rel_diff_first_step": _rel_diff(first_losses[vname], first_losses["trainer"]),
        }
        if compiled_reference:
            row["trainer_variants"][vname]["speedup_vs_compiled_reference"] = statistics.median(
                _round_ratios(phase_times["reference_compiled"]["total"], vt))
    # what the Trainer's step waits for on the host (CUDA only; the design has one: the loss and
    # finite-check read before backward)
    row["host_syncs_per_step_trainer"] = count_host_syncs(
        functools.partial(trainer.trainer.step_on_crops, list(crops), EPOCH, 0), setup.device)
    if peaks is not None:
        flops = count_flops(functools.partial(ours.step, crops, seed=0))
        add_flop_rates(row, flops, peaks, "bfloat16" if setup.autocast == "bf16" else "float32",
                       [name for name, _ in sides])
    del ref, ours, trainer, sides
    tmp.cleanup()
    return row


DEFAULT_RUN_VARIANTS = (("attn auto", "auto"), ("attn sdpa (before issue 19)", "sdpa"))


def default_run_rows(rounds: int, warmup: int, peaks: dict[str, float],
                     config: str = "configs/default.yaml") -> list[dict[str, Any]]:
    """The default run's own step: ``Trainer.step_on_crops`` of ``config`` (the built-in data,
    ``train.precision=auto``: bf16 on CPUs with bf16 units) on real augmented batches, with the
    attention backend of today's default (``auto``) and of the step before issue 19 (``sdpa``,
    torch's fused kernel, also in bf16), interleaved round by round on one Trainer. One row per
    variant: median / min seconds per step, images/s, FLOPs per step (counted), achieved FLOP/s
    and its ratio to the measured matmul peak of the run's precision."""
    import tempfile

    from dino_fast.config import load_config
    from dino_fast.train.loop import Trainer

    tmp = tempfile.TemporaryDirectory(prefix="bench_step_default_")
    cfg = load_config(config, [f"train.output_dir={tmp.name}/out", "train.progress=false", "train.resume=none",
                               "data.num_workers=0"])
    tr = Trainer(cfg)
    ids = tr.loader.batch_indices()
    batches = []
    for i, (g, loc, _) in enumerate(tr.loader):
        if i >= warmup + rounds:
            break
        gen = torch.Generator(device=tr.device)
        gen.manual_seed(i)
        batches.append([c.detach() for c in tr.augment(g, loc, generator=gen, sample_ids=ids[i], seed=0, epoch=0)])
    epoch = min(tr.cfg.train.epochs - 1, tr.cfg.optim.warmup_epochs + 1)  # past warm-up and the head freeze
    it0 = epoch * tr.niter_per_epoch

    def step(crops: Sequence[torch.Tensor], backend: str, it: int) -> float:
        for net in (tr.method.student, tr.method.teacher):
            net.backbone.set_attn_backend(backend)
        t0 = time.perf_counter()
        tr.step_on_crops(list(crops), epoch, it)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name, _ in DEFAULT_RUN_VARIANTS}
    for r in range(warmup + rounds):
        order = DEFAULT_RUN_VARIANTS if r % 2 == 0 else DEFAULT_RUN_VARIANTS[::-1]
        for name, backend in order:
            t = step(batches[r % len(batches)], backend, it0 + r)
            if r >= warmup:
                times[name].append(t)
    flops = count_flops(lambda: step(batches[0], "auto", it0))
    dtype = "bfloat16" if tr.precision == "bf16" else "float32"
    base = statistics.median(times[DEFAULT_RUN_VARIANTS[1][0]])
    compute = torch.bfloat16 if tr.precision == "bf16" else torch.float32
    rows = []
    for name, backend in DEFAULT_RUN_VARIANTS:
        med = statistics.median(times[name])
        tr.method.student.backbone.set_attn_backend(backend)
        resolved = tr.method.student.backbone.resolve_attn_backend(tr.device, compute)
        rows.append({
            "setup": f"default run ({config}: {cfg.model.arch}/{cfg.model.patch_size} depth {cfg.model.depth}, "
                     f"B={cfg.data.batch_size_per_gpu} 2x{cfg.data.global_crops_size}+{cfg.data.local_crops_number}x"
                     f"{cfg.data.local_crops_size} K={cfg.model.out_dim}, {tr.precision})",
            "variant": name, "attn_backend": backend,
            "resolved_attention": resolved,
            "precision": tr.precision, "rounds": rounds, "median_s": med, "min_s": min(times[name]),
            "images_per_s": cfg.data.batch_size_per_gpu / med, "speedup_vs_before": base / med,
            "flops_per_step": flops, "achieved_flops_per_s": flops / med, "peak_flops_dtype": dtype,
            "peak_flops": peaks[dtype], "of_peak": flops / med / peaks[dtype],
        })
    tmp.cleanup()
    return rows


def _print_rows(rows: list[dict[str, Any]]) -> None:
    table = step_phase_rows(rows, ours="ours", ratio="ref/ours", img_key="img/s")
    print("Time per step by phase, ms (medians over interleaved rounds); ref/ours rows are ratios "
          "(total: median of per-round ratios)")
    print(common.fmt_table(table, ["setup", "side", *PHASES, "total", "img/s"]))
    print("\nAdamW step alone, ms (median; dino-fast uses the fastest of foreach/fused):")
    for r in rows:
        cells = ", ".join(f"{k} {v * 1e3:.1f}" if isinstance(v, float) else f"{k}: {v}"
                          for k, v in r["optimizer_variants_s"].items())
        print(f"  {r['setup']}: {cells}; ours uses {r['ours_optimizer']}")
    for r in rows:
        print(f"  {r['setup']}: Trainer.step_on_crops (the trainer's own step, {r['trainer_optimizer']}): "
              f"{r['trainer']['total'] * 1e3:.1f} ms, {r['trainer_speedup']:.2f}x the reference "
              f"(per-round {r['trainer_speedup_min_max'][0]:.2f}-{r['trainer_speedup_min_max'][1]:.2f}x), "
              f"first-step loss {r['first_loss_trainer']:.6f} (rel. diff {r['loss_rel_diff_first_step_trainer']:.1e})")
    for r in rows:
        if "reference_compiled" in r:
            print(f"  {r['setup']}: official step under torch.compile (networks and loss, default mode): "
                  f"{r['reference_compiled']['total'] * 1e3:.1f} ms; the Trainer's step is "
                  f"{r['trainer_speedup_vs_compiled_reference']:.2f}x it")
        for vname, v in r.get("trainer_variants", {}).items():
            print(f"  {r['setup']}: {vname} ({' '.join(v['overrides'])}): {v['total'] * 1e3:.1f} ms, "
                  f"{v['images_per_s']:.0f} images/s, {v['speedup_vs_trainer']:.2f}x the Trainer's step without it "
                  f"(per-round {v['speedup_vs_trainer_min_max'][0]:.2f}-{v['speedup_vs_trainer_min_max'][1]:.2f}x)"
                  + (f", {v['speedup_vs_compiled_reference']:.2f}x the compiled official step"
                     if "speedup_vs_compiled_reference" in v else "")
                  + f"; first-step loss rel. diff {v['loss_rel_diff_first_step']:.1e}")
        if "achieved" in r:
            cells = ", ".join(f"{side} {a['flops_per_s'] / 1e9:.0f} GFLOP/s ({100 * a['of_peak']:.1f} % of peak)"
                              for side, a in r["achieved"].items())
            print(f"  {r['setup']}: {r['flops_per_step'] / 1e9:.1f} GFLOP per step (counted); achieved: {cells}; "
                  f"peak = measured {r['peak_flops_dtype']} matmul {r['peak_flops'] / 1e9:.0f} GFLOP/s")
    for r in rows:
        print(f"  {r['setup']}: first-step loss reference {r['first_loss_reference']:.6f}, ours "
              f"{r['first_loss_ours']:.6f} (rel. diff {r['loss_rel_diff_first_step']:.1e}); attention "
              f"{r['reference_attention']} vs {r['ours_attention']}; ceiling with forward+backward unchanged "
              f"{r['speedup_ceiling_if_forward_backward_unchanged']:.2f}x; best-of-rounds totals "
              f"{r['reference_min']['total'] * 1e3:.0f} vs {r['ours_min']['total'] * 1e3:.0f} ms "
              f"({r['speedup_of_min_totals']:.2f}x)")


def run(quick: bool = False, threads: Optional[int] = None) -> dict[str, Any]:
    """Benchmark ViT-tiny/16 and ViT-S/16 (CPU: small batch; CUDA: B=64, bf16 autocast), print the
    tables and the bar, write bench/results/step.json; returns the payload."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    if cuda:
        batch, rounds, warmup = (32, 5, 2) if quick else (64, 20, 3)
        setups = [StepSetup(arch=a, batch=batch, device="cuda", autocast="bf16") for a in ("vit_tiny", "vit_small")]
    else:
        batch, rounds, warmup = (2, 3, 1) if quick else (4, 7, 1)
        setups = [StepSetup(arch=a, batch=batch) for a in ("vit_tiny", "vit_small")]
    peaks = peak_matmul_flops("cuda" if cuda else "cpu")
    print("  dense matmul peak, measured now: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()),
          flush=True)
    rows = []
    for s in setups:
        print(f"  measuring {s.label()} on {s.device} ({rounds} rounds)...", flush=True)
        rows.append(bench_setup(s, rounds=rounds, warmup=warmup, optimizer_repeats=2 if quick else 5, peaks=peaks))
    default_rows: list[dict[str, Any]] = []
    if not cuda:
        print("  measuring the default run's step (configs/default.yaml)...", flush=True)
        default_rows = default_run_rows(rounds=3 if quick else 10, warmup=1 if quick else 2, peaks=peaks)
    load = os.getloadavg()
    vs = next(r for r in rows if r["model"] == "vit_small")
    met = vs["speedup"] >= BAR_SPEEDUP
    ncpu = os.cpu_count() or 1
    loaded = max(load[0], load_before[0]) > 1.5 * ncpu
    payload: dict[str, Any] = {
        "quick": quick, "threads": torch.get_num_threads(), "device": "cuda" if cuda else "cpu",
        "phases": list(PHASES), "epoch": EPOCH, "momentum": MOMENTUM, "rows": rows,
        "peak_matmul_flops": peaks, "default_run": default_rows,
        "apex": ("installed" if _apex_installed() else "apex not installed"),
        "bars": {"step_speedup_vit_small_cpu" if not cuda else "step_speedup_vit_small_cuda": {
            "value": vs["speedup"], "bar": BAR_SPEEDUP, "met": met,
            "note": "dino-fast / reference step time, ViT-S/16, 2x224+8x96, median of per-round ratios"
                    + ("; UNRELIABLE: machine loaded by other processes" if loaded else "")}},
        "loadavg_before_1_5_15": list(load_before), "loadavg_1_5_15": list(load),
        "elapsed_s": time.perf_counter() - t0,
    }
    print(f"\nEnd-to-end DINO step, {payload['device']}, {payload['threads']} threads"
          f"{' (quick)' if quick else ''}; apex: {payload['apex']}")
    _print_rows(rows)
    if default_rows:
        now = default_rows[0]
        payload["bars"]["default_run_step_speedup_cpu"] = {
            "value": now["speedup_vs_before"], "bar": BAR_DEFAULT_RUN, "met": now["speedup_vs_before"] >= BAR_DEFAULT_RUN,
            "note": "the default run's Trainer step with today's attention choice vs the step before issue 19 "
                    "(sdpa), interleaved on one Trainer; the epoch-start stalls the persistent loader workers "
                    "removed show only in whole runs (README)" + ("; UNRELIABLE: machine loaded" if loaded else "")}
        print("\nThe default run's step (Trainer.step_on_crops, real batches):")
        print(common.fmt_table([{**r, "ms": r["median_s"] * 1e3, "min_ms": r["min_s"] * 1e3,
                                 "GFLOP": r["flops_per_step"] / 1e9, "GFLOP/s": r["achieved_flops_per_s"] / 1e9}
                                for r in default_rows],
                               ["variant", "resolved_attention", "ms", "min_ms", "images_per_s", "speedup_vs_before",
                                "GFLOP", "GFLOP/s", "of_peak"]))
    print(f"\nbar: ViT-S/16 step dino-fast >= {BAR_SPEEDUP}x the reference: {vs['speedup']:.2f}x "
          f"(per-round {vs['speedup_min_max'][0]:.2f}-{vs['speedup_min_max'][1]:.2f}x) -> "
          f"{'MET' if met else 'NOT MET'}{' (UNRELIABLE: machine loaded)' if loaded else ''}")
    print(f"load average before / after (1 min): {load_before[0]:.2f} / {load[0]:.2f} on {ncpu} CPUs")
    path = common.write_result("step", payload)
    print(f"wrote {path}")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.step [--quick] [--threads N]``."""
    return common.suite_main(argv, name="step", description="End-to-end DINO step benchmark", run=run,
                             quick_help="batch 2, 3 rounds", threads=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

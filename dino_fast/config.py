"""Typed training configuration: YAML files plus ``key=value`` dot-list overrides.

A config is a tree of dataclasses (:class:`TrainConfig` at the root). Loading checks every key:
an unknown or mistyped key is an error that lists the valid keys of its section; a value of the
wrong type is an error naming the key, the expected type and what came.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from dino_fast.data.sizing import SMALL_GLOBAL_CROP, SMALL_ITERATION_SCALE, eval_size_for_crops
from dino_fast.models.registry import backbone_names

# torch.compile modes for model.compile_mode; the ones that capture CUDA graphs (on CUDA devices)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


class ConfigError(ValueError):
    """A configuration file or override that does not match the schema."""


@dataclass
class ModelConfig:
    """Student/teacher architecture (the teacher gets drop_path_rate 0)."""

    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large
    patch_size: int = 16
    depth: Optional[int] = None  # None: the architecture's own depth (12)
    drop_path_rate: float = 0.1
    layerscale_init: float = 0.0  # DINOv2's LayerScale init (1e-5); 0: none (official DINO blocks)
    # read every image in grey (training, evaluation, attention maps; the model does it, so the
    # checkpoint carries it): for folders whose colours vary at random within a class
    grayscale_input: bool = False
    attn_backend: str = "auto"  # auto | xformers | sdpa | math
    fused_multicrop_attention: bool = False  # CUDA + xformers: one attention call over all crops
    out_dim: int = 65536
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    compile: bool = False  # torch.compile the transformer blocks
    # torch.compile mode of the blocks: default | reduce-overhead (inductor + CUDA graphs: every block
    # and crop resolution replays a captured graph; CUDA, static shapes) | max-autotune (autotuned
    # kernels + CUDA graphs) | max-autotune-no-cudagraphs. Only with model.compile=true.
    compile_mode: str = "default"


@dataclass
class DataConfig:
    """Multi-crop data; ``root`` empty means the built-in dataset (generated on demand)."""

    root: str = ""
    val_root: str = ""  # k-NN evaluation; empty: <built-in>/val, or no evaluation for a custom root
    builtin_dir: str = "data_cache/builtin"
    backend: str = "auto"  # auto | ffcv | folder
    global_crops_number: int = 2
    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    batch_size_per_gpu: int = 64
    num_workers: int = 8
    # Gaussian-blur sigma range in pixels of the output crop; the official (0.1, 2.0) is meant for
    # 224/96 px crops: scale it down with the crop size for small crops.
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # colour augmentation (official defaults): jitter probability, jitter strengths (brightness,
    # contrast, saturation, hue) and grayscale probability
    jitter_p: float = 0.8
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_p: float = 0.2
    # the small-image rule (dino_fast/data/sizing.py): when the training images' median shorter side
    # is below global_crops_size, train on 48 px global crops (local crops scaled alike) for 5/3 x
    # train.iterations and evaluate at the matching size; configs/default.yaml turns it on
    auto_crops: bool = False


@dataclass
class LossConfig:
    """DINO loss (official defaults)."""

    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    backend: str = "auto"  # auto | triton | torch | reference
    async_center: bool = False
    # teacher targets: "center" (DINO: softmax((T - c) / tau_t), EMA center) or "sinkhorn_knopp"
    # (DINOv2: 3 Sinkhorn-Knopp iterations over the global batch, no center)
    centering: str = "center"
    koleo_weight: float = 0.0  # DINOv2's KoLeo term on the student's global-crop CLS features (DINOv2: 0.1)


@dataclass
class OptimConfig:
    """AdamW with the official schedules."""

    lr: float = 0.0005  # at a global batch of 256; scaled linearly with the global batch
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # 0 disables clipping
    clip_mode: str = "per_param"  # per_param (official) | global
    freeze_last_layer: int = 1  # epochs during which the head's last layer gets no gradient
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0  # the cosine schedule's final value (official: 1.0)
    ema_backend: str = "auto"
    # lr multiplier of the backbone's patch embedding (the student's patch_embed parameters, in
    # param groups of their own): 1.0 = the official DINO; the official Mugs and DINOv2 recipes use 0.2
    patch_embed_lr_mult: float = 1.0
    # DINOv2's layer-wise lr decay: block i's lr x decay^(depth - i), the embeddings' x decay^(depth + 1),
    # the final norm and heads x 1; 1.0 = none (official DINO, Mugs); DINOv2's ImageNet-1k recipe: 0.9
    layerwise_decay: float = 1.0


@dataclass
class TrainSection:
    """Loop, precision, checkpoints, logging."""

    epochs: int = 100
    seed: int = 0
    output_dir: str = "runs/default"
    precision: str = "auto"  # auto (bf16 on GPU and on CPUs with native bf16, else fp32) | bf16 | fp16 | fp32
    resume: str = "auto"  # auto | none | PATH
    saveckp_freq: int = 20  # keep a numbered copy every N epochs (the latest is always kept)
    checkpoint_every_iters: int = 0  # also checkpoint every N iterations (0: epoch ends only)
    max_iters: int = 0  # stop after this many iterations in total (0: run all epochs)
    # the run's length in iterations whatever the data size (0: train.epochs epochs). The trainer
    # then runs ceil(iterations / iterations per epoch) epochs (train.epochs is replaced by that
    # number, also for the per-epoch schedules of the method) and stops after `iterations`; the lr,
    # weight-decay and teacher-momentum cosines end exactly there, and the lr warm-up and the
    # last-layer freeze last min(optim.warmup_epochs / optim.freeze_last_layer epochs, iterations / 4)
    iterations: int = 0
    # a wall-clock budget in seconds for the training loop and the end-of-run evaluation (0:
    # none). With train.iterations set, the trainer first times a few real steps and the
    # evaluation on a sample of its images, then caps train.iterations at what fits the rest of
    # the budget (dino_fast/train/budget.py); the capped length is the run's, in its config.json
    # and checkpoint, and a resumed run keeps it.
    time_budget_s: float = 0.0
    log_every: int = 10
    check_finite: bool = True
    progress: bool = True
    tensorboard: bool = False
    threads: int = 0  # torch CPU threads (0: torch's default)
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    # how the student and teacher are distributed over the ranks: "none" (every rank holds all
    # weights; DDP when distributed) or "fsdp" (torch's fully_shard, FSDP2: each transformer block,
    # then each head, then the root of student and teacher sharded over one mesh of all ranks;
    # needs torch.distributed, i.e. torchrun; docs/DESIGN.md "Sharded training (FSDP)")
    sharding: str = "none"
    # FSDP's parameter dtype for the forward/backward (the sharded fp32 weights are all-gathered
    # in it): "auto" (bf16 when train.precision resolves to bf16, else fp32) | bf16 | fp32
    fsdp_param_dtype: str = "auto"
    # dtype of the transformer blocks' gradient reduce-scatter under FSDP: fp32 (default) | bf16
    # (halves the block traffic); the heads and the root always reduce in fp32
    fsdp_block_reduce_dtype: str = "fp32"


@dataclass
class EvalConfig:
    """k-NN (and linear-probe) evaluation at the end of training."""

    knn_after_training: bool = True
    linear_after_training: bool = True  # also the linear probe (dino_fast.eval.linear), teacher and random init
    linear_epochs: int = 100
    knn_k: tuple[int, ...] = (10, 20, 100, 200)
    knn_temperature: float = 0.07
    image_size: int = 224
    resize_size: int = 256
    batch_size: int = 128
    compare_random_init: bool = True
    # the end-of-run evaluation's feature extraction: fp32 | bf16 (autocast: faster on GPUs and on
    # CPUs with native bf16, for folders of tens of thousands of images; the k-NN and the probe
    # then see bf16-rounded features) | auto (bf16 from 20 000 train + val images when training
    # ran in bf16, else fp32; dino_fast.train.precision.resolve_eval_precision)
    precision: str = "fp32"


@dataclass
class MethodConfig:
    """Which self-supervised method trains (a name of the method registry,
    :mod:`dino_fast.methods`; checked when the method is built)."""

    name: str = "dino"


@dataclass
class DINOv2Config:
    """The DINOv2 method's own hyper-parameters (``method.name: dinov2``; ignored by the others).
    KoLeo is ``loss.koleo_weight`` (DINOv2: 0.1); the teacher targets of both the DINO and the
    iBOT term follow ``loss.centering``."""

    dino_loss_weight: float = 1.0  # DINOv2 dino.loss_weight
    ibot_loss_weight: float = 1.0  # DINOv2 ibot.loss_weight
    mask_sample_probability: float = 0.5  # fraction of the global crops that are masked
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # stratified mask ratios
    mask_max_patches_fraction: float = 0.5  # largest mask block, as a fraction of the patch grid
    ibot_separate_head: bool = False  # a separate iBOT head (DINOv2 ViT-L: true) or the DINO head shared
    ibot_out_dim: int = 0  # iBOT head prototypes (0: model.out_dim)
    ibot_head_hidden_dim: int = 0  # 0: model.head_hidden_dim
    ibot_head_bottleneck_dim: int = 0  # 0: model.head_bottleneck_dim


@dataclass
class MugsConfig:
    """Mugs (``method.name: mugs``; Zhou et al. 2022, the official sail-sg/mugs semantics).

    Sizes given as 0 scale with the model section, which gives the official sizes for the
    official model settings (out_dim 65536, head_hidden_dim 2048, head_bottleneck_dim 256) and
    small ones for tiny CPU configs: ``proj_dim`` = head_bottleneck_dim (256), ``proj_hidden_dim``
    = head_hidden_dim (2048), ``pred_hidden_dim`` = 2 x head_hidden_dim (4096), ``queue_size`` and
    ``memory_size`` = out_dim (65536). The group head is the DINO head of ``model.*`` and its loss
    the DINO loss of ``loss.*`` with the Mugs pair weights.
    """

    instance_weight: float = 1.0  # the official weights gate a loss (> 0) and normalise the sum only
    local_group_weight: float = 1.0
    group_weight: float = 1.0
    temperature: float = 0.2  # InfoNCE temperature of the instance and local-group losses
    proj_dim: int = 0
    proj_hidden_dim: int = 0
    pred_hidden_dim: int = 0
    queue_size: int = 0  # negatives of each InfoNCE queue (instance, local-group)
    memory_size: int = 0  # rows of each local-group memory (student, teacher)
    topk: int = 8  # neighbours a relation-block query takes from the memory
    # the official memory pointer advances twice per write (with a constant batch half of the
    # teacher memory is never written); false: a correct ring buffer
    faithful_pointer: bool = False
    student_global_crops: int = 2  # separate student global crops (the teacher's 2 are never shown to it)
    # probability of the strong recipe (RandAugment rand-m9-mstd0.5-inc1 + RandomErasing 0.25) for
    # an image's student global crops (together) and for each local crop (independently); 0: weak only
    strong_p: float = 0.5

    def resolved(self, model: "ModelConfig") -> "MugsConfig":
        """A copy with every 0 size replaced by its model-derived default (class doc)."""
        return dataclasses.replace(
            self,
            proj_dim=self.proj_dim or model.head_bottleneck_dim,
            proj_hidden_dim=self.proj_hidden_dim or model.head_hidden_dim,
            pred_hidden_dim=self.pred_hidden_dim or 2 * model.head_hidden_dim,
            queue_size=self.queue_size or model.out_dim,
            memory_size=self.memory_size or model.out_dim,
        )


@dataclass
class TrainConfig:
    """The whole configuration of a ``dino-fast train`` run."""

    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)
    mugs: MugsConfig = field(default_factory=MugsConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), YAML/JSON serialisable."""
        return _to_plain(dataclasses.asdict(self))

    def validate(self) -> None:
        """Check value ranges and choices; raises :class:`ConfigError` naming the key."""
        if not isinstance(self.method.name, str) or not self.method.name:
            raise ConfigError(f"method.name must be a non-empty string, got {self.method.name!r}")
        _choice("model.arch", self.model.arch, backbone_names())
        _choice("model.attn_backend", self.model.attn_backend, ("auto", "xformers", "sdpa", "math"))
        _choice("model.compile_mode", self.model.compile_mode, COMPILE_MODES)
        if self.model.compile_mode != "default" and not self.model.compile:
            raise ConfigError(f"model.compile_mode={self.model.compile_mode!r} needs model.compile=true (the mode "
                              f"is how the blocks are compiled; with model.compile=false nothing is)")
        _choice("data.backend", self.data.backend, ("auto", "ffcv", "folder"))
        _choice("loss.centering", self.loss.centering, ("center", "sinkhorn_knopp"))
        _choice("loss.backend", self.loss.backend, ("auto", "triton", "torch", "cpu", "reference"))
        _choice("optim.ema_backend", self.optim.ema_backend, ("auto", "triton", "torch", "cpu", "reference"))
        _choice("optim.clip_mode", self.optim.clip_mode, ("per_param", "global"))
        _choice("train.precision", self.train.precision, ("auto", "bf16", "fp16", "fp32"))
        _choice("train.dist_backend", self.train.dist_backend, ("auto", "nccl", "gloo"))
        _validate_sharding(self)
        for key, val in [
            ("model.patch_size", self.model.patch_size), ("model.out_dim", self.model.out_dim),
            ("data.global_crops_number", self.data.global_crops_number),
            ("data.global_crops_size", self.data.global_crops_size),
            ("data.local_crops_size", self.data.local_crops_size),
            ("data.batch_size_per_gpu", self.data.batch_size_per_gpu), ("train.epochs", self.train.epochs),
            ("loss.student_temp", self.loss.student_temp), ("loss.teacher_temp", self.loss.teacher_temp),
            ("loss.warmup_teacher_temp", self.loss.warmup_teacher_temp), ("optim.lr", self.optim.lr),
        ]:
            if not val > 0:
                raise ConfigError(f"{key} must be > 0, got {val!r}")
        if self.train.iterations < 0:
            raise ConfigError(f"train.iterations must be >= 0 (0: train.epochs decides), got {self.train.iterations}")
        tb = self.train.time_budget_s
        if not (math.isfinite(tb) and tb >= 0):
            raise ConfigError(f"train.time_budget_s must be a finite number of seconds >= 0 (0: no budget), got {tb!r}")
        if tb > 0 and self.train.iterations <= 0:
            raise ConfigError(f"train.time_budget_s={tb:g} caps train.iterations, which is 0 here (the run is "
                              "train.epochs long): set train.iterations too, or train.time_budget_s=0")
        ls = self.model.layerscale_init
        if not (isinstance(ls, (int, float)) and not isinstance(ls, bool) and math.isfinite(ls) and ls >= 0):
            raise ConfigError(f"model.layerscale_init must be a finite float >= 0 (0: no LayerScale, DINOv2: 1e-5), "
                              f"got {ls!r}")
        _choice("eval.precision", self.eval.precision, ("fp32", "bf16", "auto"))
        if self.eval.linear_epochs < 1:
            raise ConfigError(f"eval.linear_epochs must be >= 1, got {self.eval.linear_epochs}")
        if self.data.local_crops_number < 0:
            raise ConfigError(f"data.local_crops_number must be >= 0, got {self.data.local_crops_number}")
        if self.data.global_crops_number != 2:
            raise ConfigError(
                f"data.global_crops_number must be 2 (the DINO loss pairs two teacher crops), "
                f"got {self.data.global_crops_number}"
            )
        for key, scale in [("data.global_crops_scale", self.data.global_crops_scale),
                           ("data.local_crops_scale", self.data.local_crops_scale)]:
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ConfigError(f"{key} must be (lo, hi) with 0 < lo <= hi <= 1, got {scale!r}")
        if len(self.data.blur_sigma) != 2 or not 0 < self.data.blur_sigma[0] <= self.data.blur_sigma[1]:
            raise ConfigError(f"data.blur_sigma must be (lo, hi) with 0 < lo <= hi, got {self.data.blur_sigma!r}")
        for key, p in [("data.jitter_p", self.data.jitter_p), ("data.grayscale_p", self.data.grayscale_p)]:
            if not 0 <= p <= 1:
                raise ConfigError(f"{key} must be a probability in [0, 1], got {p!r}")
        cj = self.data.color_jitter
        if len(cj) != 4 or min(cj) < 0 or cj[3] > 0.5:
            raise ConfigError(
                f"data.color_jitter must be (brightness, contrast, saturation, hue) with every value >= 0 "
                f"and hue <= 0.5, got {cj!r}"
            )
        for key, size in [("data.global_crops_size", self.data.global_crops_size),
                          ("data.local_crops_size", self.data.local_crops_size)]:
            if size % self.model.patch_size:
                raise ConfigError(f"{key}={size} is not a multiple of model.patch_size={self.model.patch_size}")
        if not 0 <= self.optim.momentum_teacher <= 1:
            raise ConfigError(f"optim.momentum_teacher must be in [0, 1], got {self.optim.momentum_teacher}")
        if not 0 <= self.optim.momentum_teacher_end <= 1:
            raise ConfigError(f"optim.momentum_teacher_end must be in [0, 1], got {self.optim.momentum_teacher_end}")
        if not 0 <= self.loss.center_momentum <= 1:
            raise ConfigError(f"loss.center_momentum must be in [0, 1], got {self.loss.center_momentum}")
        mult = self.optim.patch_embed_lr_mult
        if not (math.isfinite(mult) and mult >= 0):
            raise ConfigError(f"optim.patch_embed_lr_mult must be a finite number >= 0 (1.0: the official DINO, "
                              f"0.2: the official Mugs and DINOv2; 0 freezes the patch embedding), got {mult!r}")
        lwd = self.optim.layerwise_decay
        if isinstance(lwd, bool) or not isinstance(lwd, (int, float)) or not (0 < lwd <= 1):
            raise ConfigError(f"optim.layerwise_decay must be a number in (0, 1] (1.0: none, DINOv2: 0.9), got {lwd!r}")
        if not (math.isfinite(self.loss.koleo_weight) and self.loss.koleo_weight >= 0):
            raise ConfigError(f"loss.koleo_weight must be a finite number >= 0, got {self.loss.koleo_weight}")
        _validate_dinov2(self)
        self._validate_mugs()
        if self.loss.koleo_weight > 0 and self.data.batch_size_per_gpu < 2:
            raise ConfigError(
                f"loss.koleo_weight={self.loss.koleo_weight} needs data.batch_size_per_gpu >= 2 (KoLeo takes each "
                f"sample's nearest neighbour within the rank's batch), got {self.data.batch_size_per_gpu}"
            )


    def _validate_mugs(self) -> None:
        m = self.mugs
        ws = (("mugs.instance_weight", m.instance_weight), ("mugs.local_group_weight", m.local_group_weight),
              ("mugs.group_weight", m.group_weight))
        for key, w in ws:
            if not (math.isfinite(w) and w >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {w!r}")
        if self.method.name != "mugs":
            return
        if not any(w > 0 for _, w in ws):
            raise ConfigError("mugs: at least one of instance_weight, local_group_weight, group_weight must be > 0")
        if not (math.isfinite(m.temperature) and m.temperature > 0):
            raise ConfigError(f"mugs.temperature must be > 0, got {m.temperature!r}")
        for key in ("proj_dim", "proj_hidden_dim", "pred_hidden_dim", "queue_size", "memory_size"):
            if getattr(m, key) < 0:
                raise ConfigError(f"mugs.{key} must be >= 0 (0: derived from model.*), got {getattr(m, key)}")
        if m.student_global_crops != 2:
            raise ConfigError(f"mugs.student_global_crops must be 2 (the pairs of the 2 teacher crops), "
                              f"got {m.student_global_crops}")
        if self.data.local_crops_number < 1:
            raise ConfigError(f"method mugs needs data.local_crops_number >= 1 (its loss averages the global and "
                              f"the local pairs separately), got {self.data.local_crops_number}")
        r = m.resolved(self.model)
        per_step = 2 * self.data.batch_size_per_gpu
        if r.queue_size < per_step:
            raise ConfigError(f"mugs.queue_size ({r.queue_size}) must hold one step's teacher keys, at least "
                              f"2 x data.batch_size_per_gpu = {per_step} (times the world size)")
        if r.memory_size < max(m.topk, self.data.batch_size_per_gpu):
            raise ConfigError(f"mugs.memory_size ({r.memory_size}) must be >= mugs.topk ({m.topk}) and >= "
                              f"data.batch_size_per_gpu ({self.data.batch_size_per_gpu})")
        if not 0.0 <= m.strong_p <= 1.0:
            raise ConfigError(f"mugs.strong_p must be a probability in [0, 1], got {m.strong_p!r}")
        if m.topk < 1:
            raise ConfigError(f"mugs.topk must be >= 1, got {m.topk}")


def _validate_dinov2(cfg: "TrainConfig") -> None:
    d = cfg.dinov2
    for key, val in (("dinov2.dino_loss_weight", d.dino_loss_weight), ("dinov2.ibot_loss_weight", d.ibot_loss_weight)):
        if not (math.isfinite(val) and val >= 0):
            raise ConfigError(f"{key} must be a finite number >= 0, got {val!r}")
    if not 0 <= d.mask_sample_probability <= 1:
        raise ConfigError(f"dinov2.mask_sample_probability must be in [0, 1], got {d.mask_sample_probability!r}")
    lo, hi = d.mask_ratio_min_max
    if not 0 <= lo <= hi <= 1:
        raise ConfigError(f"dinov2.mask_ratio_min_max must be (lo, hi) with 0 <= lo <= hi <= 1, got {d.mask_ratio_min_max!r}")
    if not 0 < d.mask_max_patches_fraction <= 1:
        raise ConfigError(f"dinov2.mask_max_patches_fraction must be in (0, 1], got {d.mask_max_patches_fraction!r}")
    for key, val in (("dinov2.ibot_out_dim", d.ibot_out_dim), ("dinov2.ibot_head_hidden_dim", d.ibot_head_hidden_dim),
                     ("dinov2.ibot_head_bottleneck_dim", d.ibot_head_bottleneck_dim)):
        if val < 0:
            raise ConfigError(f"{key} must be >= 0 (0: the DINO head's value), got {val!r}")
    if cfg.method.name == "dinov2" and not d.ibot_separate_head:
        for key, val in (("dinov2.ibot_out_dim", d.ibot_out_dim), ("dinov2.ibot_head_hidden_dim", d.ibot_head_hidden_dim),
                         ("dinov2.ibot_head_bottleneck_dim", d.ibot_head_bottleneck_dim)):
            if val:
                raise ConfigError(f"{key}={val} needs dinov2.ibot_separate_head=true (a shared head is the DINO head)")
    if cfg.method.name == "dinov2" and cfg.model.fused_multicrop_attention:
        raise ConfigError("model.fused_multicrop_attention is not supported by method dinov2 (its global crops run "
                          "through forward_features with masks)")


def _validate_sharding(cfg: "TrainConfig") -> None:
    t = cfg.train
    _choice("train.sharding", t.sharding, ("none", "fsdp"))
    _choice("train.fsdp_param_dtype", t.fsdp_param_dtype, ("auto", "bf16", "fp32"))
    _choice("train.fsdp_block_reduce_dtype", t.fsdp_block_reduce_dtype, ("fp32", "bf16"))
    if t.sharding != "fsdp":
        return
    if t.precision == "fp16":
        raise ConfigError("train.sharding=fsdp supports train.precision auto, bf16 or fp32, got 'fp16' (the fp16 "
                          "grad scaler's inf check is per rank, and under FSDP each rank sees only its gradient "
                          "shard); use bf16")
    if cfg.model.fused_multicrop_attention:
        raise ConfigError("model.fused_multicrop_attention=true is not supported with train.sharding=fsdp (the "
                          "fused path calls the blocks' forward_packed, which FSDP does not unshard); set it false")


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the dataclass field type ``tp``, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {value!r} ({type(value).__name__})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} expects {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} expects an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} expects a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} expects a string, got {value!r} ({type(value).__name__})")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _apply(obj: Any, data: dict[str, Any], prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            valid = [prefix + n for n in sorted(names)]
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys here: {', '.join(valid)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, k), v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, tp))


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=0.001", "data.root=/x"]`` into a nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override must look like section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key must look like section.key, got {key!r}")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Build a :class:`TrainConfig` from defaults, then the YAML file at ``path``, then overrides.

    Raises:
        ConfigError: unknown key (listing the valid ones), wrong type, out-of-range value.
        FileNotFoundError: ``path`` does not exist.
    """
    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        _apply(cfg, data, "")
    if overrides:
        _apply(cfg, parse_overrides(overrides), "")
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a :class:`TrainConfig` from :meth:`TrainConfig.to_dict` output (e.g. a checkpoint)."""
    cfg = TrainConfig()
    _apply(cfg, data, "")
    cfg.validate()
    return cfg


VALID_KEYS = _valid_keys(TrainConfig)


def apply_auto_crops(cfg: TrainConfig, median_side: Optional[int]) -> tuple[TrainConfig, Optional[str]]:
    """The config with the small-image rule applied, and a log line saying what changed (``None``
    when nothing did); the small-image rule of :mod:`dino_fast.data.sizing`.

    Args:
        cfg: a :class:`TrainConfig` with ``data.auto_crops`` true (otherwise it
            is returned unchanged).
        median_side: :func:`~dino_fast.data.sizing.median_image_side` of the training folder, or ``None`` (unknown:
            nothing changes).

    When ``median_side < data.global_crops_size`` and the global crop is above
    :data:`~dino_fast.data.sizing.SMALL_GLOBAL_CROP`: the global crop becomes 48 px, the local crop is scaled by the
    same factor (rounded, at least one patch), ``train.iterations`` (if set) is multiplied by
    :data:`~dino_fast.data.sizing.SMALL_ITERATION_SCALE`, and ``eval.image_size`` / ``eval.resize_size`` come from
    :func:`~dino_fast.data.sizing.eval_size_for_crops`. Everything else stays as configured.
    """
    d = cfg.data
    if not d.auto_crops or median_side is None or median_side >= d.global_crops_size \
            or d.global_crops_size <= SMALL_GLOBAL_CROP:
        return cfg, None
    patch = cfg.model.patch_size
    factor = SMALL_GLOBAL_CROP / d.global_crops_size
    local = max(patch, int(round(d.local_crops_size * factor)))
    eval_size, resize = eval_size_for_crops(SMALL_GLOBAL_CROP, tuple(d.global_crops_scale), patch)
    iterations = int(round(cfg.train.iterations * SMALL_ITERATION_SCALE)) if cfg.train.iterations > 0 else 0
    new = dataclasses.replace(
        cfg,
        data=dataclasses.replace(d, global_crops_size=SMALL_GLOBAL_CROP, local_crops_size=local),
        eval=dataclasses.replace(cfg.eval, image_size=eval_size, resize_size=resize),
        train=dataclasses.replace(cfg.train, iterations=iterations),
    )
    msg = (f"data.auto_crops: the training images' median shorter side is {median_side} px, below the "
           f"{d.global_crops_size} px global crop: crops {d.global_crops_size}/{d.local_crops_size} -> "
           f"{SMALL_GLOBAL_CROP}/{local} px, train.iterations {cfg.train.iterations} -> {iterations}, "
           f"eval {cfg.eval.image_size}/{cfg.eval.resize_size} -> {eval_size}/{resize} px "
           f"(data.auto_crops=false keeps the configured sizes)")
    return new, msg

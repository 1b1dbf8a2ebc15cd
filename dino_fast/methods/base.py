"""What a self-supervised method is to the trainer: :class:`Method`, :class:`LossTerm`, :class:`StepOutput`.

A method owns its student and teacher networks, its losses and its own state (loss centers,
queues, memories: registered buffers, so they are checkpointed with the method), and computes
one step's named, weighted loss terms from a batch of augmented crops. The trainer
(:mod:`dino_fast.train`) knows none of this: it wraps ``method.student`` for data parallelism,
optimises ``method.student``'s parameters, updates ``method.teacher`` from it by EMA, and logs
every term. See docs/DESIGN.md, "Adding a method".
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Optional, Sequence

import torch
from torch import Tensor, nn

from dino_fast.config import TrainConfig
from dino_fast.models.registry import create_backbone

__all__ = ["LossTerm", "StepOutput", "BatchInfo", "Method", "build_backbone", "head_collapse_inputs"]

_WRAPPER_PREFIX = "_student_forward."


@dataclass
class LossTerm:
    """One named term of a method's loss.

    Attributes:
        value: 0-dim float tensor (differentiable w.r.t. the student), unweighted.
        weight: its weight in the total; the trainer minimises ``sum(weight * value)``.
    """

    value: Tensor
    weight: float = 1.0


@dataclass
class StepOutput:
    """What :meth:`Method.forward_step` returns.

    Attributes:
        terms: name -> :class:`LossTerm` (insertion order is the logging order).
        outputs: name -> ``(tensor, rows_per_crop)``: the network outputs the trainer checks for
            NaN/inf when ``train.check_finite`` is on (the message names crop and row).
    """

    terms: dict[str, LossTerm]
    outputs: dict[str, tuple[Tensor, int]] = field(default_factory=dict)

    def total(self) -> Tensor:
        """``sum(weight * value)`` over the terms (a weight of exactly 1 multiplies nothing)."""
        total: Optional[Tensor] = None
        for term in self.terms.values():
            v = term.value if term.weight == 1.0 else term.weight * term.value
            total = v if total is None else total + v
        if total is None:
            raise ValueError("a method step returned no loss terms")
        return total


@dataclass(frozen=True)
class BatchInfo:
    """Where the current batch comes from, for methods that draw per-sample randomness in the
    data pipeline's way (DINOv2's masks): a pure function of these keeps 2 ranks = 1 process and
    exact resume.

    Attributes:
        seed: ``train.seed``. epoch: the 0-based epoch. batch: the batch index within the epoch.
        sample_ids: int ``[B]`` dataset indices of this rank's samples (None when unknown).
        rank, world_size: this rank and the number of ranks.
    """

    seed: int
    epoch: int
    batch: int
    sample_ids: Optional[Any]
    rank: int = 0
    world_size: int = 1


class Method(nn.Module):
    """Base class of the self-supervised methods (registered in :mod:`dino_fast.methods`).

    Subclasses set :attr:`name`, build ``self.student`` and ``self.teacher`` (``nn.Module`` s;
    the teacher starts as a copy of the student's EMA-covered part and never gets gradients)
    and their losses in ``__init__(cfg)``, and implement :meth:`forward_step`.

    Contract with the trainer:

    - ``student`` holds every trainable parameter; the trainer may wrap it (DDP) and calls
      :meth:`set_student_forward` with the wrapper: call :attr:`student_forward`, not
      ``student``, in :meth:`forward_step`, so that gradients are all-reduced.
    - :meth:`ema_modules` names what the teacher EMA covers: ``(teacher_part, student_part)``,
      two modules with the same parameter names, shapes and order.
    - the method's own state (centers, queues) are buffers of the method (or of its loss
      submodules) so :meth:`method_state_dict` saves them; ``student.*`` and ``teacher.*`` are
      saved by the trainer under the checkpoint's ``student`` / ``teacher`` keys (official layout).
    - run the networks inside ``with self.autocast():`` (the trainer's mixed-precision context,
      set by :meth:`set_autocast`) and the losses outside it: the fused loss ops take the
      networks' fp32/bf16 outputs as they come and accumulate in fp32 themselves.
    - :meth:`after_step` runs after the optimiser step and the EMA (queue updates etc.).
    - under ``train.sharding=fsdp`` the trainer shards ``student`` and ``teacher`` in place
      (:mod:`dino_fast.train.fsdp`: each ``backbone.blocks[i]``, each other child with parameters,
      the root): call both through their root ``forward`` (``student_forward(...)``,
      ``teacher(...)``), never a submodule's method directly, so that FSDP gathers the weights.
      A method that cannot sets :attr:`fsdp_unsupported` to the reason.
    - :meth:`legacy_method_state` maps a checkpoint written before methods existed (optional).
    """

    name: ClassVar[str] = ""
    # why this method cannot train with ``train.sharding=fsdp`` ("" = it can); the trainer raises a
    # ValueError naming the method and this reason when it is set
    fsdp_unsupported: ClassVar[str] = ""
    student: nn.Module
    teacher: nn.Module

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._student_forward: Optional[nn.Module] = None
        self._autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext
        self.batch_info: Optional[BatchInfo] = None

    # ---------------------------------------------------------------- trainer hooks
    @property
    def student_forward(self) -> nn.Module:
        """The module to call for the student's forward (the DDP wrapper when there is one)."""
        return self._student_forward if self._student_forward is not None else self.student

    def set_student_forward(self, module: nn.Module) -> None:
        """Use ``module`` (a wrapper of ``self.student``, e.g. DDP) for the student's forward.

        Kept as a plain attribute, not a registered submodule: the wrapper holds the student's
        own parameters, which must not appear a second time in :meth:`method_state_dict` (they
        did in checkpoints of DDP runs, ``_student_forward.module.*``; :meth:`load_method_state_dict`
        ignores those keys)."""
        object.__setattr__(self, "_student_forward", module)

    def set_autocast(self, factory: Callable[[], ContextManager[Any]]) -> None:
        """Use ``factory()`` as the mixed-precision context of the networks' forward passes."""
        self._autocast = factory

    def set_batch_info(self, info: Optional[BatchInfo]) -> None:
        """The trainer announces the next batch's :class:`BatchInfo` before :meth:`forward_step`
        (None: unknown; a method must then fall back to something deterministic)."""
        self.batch_info = info

    def autocast(self) -> ContextManager[Any]:
        """A fresh mixed-precision context for the networks (a no-op unless the trainer set one)."""
        return self._autocast()

    @classmethod
    def extra_global_crops(cls, cfg: TrainConfig) -> int:
        """Global crops the loader adds after the ``data.global_crops_number`` teacher crops, for a
        student that must not see the teacher's crops (Mugs: 2); default 0. ``forward_step`` then
        gets ``data.global_crops_number + extra`` global crops first; they alternate between the
        two global augmentation recipes like the teacher's (:class:`dino_fast.data.MultiCropAugment`)."""
        return 0

    @classmethod
    def strong_augmentation(cls, cfg: TrainConfig) -> tuple[float, int]:
        """``(p, first crop)`` of the strong student recipe of :class:`dino_fast.data.MultiCropAugment`
        (``strong_p``, ``strong_from_crop``); default ``(0.0, 0)``: none. With ``p > 0`` the trainer
        calls :meth:`set_weak_flags` with the batch's flags before each :meth:`forward_step`."""
        return 0.0, 0

    def set_weak_flags(self, weak: Optional[Tensor]) -> None:
        """Which images' strong-eligible global crops were weakly augmented this step (bool [B] on
        the device), or None; default: ignored."""

    def ema_modules(self) -> tuple[nn.Module, nn.Module]:
        """``(teacher side, student side)`` of the teacher EMA; default ``(teacher, student)``."""
        return self.teacher, self.student

    def forward_step(self, crops: Sequence[Tensor], epoch: int, it: int) -> StepOutput:  # pragma: no cover
        """One step's loss terms from the augmented crops.

        Args:
            crops: float ``[B, 3, H, W]`` tensors, the global crops first (as
                :class:`dino_fast.data.MultiCropAugment` returns them), on the training device,
                inside the trainer's autocast context.
            epoch, it: 0-based epoch and global iteration (for schedules).
        """
        raise NotImplementedError

    def collapse_inputs(self, out: StepOutput, epoch: int) -> Optional[dict[str, Any]]:
        """Keyword arguments of :func:`dino_fast.eval.collapse.collapse_stats` for this step's
        outputs (``teacher_logits``, ``student_logits``, ``center``, ``teacher_temp``,
        ``student_temp``, optional ``features``), or None when the method has no such head
        (the default). The trainer calls it at the end of each epoch."""
        return None

    def scalars(self, epoch: int, it: int) -> dict[str, float]:
        """Method-specific values to log with the step (schedules, temperatures); default none."""
        return {}

    def after_step(self, it: int) -> None:
        """Called after the optimiser step and the teacher EMA of iteration ``it``; default none."""

    def method_state_dict(self) -> dict[str, Any]:
        """The method's own state (everything but ``student.*`` / ``teacher.*``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("student.", "teacher."))}

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`method_state_dict` returned (strict: missing or extra keys raise)."""
        own = self.method_state_dict()
        # a DDP run's checkpoints before the wrapper stopped being a submodule hold the student
        # a second time under _student_forward.*: not method state
        state = {k: v for k, v in state.items() if not k.startswith(_WRAPPER_PREFIX)}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"method {self.name!r} state: missing keys {missing}, unexpected keys {unexpected}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    @classmethod
    def legacy_method_state(cls, checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The method state held by a checkpoint without a ``method`` entry (an older format),
        or None when there is none to recover."""
        return None

    def extra_repr(self) -> str:  # noqa: D102
        return f"name={self.name!r}"


def head_collapse_inputs(out: StepOutput, loss: nn.Module, epoch: int, *, teacher_key: str = "teacher_output",
                         student_key: str = "student_output", features: Optional[Tensor] = None) -> dict[str, Any]:
    """:meth:`Method.collapse_inputs` of a DINO-style head: the teacher and student logits
    ``out.outputs[teacher_key][0]`` / ``[student_key][0]`` (``[rows, K]``, detached), the
    :class:`~dino_fast.losses.dino.DINOLoss`-like ``loss``'s center (``[1, K]``), its teacher
    temperature at ``epoch`` and its student temperature, and the teacher's backbone features
    ``[rows, D]`` when given (the feature-collapse checks)."""
    inputs = {"teacher_logits": out.outputs[teacher_key][0].detach(),
              "student_logits": out.outputs[student_key][0].detach(),
              "center": loss.center, "teacher_temp": loss.teacher_temp_at(epoch),
              "student_temp": loss.student_temp}
    if features is not None:
        inputs["features"] = features.detach()
    return inputs


def build_backbone(cfg: TrainConfig, *, teacher: bool, **extra: Any) -> nn.Module:
    """The ``cfg.model.arch`` backbone of the student (with drop path) or of the teacher (without).

    ``extra`` keywords go to the backbone constructor (e.g. ``mask_token=True``).
    """
    kwargs: dict[str, Any] = dict(
        patch_size=cfg.model.patch_size,
        img_size=cfg.data.global_crops_size,
        drop_path_rate=0.0 if teacher else cfg.model.drop_path_rate,
        attn_backend=cfg.model.attn_backend,
    )
    if cfg.model.depth is not None:
        kwargs["depth"] = cfg.model.depth
    if cfg.model.layerscale_init > 0:
        kwargs["layerscale_init"] = cfg.model.layerscale_init
    if cfg.model.grayscale_input:
        kwargs["grayscale_input"] = True
    kwargs.update(extra)
    return create_backbone(cfg.model.arch, **kwargs)

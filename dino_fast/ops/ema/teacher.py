"""Teacher EMA: ``theta_t <- m * theta_t + (1 - m) * theta_s`` in one pass over one flat buffer.

Design
------
:class:`TeacherEMA` makes every teacher parameter a view into one contiguous fp32 buffer, and
every student parameter a view into a second buffer with the same element order. The EMA is
then one elementwise operation over ``n`` elements whatever the number of parameter tensors:

- CUDA (``backend="triton"``): one launch of ``dino_fast.ops.ema.kernels`` (12 bytes per parameter:
  read teacher, read student, write teacher);
- CPU (``backend="torch"``): one ``lerp_`` over the flat buffer (same 12 bytes per parameter);
- ``backend="reference"``: the official per-parameter loop (tests and benchmarks).

Why the student is flat too (and not read through a table of pointers): a Triton kernel can
only read many separate tensors in one launch through a table of raw addresses, which the
Triton interpreter (how this project proves its kernels without a GPU) cannot run, and which
needs a host-to-device copy of the table or a cache of it that goes stale exactly when it must
not (after ``.to()`` or ``load_state_dict(assign=True)``). Making the student's parameters views
into one buffer is invisible to the rest of training:

- ``torch.optim.AdamW`` (foreach or fused) updates each parameter in place, which writes
  through the view into the flat buffer; its state tensors are separate;
- ``DistributedDataParallel`` holds the same ``Parameter`` objects; replacing ``.data`` with a
  tensor of the same dtype and device keeps each parameter's gradient accumulator, so DDP's
  gradient hooks and buckets keep working (tested with gloo at world size 1 and 2);
- ``state_dict()`` returns views (a checkpoint holds the buffer once), ``load_state_dict()``
  copies in place into the views.

Re-binding: ``update()`` checks cheaply (object identity and data pointers of every parameter,
no device sync) that each parameter is still the view it was bound to. When a module's
parameters were replaced (``.to(device)``, ``load_state_dict(..., assign=True)``, assigning a new
``nn.Parameter``), that side is re-packed into a new flat buffer, copying the current values,
before the update: the teacher is never silently detached from the buffer the update writes.
Architectures are re-validated at every re-bind. (``share_memory_()`` moves the one shared
storage and keeps the views: offsets are checked relative to the buffer, so nothing is re-packed.)

Sharded path (FSDP2, ``fully_shard``): FSDP owns its parameters' storage (each parameter is a
``DTensor`` whose local shard is a view into FSDP's padded shard buffer), so nothing can be
re-packed. When the teacher's or the student's parameters are ``DTensor`` s, :class:`TeacherEMA`
binds the two parameter lists instead, after checking every pair as the flat path does
(count, names, global shapes, dtypes, devices) and that both sides are sharded alike (the same
device mesh and placements, the same local shard shapes: teacher and student sharded the same
way, see :mod:`dino_fast.train.fsdp`), and ``update`` is one multi-tensor
``torch._foreach_lerp_`` over the local shards (``p.to_local()``: the same
``lerp`` as the flat path, elementwise, so the result is bitwise the flat path's on each slice;
``backend="reference"``: the per-parameter loop on the shards). Before each update every
``FSDPModule`` of both sides is resharded (a no-op when it already is), so the update writes the
sharded fp32 parameters, never a gathered copy. With ``check_finite`` the non-finite flag of the
local student shards is all-reduced (max) over the mesh, so every rank raises
:class:`NonFiniteEMAError` at the same update (the rank holding the value names tensor, local
index and rank; the others say that another rank holds it) and no rank is left in a collective.
``backend="triton"`` is refused there (the kernel needs one flat buffer); ``teacher_buffer`` /
``student_buffer`` do not exist (``RuntimeError``).

Caveats (documented, not hidden): create :class:`TeacherEMA` before ``torch.compile`` or CUDA
graph capture of the student (both may have recorded the old addresses); FSDP is supported
through the sharded path above (not the flat one); packed parameters are contiguous row-major views (a
``channels_last`` convolution weight becomes row-major); ``torch.save`` of a *single* parameter
saves the whole flat storage (a full ``state_dict`` saves it once, as before).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from dino_fast.ops.backend import check_backend, resolve_backend

__all__ = ["TeacherEMA", "ema_update_", "NonFiniteEMAError"]


class NonFiniteEMAError(ValueError):
    """A student (or teacher) tensor holds NaN/inf at an EMA update (``check_finite=True`` only)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    from dino_fast.utils.finite import all_finite

    return all_finite(*tensors)


def _check_momentum(momentum: object) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a Python float in [0, 1], got {type(momentum).__name__}")
    m = float(momentum)
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise ValueError(f"momentum must be a finite number in [0, 1], got {momentum!r}")
    return m


def unwrap_module(module: nn.Module) -> nn.Module:
    """Return the module inside DDP / DataParallel / ``torch.compile`` wrappers (any nesting)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(module, (DistributedDataParallel, DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _named_state(module: nn.Module, include_buffers: bool) -> list[tuple[str, torch.Tensor]]:
    """Parameters (deduplicated, registration order), then floating-point buffers if asked."""
    items: list[tuple[str, torch.Tensor]] = list(module.named_parameters())
    if include_buffers:
        items += [(name, b) for name, b in module.named_buffers() if b is not None and b.is_floating_point()]
    return items


def _tensors(module: nn.Module, include_buffers: bool) -> list[torch.Tensor]:
    """Same tensors and order as :func:`_named_state`, without building names (the per-update check)."""
    items = list(module.parameters())
    if include_buffers:
        items += [b for b in module.buffers() if b is not None and b.is_floating_point()]
    return items


def _name_hint(teacher: Sequence[tuple[str, torch.Tensor]], student: Sequence[tuple[str, torch.Tensor]],
               upto: int) -> str:
    """Where the two name lists first differ (at or before tensor #upto), as a message suffix."""
    for i, ((tn, _), (sn, _)) in enumerate(zip(teacher[:upto + 1], student[:upto + 1])):
        if tn != sn:
            return f"; the parameter names first differ at tensor #{i}: teacher {tn!r} vs student {sn!r}"
    return ""


def _validate_pairs(
    teacher: Sequence[tuple[str, torch.Tensor]],
    student: Sequence[tuple[str, torch.Tensor]],
    *,
    require_fp32_teacher: bool,
) -> None:
    """Raise ValueError naming the first offending tensor when the two lists do not match.

    Tensors are paired by position (as the official ``zip(student.parameters(),
    teacher.parameters())``); names need not agree, but where they do not, the message says where
    they first diverge (the likely cause of a shape mismatch further on).
    """
    for i, ((tn, t), (sn, s)) in enumerate(zip(teacher, student)):
        where = f"teacher {tn!r} / student {sn!r} (tensor #{i})"
        for side, x in (("teacher", t), ("student", s)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{where}: {side} entry must be a torch.Tensor, got {type(x).__name__}")
            if x.layout != torch.strided:
                raise ValueError(f"{where}: {side} tensor must be dense (strided), got layout {x.layout}")
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch at {where}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
                             + _name_hint(teacher, student, i))
        if not t.is_floating_point():
            raise ValueError(f"{where}: tensors must be floating point, got {t.dtype}")
        if require_fp32_teacher and t.dtype != torch.float32:
            raise ValueError(f"{where}: the teacher must stay float32 (with momentum near 1 the update falls under "
                             f"bf16/fp16 resolution), got {t.dtype}")
        if t.dtype != s.dtype:
            raise ValueError(f"dtype mismatch at {where}: teacher {t.dtype} vs student {s.dtype}"
                             + _name_hint(teacher, student, i))
        if t.device != s.device:
            raise ValueError(f"device mismatch at {where}: teacher {t.device} vs student {s.device}")
        if t is s or (t.numel() > 0 and t.data_ptr() == s.data_ptr()):
            raise ValueError(f"{where}: teacher and student share the same memory; the teacher must be a copy")
    if len(teacher) != len(student):
        k = min(len(teacher), len(student))
        extra = teacher[k][0] if len(teacher) > k else student[k][0]
        side = "teacher" if len(teacher) > k else "student"
        raise ValueError(f"parameter count mismatch: teacher has {len(teacher)} tensors, student has {len(student)}; "
                         f"first unmatched: {side} {extra!r} (tensor #{k})" + _name_hint(teacher, student, k))


def _packed_flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view covering ``tensors`` if they are contiguous, adjacent, in order, in one storage."""
    if not tensors:
        return None
    first = tensors[0]
    ptr = first.untyped_storage().data_ptr()
    expect = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.storage_offset() != expect or t.untyped_storage().data_ptr() != ptr:
            return None
        expect += t.numel()
    total = expect - first.storage_offset()
    return first.detach().as_strided((total,), (1,), first.storage_offset())


def _flat_update_(t_flat: torch.Tensor, s_flat: torch.Tensor, m: float, backend: str) -> None:
    if backend == "triton":
        from dino_fast.ops.ema.kernels import ema_flat_

        ema_flat_(t_flat, s_flat, m)
    else:
        t_flat.lerp_(s_flat, 1.0 - m)


def _reference_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], m: float) -> None:
    from dino_fast.reference.ema import reference_ema_update_

    reference_ema_update_(teacher, student, m)


# --------------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------------

def ema_update_(
    teacher_params: Iterable[torch.Tensor],
    student_params: Iterable[torch.Tensor],
    momentum: float,
    *,
    backend: str = "auto",
) -> None:
    """In place ``t <- momentum * t + (1 - momentum) * s`` for every pair of tensors.

    Args:
        teacher_params: floating-point tensors (any shapes), updated in place.
        student_params: tensors of the same shapes, dtypes and device, in the same order.
        momentum: Python float in [0, 1] (1 keeps the teacher, 0 copies the student).
        backend: ``"auto"``, ``"triton"``, ``"torch"``/``"cpu"`` or ``"reference"``.
            ``"torch"`` runs one ``torch._foreach_lerp_`` over all tensors (or one ``lerp_`` when
            both lists are already packed into one buffer each). ``"triton"`` needs both lists
            packed as adjacent contiguous views into one buffer each (as :class:`TeacherEMA`
            does) and float32; it is then one kernel launch. ``"auto"`` uses Triton on CUDA when
            the lists are packed and fp32, and the torch path otherwise.

    Raises:
        TypeError / ValueError: on mismatched lists (naming the first offending tensor), a bad
            momentum, or ``backend="triton"`` on tensors that are not packed.
    """
    t_list = list(teacher_params)
    s_list = list(student_params)
    m = _check_momentum(momentum)
    requested = check_backend(backend)
    _validate_pairs([(f"[{i}]", t) for i, t in enumerate(t_list)], [(f"[{i}]", s) for i, s in enumerate(s_list)],
                    require_fp32_teacher=False)
    if not t_list:
        return
    backend = resolve_backend(requested, t_list[0].device)
    with torch.no_grad():
        if backend == "reference":
            _reference_update_(t_list, s_list, m)
            return
        t_flat, s_flat = _packed_flat(t_list), _packed_flat(s_list)
        packed = t_flat is not None and s_flat is not None
        if backend == "triton":
            fp32 = t_list[0].dtype == torch.float32
            if packed and fp32:
                _flat_update_(t_flat, s_flat, m, "triton")
                return
            if requested == "triton":
                raise ValueError(
                    "backend='triton' needs float32 tensors packed as adjacent contiguous views into one buffer per "
                    f"list (as TeacherEMA packs them); got packed={packed}, dtype={t_list[0].dtype}. "
                    "Use TeacherEMA, or backend='torch'")
            backend = "torch"
        if packed:
            t_flat.lerp_(s_flat, 1.0 - m)
        else:
            torch._foreach_lerp_([t.detach() for t in t_list], [s.detach() for s in s_list], 1.0 - m)


# --------------------------------------------------------------------------------------------
# module API
# --------------------------------------------------------------------------------------------

# Bumped whenever any module registers (or replaces, through setattr) a parameter, buffer or
# submodule anywhere in the process: TeacherEMA re-walks its modules only when it changed, and
# otherwise checks just that its bound tensors are still the same views (a few microseconds per
# tensor instead of a named_parameters() walk of both models on every update: ~0.3 ms for
# ViT-S/16 on a CPU host, more than the whole GPU update).
_REGISTRATIONS = [0]


@torch.compiler.disable
def _count_registration(*_: object) -> None:
    # Never traced by torch.compile (a graph break runs it eagerly): traced, dynamo would guard on
    # the counter's value, and a compiled module that re-registers a buffer on every call (the
    # official DINOLoss's `self.center = ...`) would recompile on every call, up to the limit.
    _REGISTRATIONS[0] += 1


for _register in (nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook,
                  nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


@dataclass
class _Side:
    """One module's tensors packed into ``flat``; ``rel`` are their byte offsets from its start."""

    module: nn.Module
    names: list[str]
    tensors: list[torch.Tensor]
    flat: torch.Tensor
    rel: list[int]


def _pack(module: nn.Module, items: list[tuple[str, torch.Tensor]]) -> _Side:
    """Make every tensor of ``items`` a view into one new contiguous buffer (values preserved)."""
    tensors = [t for _, t in items]
    names = [n for n, _ in items]
    flat = _packed_flat(tensors)
    if flat is None:
        dtype, device = tensors[0].dtype, tensors[0].device
        total = sum(t.numel() for t in tensors)
        flat = torch.empty(total, dtype=dtype, device=device)
        offset = 0
        views = []
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                v = flat[offset:offset + n].view(t.shape)
                v.copy_(t.detach())
                views.append(v)
                offset += n
        for t, v in zip(tensors, views):
            # Same dtype and device: set_data keeps the tensor object, its autograd leaf state
            # and gradient accumulator (DDP hooks, optimizer references stay valid).
            t.data = v
    base = flat.data_ptr()
    rel = [t.data_ptr() - base for t in tensors]
    return _Side(module=module, names=names, tensors=tensors, flat=flat, rel=rel)


def _single_device_dtype(side: str, items: list[tuple[str, torch.Tensor]]) -> None:
    dev, dt = items[0][1].device, items[0][1].dtype
    for name, t in items:
        if t.device != dev:
            raise ValueError(f"{side} tensors must all be on one device: {items[0][0]!r} is on {dev}, "
                             f"{name!r} is on {t.device}")
        if t.dtype != dt:
            raise ValueError(f"{side} tensors must all have one dtype: {items[0][0]!r} is {dt}, {name!r} is {t.dtype}")


# --------------------------------------------------------------------------------------------
# the sharded (FSDP) path
# --------------------------------------------------------------------------------------------

def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _has_dtensor(module: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in module.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place updates write the parameter), else ``t``."""
    return (t.to_local() if _is_dtensor(t) else t).detach()


def _same_objects(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _reshard(module: nn.Module) -> None:
    """Reshard every FSDPModule in ``module`` (registered parameters back to the sharded DTensors)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@dataclass
class _Sharded:
    """The bound parameter lists of the sharded path (DTensors, or plain tensors where a side
    holds some unsharded ones: then both sides must agree tensor by tensor)."""

    names: list[str]
    teacher: list[torch.Tensor]
    student: list[torch.Tensor]
    group: object  # the mesh's process group (None: no all-reduce, e.g. no DTensor at all)
    device: torch.device


def _bind_sharded(teacher: nn.Module, student: nn.Module, include_buffers: bool) -> _Sharded:
    """Validate the two modules' tensors for the sharded path and bind them (module doc)."""
    _reshard(teacher)
    _reshard(student)
    t_items = _named_state(teacher, include_buffers)
    s_items = _named_state(student, include_buffers)
    if not t_items and not s_items:
        raise ValueError("teacher and student have no parameters to average")
    group = None
    for i, ((tn, t), (sn, s)) in enumerate(zip(t_items, s_items)):
        where = f"teacher {tn!r} / student {sn!r} (tensor #{i})"
        if _is_dtensor(t) != _is_dtensor(s):
            raise ValueError(f"{where}: one side is sharded (DTensor) and the other is not; shard the teacher "
                             f"exactly as the student (dino_fast.train.fsdp.shard_module on the same mesh)")
        if _is_dtensor(t):
            if t.device_mesh != s.device_mesh or tuple(t.placements) != tuple(s.placements):
                raise ValueError(f"{where}: sharded differently: teacher mesh {t.device_mesh} placements "
                                 f"{tuple(t.placements)} vs student mesh {s.device_mesh} placements {tuple(s.placements)}")
            if t.shape != s.shape:
                raise ValueError(f"shape mismatch at {where}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
                                 + _name_hint(t_items, s_items, i))
            if t.to_local().shape != s.to_local().shape:
                raise ValueError(f"{where}: local shards differ: teacher {tuple(t.to_local().shape)} vs student "
                                 f"{tuple(s.to_local().shape)}")
            if group is None and t.device_mesh.ndim == 1:
                group = t.device_mesh.get_group()
    # the flat path's checks (count, names, dtype, device, fp32 teacher, no shared memory) on the
    # local shards, which have equal shapes exactly when the global shapes and shardings agree
    _validate_pairs([(n, _local(t)) for n, t in t_items], [(n, _local(s)) for n, s in s_items],
                    require_fp32_teacher=True)
    return _Sharded(names=[n for n, _ in s_items], teacher=[t for _, t in t_items],
                    student=[s for _, s in s_items], group=group, device=_local(t_items[0][1]).device)


class TeacherEMA:
    """Exponential moving average of a student's parameters into a teacher, one pass per update.

    Args:
        teacher: the teacher module (float32 parameters; same architecture as the student).
        student: the student module, or a ``DistributedDataParallel`` / ``DataParallel`` /
            ``torch.compile`` wrapper around it (unwrapped automatically).
        backend: ``"auto"`` (Triton on CUDA, one ``lerp_`` on CPU), ``"triton"``,
            ``"torch"``/``"cpu"``, ``"reference"`` (official per-parameter loop).
        include_buffers: also average floating-point buffers (e.g. BatchNorm running stats);
            the official DINO averages parameters only (the default).
        check_finite: before every update, check the student's flat buffer with one
            min/max reduction (:func:`dino_fast.utils.finite.all_finite`: one read of the student, one
            host sync) and raise
            :class:`NonFiniteEMAError` naming the first offending tensor and element instead of
            averaging NaN/inf into the teacher. Off by default (the drop-in behaviour).

    With ``DTensor`` parameters (FSDP2) the sharded path of the module doc runs instead
    (:attr:`sharded` is True; no flat buffers; same momentum checks and ``check_finite``
    contract, the flag agreed by every rank). Otherwise, after construction every teacher
    tensor is a view into :attr:`teacher_buffer`
    (float32, shape ``(numel,)``) and every student tensor a view into
    :attr:`student_buffer`, in ``named_parameters()`` order (then floating buffers).
    :attr:`rebind_count` counts the updates that found replaced tensors and re-packed them (0 in a
    normal run, checkpoint resume through ``load_state_dict`` included; 1 after ``.to(device)``).

    Raises:
        ValueError: when the architectures differ (count, shape, dtype, device), naming the first
            offending tensor; when the teacher is not float32; when a module's tensors span
            several devices or dtypes; when teacher and student share memory.
        TypeError: when ``teacher`` / ``student`` are not ``nn.Module``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        backend: str = "auto",
        include_buffers: bool = False,
        check_finite: bool = False,
    ) -> None:
        for name, mod in (("teacher", teacher), ("student", student)):
            if not isinstance(mod, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(mod).__name__}")
        if not isinstance(include_buffers, bool):
            raise TypeError(f"include_buffers must be a bool, got {type(include_buffers).__name__}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
        self.backend = check_backend(backend)
        self.include_buffers = include_buffers
        self.check_finite = check_finite
        self.teacher = unwrap_module(teacher)
        self.student = unwrap_module(student)
        if self.teacher is self.student:
            raise ValueError("teacher and student are the same module; the teacher must be a separate copy")
        self.rebind_count = 0
        self._t: _Side
        self._s: _Side
        self._sharded: _Sharded | None = None
        if _has_dtensor(self.teacher) or _has_dtensor(self.student):
            if self.backend == "triton":
                raise ValueError("backend='triton' needs one flat buffer per side, which FSDP (sharded DTensor "
                                 "parameters) does not allow; use backend='auto' or 'torch' (one "
                                 "torch._foreach_lerp_ over the local shards)")
            self._sharded = _bind_sharded(self.teacher, self.student, include_buffers)
            return
        self._bind(force=True)
        self._checked_at = _REGISTRATIONS[0]
        self.rebind_count = 0
        resolve_backend(self.backend, self._t.flat.device)  # fail now, not at the first update

    # -- binding -------------------------------------------------------------------------------

    def _bind(self, force: bool = False) -> None:
        t_items = _named_state(self.teacher, self.include_buffers)
        s_items = _named_state(self.student, self.include_buffers)
        if not t_items and not s_items:
            raise ValueError("teacher and student have no parameters to average")
        _validate_pairs(t_items, s_items, require_fp32_teacher=True)
        _single_device_dtype("teacher", t_items)
        _single_device_dtype("student", s_items)
        if force or not self._side_ok(self._t, [t for _, t in t_items]):
            self._t = _pack(self.teacher, t_items)
        if force or not self._side_ok(self._s, [t for _, t in s_items]):
            self._s = _pack(self.student, s_items)
        t_flat, s_flat = self._t.flat, self._s.flat
        if t_flat.untyped_storage().data_ptr() == s_flat.untyped_storage().data_ptr():
            t0, s0 = t_flat.storage_offset(), s_flat.storage_offset()
            if t0 < s0 + s_flat.numel() and s0 < t0 + t_flat.numel():
                raise ValueError("teacher and student tensors overlap in memory; the teacher must be a separate copy")
        self.rebind_count += 1

    @staticmethod
    def _side_ok(side: _Side, tensors: list[torch.Tensor]) -> bool:
        """True when ``tensors`` are the bound objects and still the views at their offsets."""
        if len(tensors) != len(side.tensors):
            return False
        if any(a is not b for a, b in zip(tensors, side.tensors)):
            return False
        return TeacherEMA._views_ok(side)

    @staticmethod
    def _views_ok(side: _Side) -> bool:
        """True when the bound tensors are still views at their offsets of the flat buffer
        (``param.data = ...`` and ``module.to(...)`` keep the objects but change their storage)."""
        base = side.flat.data_ptr()
        return [t.data_ptr() - base for t in side.tensors] == side.rel

    def _ensure_bound(self) -> None:
        """Re-pack a side whose tensors are no longer the views they were bound to.

        Walks both modules only when some module registered or replaced a parameter, buffer or
        submodule since the last check (a process-wide counter kept by registration hooks);
        otherwise checks the bound tensors' addresses only. A tensor put straight into a module's
        ``_parameters`` dict, bypassing ``setattr`` / ``register_parameter``, is not seen.
        """
        gen = _REGISTRATIONS[0]
        if gen == self._checked_at:
            if self._views_ok(self._t) and self._views_ok(self._s):
                return
        elif (self._side_ok(self._t, _tensors(self.teacher, self.include_buffers))
                and self._side_ok(self._s, _tensors(self.student, self.include_buffers))):
            self._checked_at = gen
            return
        self._bind()
        self._checked_at = _REGISTRATIONS[0]

    # -- public --------------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """True on the sharded (FSDP, DTensor) path, False on the flat-buffer path."""
        return self._sharded is not None

    def _flat_only(self, what: str) -> None:
        if self._sharded is not None:
            raise RuntimeError(f"{what} does not exist on the sharded (FSDP) path: FSDP owns the parameters' storage")

    @property
    def teacher_buffer(self) -> torch.Tensor:
        """The teacher's flat float32 buffer, shape ``(numel,)`` (every teacher tensor is a view).
        Raises ``RuntimeError`` on the sharded path."""
        self._flat_only("teacher_buffer")
        return self._t.flat

    @property
    def student_buffer(self) -> torch.Tensor:
        """The student's flat buffer, shape ``(numel,)``, same dtype and device as the teacher's.
        Raises ``RuntimeError`` on the sharded path."""
        self._flat_only("student_buffer")
        return self._s.flat

    @property
    def numel(self) -> int:
        """Number of averaged elements (on the sharded path: of the full, unsharded tensors)."""
        if self._sharded is not None:
            return sum(t.numel() for t in self._sharded.teacher)
        return self._t.flat.numel()

    @property
    def num_tensors(self) -> int:
        """Number of averaged tensors (parameters, plus floating buffers when included)."""
        if self._sharded is not None:
            return len(self._sharded.teacher)
        return len(self._t.tensors)

    def update(self, momentum: float) -> None:
        """``theta_t <- momentum * theta_t + (1 - momentum) * theta_s`` for every averaged tensor.

        Args:
            momentum: Python float in [0, 1] (``momentum_schedule(...)[iteration]``).

        One Triton launch (CUDA), one ``lerp_`` (CPU) or the per-parameter loop
        (``backend="reference"``). Checks first, without a device sync, that both modules' tensors
        are still views into the flat buffers, and re-packs a side whose tensors were replaced.
        """
        m = _check_momentum(momentum)
        if self._sharded is not None:
            self._update_sharded(m)
            return
        self._ensure_bound()
        if self.check_finite and not bool(_all_finite(self._s.flat)):
            self._raise_non_finite()
        backend = resolve_backend(self.backend, self._t.flat.device)
        with torch.no_grad():
            if backend == "reference":
                _reference_update_(self._t.tensors, self._s.tensors, m)
            else:
                _flat_update_(self._t.flat, self._s.flat, m, backend)

    def _update_sharded(self, m: float) -> None:
        """The sharded path of :meth:`update` (module doc): reshard, re-bind if FSDP replaced a
        parameter object, check (all ranks agree), one ``_foreach_lerp_`` over the local shards."""
        _reshard(self.teacher)
        _reshard(self.student)
        sh = self._sharded
        if (not _same_objects(sh.teacher, _tensors(self.teacher, self.include_buffers))
                or not _same_objects(sh.student, _tensors(self.student, self.include_buffers))):
            sh = self._sharded = _bind_sharded(self.teacher, self.student, self.include_buffers)
            self.rebind_count += 1
        t_local = [_local(t) for t in sh.teacher]
        s_local = [_local(s) for s in sh.student]
        if self.check_finite:
            self._check_finite_sharded(sh, s_local)
        with torch.no_grad():
            if self.backend == "reference":
                _reference_update_(t_local, s_local, m)
            elif t_local:
                torch._foreach_lerp_(t_local, s_local, 1.0 - m)

    def _check_finite_sharded(self, sh: "_Sharded", s_local: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        nonempty = [t for t in s_local if t.numel()]
        ok = _all_finite(*nonempty) if nonempty else torch.ones((), dtype=torch.bool, device=sh.device)
        flag = (~ok).to(torch.float32).reshape(1)
        if sh.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=sh.group)
        if float(flag.item()) == 0.0:
            return
        if not bool(ok):
            rank = dist.get_rank() if dist.is_initialized() else 0
            for name, t in zip(sh.names, s_local):
                bad = ~torch.isfinite(t.detach())
                if bool(bad.any()):
                    idx = tuple(int(i) for i in bad.nonzero()[0])
                    raise NonFiniteEMAError(
                        f"student tensor {name!r} (local shard {tuple(t.shape)} on rank {rank}) holds a non-finite "
                        f"value ({t.detach()[idx].item()}) at local index {idx} ({int(bad.sum())} non-finite "
                        f"element(s) in this shard); the EMA update was not applied, the teacher is unchanged")
        raise NonFiniteEMAError("another rank's student shard holds a non-finite value (see its error); the EMA "
                                "update was not applied, the teacher is unchanged")

    def _raise_non_finite(self) -> None:
        for name, t in zip(self._s.names, self._s.tensors):
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                idx = tuple(int(i) for i in bad.nonzero()[0])
                raise NonFiniteEMAError(
                    f"student tensor {name!r} {tuple(t.shape)} holds a non-finite value "
                    f"({t.detach()[idx].item()}) at index {idx} ({int(bad.sum())} non-finite element(s)); "
                    f"the EMA update was not applied, the teacher is unchanged"
                )
        raise NonFiniteEMAError("the student's flat buffer holds a non-finite value outside its tensors")

    def __repr__(self) -> str:
        if self._sharded is not None:
            return (f"TeacherEMA(sharded, tensors={self.num_tensors}, numel={self.numel}, device={self._sharded.device}, "
                    f"backend={self.backend!r}, include_buffers={self.include_buffers})")
        return (f"TeacherEMA(tensors={self.num_tensors}, numel={self.numel}, dtype={self._t.flat.dtype}, "
                f"device={self._t.flat.device}, backend={self.backend!r}, include_buffers={self.include_buffers})")

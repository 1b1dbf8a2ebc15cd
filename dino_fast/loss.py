"""The DINO loss: a drop-in ``DINOLoss``, a functional ``dino_loss`` and the center update.

Math (DESIGN.md sections 1-2). S: student logits (ncrops*B, K), crop-major; T: teacher logits
(n_teacher*B, K); c: center (1, K); tau_s, tau_t: temperatures.

    q_i  = softmax((T_i - c) / tau_t)                              (no gradient)
    loss = 1/(B*n_terms) * sum_v sum_b ( |Q_v| lse_vb - <Q_vb, S_vb / tau_s> )
    Q_v  = sum_{i != v} q_i,   |Q_v| = n_teacher - [v < n_teacher],   lse = logsumexp(S / tau_s)
    n_terms = n_teacher * ncrops - n_teacher
    dL/dS_v = ( |Q_v| softmax(S_v / tau_s) - Q_v ) / (tau_s * B * n_terms)

which equals the official loop over (teacher i, student v != i) pairs of cross-entropies.

Backends (``backend=``): ``"triton"`` (kernels/dino_loss.py), ``"torch"``/``"cpu"`` (the eager
fast path below), ``"reference"`` (dino_fast/reference/loss.py, op by op), ``"auto"`` (Triton
on CUDA tensors, the eager fast path otherwise; see :func:`dino_fast._backend.resolve_backend`).

The eager fast path (``backend="torch"``) works on chunks of ~2 MiB (a few images, all K
columns, buffers recycled through a :class:`Workspace`): per chunk it soft-maxes the teacher
rows of its images once, then for every crop computes y = S_v/tau_s, its row max, <Q_v, y>, the
softmax (one fused aten kernel, one exp per element) written straight into the gradient's rows,
lse = max - log(max softmax), and the gradient ``|Q_v| scale p - scale Q_v`` in place. The
gradient is thus produced in the forward (one exp per element in all, where recomputing the
softmax in the backward would cost a second one); the backward returns it, scaled in place by the
upstream gradient when that is not exactly 1. No (rows, K) temporary exists other than the
gradient (under torch.compile the backward op returns ``G * g``, a second gradient-sized buffer).
The Triton path instead saves 3 floats per row and recomputes in its backward kernel (one
fewer write+read of dS than storing it, see kernels/dino_loss.py).

Both fast backends are registered as ``torch.library`` custom ops (``dino_fast::dino_loss_fwd``
and ``dino_fast::dino_loss_bwd``) with an autograd formula and fake (meta) implementations,
so ``torch.compile(fullgraph=True)`` traces through a function that calls :class:`DINOLoss`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dino_fast._backend import check_backend, resolve_backend
from dino_fast.train.schedules import teacher_temp_schedule

__all__ = ["DINOLoss", "dino_loss", "dino_loss_with_colsum", "update_center", "NonFiniteError", "Workspace",
           "all_finite", "koleo_loss"]

TensorOrCrops = Union[Tensor, Sequence[Tensor]]
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Bytes of one (images, K) fp32 chunk buffer in the eager fast path.
CPU_GROUP_BYTES = 2 << 20
# Raise fp32 logits far below their row max before the softmax (see _torch_forward).
_SUBNORMAL_FLOOR = True


class NonFiniteError(ValueError):
    """An input of the loss holds NaN or inf (raised only with ``check_finite=True``)."""


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------
def _as_2d(x: TensorOrCrops, name: str) -> Tensor:
    """A (rows, K) tensor from a tensor or a list/tuple of per-crop (B, K) tensors (concatenated)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name}: expected a tensor or a non-empty list of per-crop tensors, got an empty {type(x).__name__}")
        for i, t in enumerate(x):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2:
                raise ValueError(f"{name}[{i}]: expected a 2-D (B, K) crop, got shape {tuple(t.shape)}")
        shapes = {tuple(t.shape) for t in x}
        if len(shapes) != 1:
            raise ValueError(f"{name}: every crop must have the same (B, K) shape, got {sorted(shapes)}")
        return torch.cat(list(x), dim=0)
    raise TypeError(f"{name}: expected a torch.Tensor or a list of per-crop tensors, got {type(x).__name__}")


def _check_temp(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return value


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_inputs(
    student: Tensor, teacher: Tensor, center: Tensor, ncrops: int, n_teacher: int,
    student_temp: float, teacher_temp: float,
) -> tuple[int, int, float, float]:
    """Validate the loss inputs; return (B, K, tau_s, tau_t). Raises TypeError / ValueError."""
    ncrops = _check_int("ncrops", ncrops, 2)
    n_teacher = _check_int("n_teacher", n_teacher, 1)
    if n_teacher > ncrops:
        raise ValueError(f"n_teacher must be <= ncrops (the teacher crops are the first student crops), "
                         f"got n_teacher={n_teacher}, ncrops={ncrops}")
    tau_s = _check_temp("student_temp", student_temp)
    tau_t = _check_temp("teacher_temp", teacher_temp)
    for name, t in (("student", student), ("teacher", teacher), ("center", center)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a float32/bfloat16/float16/float64 tensor, got dtype {t.dtype}")
    if student.dim() != 2:
        raise ValueError(f"student: expected a 2-D (ncrops*B, K) tensor, got shape {tuple(student.shape)}")
    if teacher.dim() != 2:
        raise ValueError(f"teacher: expected a 2-D (n_teacher*B, K) tensor, got shape {tuple(teacher.shape)}")
    rows, K = student.shape
    if K == 0 or rows == 0:
        raise ValueError(f"student: expected a non-empty (ncrops*B, K) tensor, got shape {tuple(student.shape)}")
    if rows % ncrops != 0:
        raise ValueError(f"student: rows ({rows}) must be divisible by ncrops ({ncrops}), got shape {tuple(student.shape)}")
    B = rows // ncrops
    if teacher.shape[0] != n_teacher * B:
        raise ValueError(f"teacher: expected n_teacher*B = {n_teacher}*{B} = {n_teacher * B} rows "
                         f"(B = {rows}/{ncrops} from student), got shape {tuple(teacher.shape)}")
    if teacher.shape[1] != K:
        raise ValueError(f"teacher: expected K = {K} columns (as student), got shape {tuple(teacher.shape)}")
    if center.numel() != K or center.dim() not in (1, 2) or (center.dim() == 2 and center.shape[0] != 1):
        raise ValueError(f"center: expected shape (1, {K}) or ({K},), got {tuple(center.shape)}")
    if not (student.device == teacher.device == center.device):
        raise ValueError(f"student, teacher and center must be on one device, got {student.device}, "
                         f"{teacher.device}, {center.device}")
    return B, K, tau_s, tau_t


def all_finite(*tensors: Tensor) -> Tensor:
    """0-dim bool tensor on the tensors' device: True when no element is NaN or +-inf.

    Args:
        tensors: floating tensors of any shape and dtype, on one device (empty ones are finite).

    One read of each tensor and no temporary as large as it: ``torch.aminmax`` (min and max
    propagate NaN and hold +-inf), then ``isfinite`` over the 2 extremes per tensor. No host
    sync (call ``bool()`` on the result to get a Python bool). ``isfinite(x).all()`` instead runs
    5 eager kernels over x (abs, ne, eq, mul, all) and writes temporaries of x's size.
    """
    ok = [torch.isfinite(torch.stack(torch.aminmax(t.detach().reshape(-1)))) for t in tensors if t.numel()]
    if not ok:  # (extremes are tested in their own dtype: a float64 max must not overflow a cast)
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
    return torch.cat(ok).all()


def _check_finite(x: TensorOrCrops, name: str, rows_per_crop: int) -> None:
    """Raise NonFiniteError naming the crop and row of the first NaN/inf in ``x``."""
    if bool(all_finite(*(list(x) if isinstance(x, (list, tuple)) else [_as_2d(x, name)]))):
        return  # one read; the element-wise scan below runs only when something is non-finite
    crops = list(x) if isinstance(x, (list, tuple)) else None
    full = _as_2d(x, name) if crops is None else None
    tensors = crops if crops is not None else [full]
    offset = 0
    for t in tensors:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0, 0]) + offset
            crop, image = divmod(row, rows_per_crop)
            col = int(bad[row - offset].nonzero()[0, 0])
            raise NonFiniteError(f"{name} has a non-finite value ({t[row - offset, col].item()}) at crop {crop}, "
                                 f"row {image} of that crop (global row {row}, column {col})")
        offset += t.shape[0]


# --------------------------------------------------------------------------------------------
# Eager fast path
# --------------------------------------------------------------------------------------------
def _storage_use_count(st: torch.UntypedStorage) -> int:
    """References to a storage (tensors and storage objects); 2**31 when torch cannot say."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    return int(fn(st._cdata)) if fn is not None else 2**31


class Workspace:
    """Buffers of the eager fast path recycled between calls (CPU only; CUDA has its own cache).

    A fresh (ncrops*B, K) gradient costs page faults on its first write (about 25 ms for 84 MB
    on the benchmark machine, as much as the loss's arithmetic). A workspace keeps the storage
    of the last gradient it handed out and hands it out again only when no tensor refers to it
    any more (storage use count 1: just the workspace), so a gradient still held by the caller
    (e.g. a leaf's ``.grad``) is never overwritten. :class:`DINOLoss` owns one.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._storages: dict[str, torch.UntypedStorage] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape``/``dtype`` on ``device`` (uninitialised)."""
        if not self.enabled or device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        st = self._storages.get(name)
        if st is not None and st.nbytes() == nbytes and _storage_use_count(st) == 1:
            return torch.empty((0,), dtype=dtype, device=device).set_(st, 0, tuple(shape))
        t = torch.empty(shape, dtype=dtype, device=device)
        self._storages[name] = t.untyped_storage()
        return t

    def clear(self) -> None:
        """Drop every cached buffer."""
        self._storages.clear()


def _group_images(B: int, K: int) -> int:
    """Images per chunk of the eager fast path: one (images, K) fp32 buffer of ~CPU_GROUP_BYTES."""
    return max(1, min(B, CPU_GROUP_BYTES // (4 * K)))


def _math_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _torch_forward(
    S: Tensor, T: Tensor, c: Tensor, ncrops: int, n_teacher: int, tau_s: float, tau_t: float,
    out: Optional[Tensor] = None, workspace: Optional["Workspace"] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eager fast-path forward with the gradient computed in the same pass.

    Args: S (ncrops*B, K) and T (n_teacher*B, K) with unit column stride, c (K,), ``out`` an
    optional (ncrops*B, K) tensor of S's dtype to receive the gradient (may be S itself),
    ``workspace`` an optional :class:`Workspace` that recycles the gradient and chunk buffers
    between calls (see there).

    Returns: loss (0-dim), colsum of T (K,), lse of S/tau_s per row (ncrops*B,), all fp32 (fp64
    for fp64 inputs), and G = dLoss/dS for an upstream gradient of 1, in S's dtype.

    Per chunk of images (a ~1 MiB buffer), per crop: y = S_v/tau_s; m = max(y); p = softmax(y)
    (one fused aten kernel, one exp per element) written straight into the gradient rows;
    lse = m - log(max(p)); <Q_v, y>; then G_v = |Q_v| * scale * p - scale * Q_v in one pass.
    The teacher rows of the chunk's images are soft-maxed once and reused by all crops.
    """
    rows_s, K = S.shape
    B = rows_s // ncrops
    NT = n_teacher
    dt = _math_dtype(S, T)
    dev = S.device
    ws = workspace if workspace is not None else Workspace(enabled=False)
    G = ws.get("grad", S.shape, S.dtype, dev) if out is None else out
    r = _group_images(B, K)
    n_terms = NT * ncrops - NT
    scale = 1.0 / (tau_s * B * n_terms)
    inv_s, inv_t = 1.0 / tau_s, 1.0 / tau_t
    S3 = S.unflatten(0, (ncrops, B))
    T3 = T.unflatten(0, (NT, B))
    G3 = G.unflatten(0, (ncrops, B))
    colsum = T.sum(0, dtype=dt)
    cf = c.reshape(-1).to(dt)
    tflat = ws.get("t", (NT * r * K,), dt, dev)
    yflat = ws.get("y", (r * K,), dt, dev)
    Qflat = ws.get("Q", (r * K,), dt, dev) if ncrops > NT else None
    pflat = ws.get("p", (r * K,), dt, dev) if G.dtype != dt else None
    oflat = ws.get("o", (r * K,), dt, dev) if NT > 2 else None
    lse = torch.zeros((ncrops, B), dtype=dt, device=dev)
    dots = torch.zeros((ncrops, B), dtype=dt, device=dev)
    same_s = S.dtype == dt
    # fp32: logits more than `floor` below their row max are raised to max - floor before the
    # softmax, so that no probability (nor probability times `scale`) is subnormal: subnormal
    # arithmetic is 2-4x slower on x86 and such probabilities are below 1e-25 of the row's mass
    # (the effect on the loss and on the gradient's norm is < 1e-20 relative). fp64 needs none.
    floor: Optional[float] = None
    if dt == torch.float32 and _SUBNORMAL_FLOOR:
        floor = max(30.0, 87.0 - math.log(K) - max(0.0, math.log(1.0 / scale)) - 3.0)
    for b0 in range(0, B, r):
        b1 = min(B, b0 + r)
        w = b1 - b0
        q = tflat[: NT * w * K].view(NT, w, K)
        torch.sub(T3[:, b0:b1], cf, out=q)
        q.mul_(inv_t)
        if floor is not None:
            torch.maximum(q, q.amax(-1, keepdim=True).sub_(floor), out=q)
        torch.ops.aten._softmax.out(q, -1, False, out=q)
        q.mul_(-scale)                                        # q <- -scale * q_i
        Qn = None
        if Qflat is not None:
            Qn = Qflat[: w * K].view(w, K)
            torch.sum(q, 0, out=Qn)                           # -scale * sum_i q_i
        y = yflat[: w * K].view(w, K)
        for v in range(ncrops):
            g_rows = G3[v, b0:b1]
            if v < NT:
                others = [i for i in range(NT) if i != v]
                if not others:                                # n_teacher = 1: crop 0 has no term
                    g_rows.zero_()
                    continue
                if len(others) == 1:
                    Qv = q[others[0]]
                else:                                         # summed exactly, no "all - q_v"
                    Qv = oflat[: w * K].view(w, K)
                    torch.sum(q[others], 0, out=Qv)
                nq = NT - 1
            else:
                Qv, nq = Qn, NT
            if same_s:
                torch.mul(S3[v, b0:b1], inv_s, out=y)
            else:
                y.copy_(S3[v, b0:b1]).mul_(inv_s)
            m = lse[v, b0:b1]
            torch.amax(y, 1, out=m)
            torch.linalg.vecdot(y, Qv, out=dots[v, b0:b1])   # -scale * <Q_v, y>, before the floor
            if floor is not None:
                torch.maximum(y, (m - floor).unsqueeze(1), out=y)
            p = g_rows if pflat is None else pflat[: w * K].view(w, K)
            torch.ops.aten._softmax.out(y, -1, False, out=p)
            m.sub_(p.amax(1).log_())                          # lse = max - log(max softmax)
            torch.add(Qv, p, alpha=nq * scale, out=g_rows)
    v = torch.arange(ncrops, device=dev)
    nq_v = (NT - (v < NT).to(torch.int64)).to(dt)
    loss = ((nq_v.unsqueeze(1) * lse).sum() + dots.sum() / scale) / (B * n_terms)
    return loss, colsum, lse.reshape(-1), G


# --------------------------------------------------------------------------------------------
# Dispatch to the implementations; autograd (eager) and torch.library custom ops (compile)
# --------------------------------------------------------------------------------------------
def _impl_forward(impl: str, S: Tensor, T: Tensor, c: Tensor, ncrops: int, n_teacher: int,
                  tau_s: float, tau_t: float, inplace: bool = False, workspace: Optional[Workspace] = None,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, colsum, lse, teacher max, teacher sum-exp, G). The Triton path returns an empty G
    (it recomputes the gradient in the backward); the torch path empty teacher statistics."""
    if impl == "triton":
        from dino_fast.kernels.dino_loss import dino_loss_forward_triton

        loss, lse, TM, TZ, colsum = dino_loss_forward_triton(
            S, T, c, ncrops=ncrops, n_teacher=n_teacher, student_temp=tau_s, teacher_temp=tau_t)
        return loss, colsum, lse, TM, TZ, S.new_empty((0,))
    if impl == "torch":
        loss, colsum, lse, G = _torch_forward(S, T, c, ncrops, n_teacher, tau_s, tau_t,
                                              out=S if inplace else None, workspace=workspace)
        empty = lse.new_empty((0,))
        return loss, colsum, lse, empty, empty.clone(), G
    raise ValueError(f"impl must be 'triton' or 'torch', got {impl!r}")


def _triton_backward(grad: Tensor, S: Tensor, T: Tensor, c: Tensor, lse: Tensor, TM: Tensor, TZ: Tensor,
                     ncrops: int, n_teacher: int, tau_s: float, tau_t: float,
                     out: Optional[Tensor] = None) -> Tensor:
    from dino_fast.kernels.dino_loss import dino_loss_backward_triton

    return dino_loss_backward_triton(grad, S, T, c, lse, TM, TZ, ncrops=ncrops, n_teacher=n_teacher,
                                     student_temp=tau_s, teacher_temp=tau_t, out=out)


@torch.library.custom_op("dino_fast::dino_loss_fwd", mutates_args=())
def _dino_loss_fwd_op(student: Tensor, teacher: Tensor, center: Tensor, ncrops: int, n_teacher: int,
                      student_temp: float, teacher_temp: float, impl: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward: (loss, colsum (K,), lse (ncrops*B,), teacher max, teacher sum-exp, G, center
    used). The Triton backward recomputes from the center, so the op returns its own copy (K,)
    fp32 for the backward to save (empty for the torch path, whose G is the gradient already):
    saving the ``center`` input instead lets AOTAutograd's partitioner re-derive the copy from
    the module's center buffer in the backward, after the in-place center update of the same
    graph has changed it (a wrong gradient under torch.compile, tests/test_loss.py)."""
    out = _impl_forward(impl, student, teacher, center, ncrops, n_teacher, student_temp, teacher_temp)
    c_used = center.clone() if impl == "triton" else center.new_empty((0,))
    return tuple(t if t is not student else t.clone() for t in out) + (c_used,)  # type: ignore[return-value]


@_dino_loss_fwd_op.register_fake
def _(student, teacher, center, ncrops, n_teacher, student_temp, teacher_temp, impl):
    dt = _math_dtype(student, teacher)
    rows_s, K = student.shape
    new = student.new_empty
    rows_t = teacher.shape[0] if impl == "triton" else 0
    G = (new((0,)) if impl == "triton"
         else torch.empty_like(student, memory_format=torch.contiguous_format))
    c_used = center.new_empty((K,) if impl == "triton" else (0,))
    return (new((), dtype=dt), new((K,), dtype=dt), new((rows_s,), dtype=dt), new((rows_t,), dtype=dt),
            new((rows_t,), dtype=dt), G, c_used)


@torch.library.custom_op("dino_fast::dino_loss_bwd", mutates_args=())
def _dino_loss_bwd_op(grad: Tensor, student: Tensor, teacher: Tensor, center: Tensor, lse: Tensor,
                      tmax: Tensor, tsum: Tensor, G: Tensor, ncrops: int, n_teacher: int,
                      student_temp: float, teacher_temp: float, impl: str) -> Tensor:
    """Fused backward: dL/dS (ncrops*B, K) in the student's dtype."""
    if impl == "torch":
        return G * grad.to(G.dtype)
    return _triton_backward(grad, student, teacher, center, lse, tmax, tsum, ncrops, n_teacher,
                            student_temp, teacher_temp)


@_dino_loss_bwd_op.register_fake
def _(grad, student, teacher, center, lse, tmax, tsum, G, ncrops, n_teacher, student_temp, teacher_temp, impl):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, _, ncrops, n_teacher, tau_s, tau_t, impl = inputs
    _, _, lse, tmax, tsum, G, c_used = output
    ctx.save_for_backward(student, teacher, c_used, lse, tmax, tsum, G)
    ctx.args = (ncrops, n_teacher, tau_s, tau_t, impl)


def _backward(ctx, g_loss, g_colsum, g_lse, g_tmax, g_tsum, g_G, g_c):
    student, teacher, center, lse, tmax, tsum, G = ctx.saved_tensors
    dS = None
    if ctx.needs_input_grad[0]:
        if g_loss is None:
            g_loss = lse.new_zeros(())
        dS = torch.ops.dino_fast.dino_loss_bwd(g_loss, student, teacher, center, lse, tmax, tsum, G, *ctx.args)
    return dS, None, None, None, None, None, None, None


_dino_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedDINOLoss(torch.autograd.Function):
    """Eager autograd Function over the fused implementations (what runs outside torch.compile).

    torch path: the gradient is computed in the forward (it costs one more pass there, against
    a whole second softmax in the backward); the backward returns it, scaled in place by the
    upstream gradient when that is not exactly 1 (a second backward through the same graph then
    raises autograd's "modified by an inplace operation" RuntimeError). Triton path: the backward kernel recomputes the softmaxes from the saved per-row
    statistics. ``inplace``: the gradient goes into S's own storage (opt-in; see dino_loss).
    """

    @staticmethod
    def forward(ctx, S, T, c, ncrops, n_teacher, tau_s, tau_t, impl, inplace, workspace):  # noqa: D102
        loss, colsum, lse, TM, TZ, G = _impl_forward(impl, S, T, c, ncrops, n_teacher, tau_s, tau_t, inplace,
                                                     workspace)
        ctx.impl, ctx.inplace, ctx.args = impl, inplace, (ncrops, n_teacher, tau_s, tau_t)
        if impl == "torch":
            ctx.save_for_backward(G)
        else:
            ctx.save_for_backward(S, T, c, lse, TM, TZ)
        ctx.mark_non_differentiable(colsum)
        return loss, colsum

    @staticmethod
    def backward(ctx, g_loss, g_colsum):  # noqa: D102
        if ctx.impl == "torch":
            (G,) = ctx.saved_tensors
            if G.device.type == "cpu" and float(g_loss) == 1.0:
                return G, None, None, None, None, None, None, None, None, None
            # scaled in place: a second backward through this graph (retain_graph=True) then fails
            # autograd's saved-tensor version check with a RuntimeError instead of a wrong result
            return G.mul_(g_loss.to(G.dtype)), None, None, None, None, None, None, None, None, None
        S, T, c, lse, TM, TZ = ctx.saved_tensors
        dS = _triton_backward(g_loss, S, T, c, lse, TM, TZ, *ctx.args, out=S if ctx.inplace else None)
        return dS, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def dino_loss_with_colsum(
    student: TensorOrCrops,
    teacher: TensorOrCrops,
    center: Tensor,
    *,
    ncrops: int,
    student_temp: float,
    teacher_temp: float,
    backend: str = "auto",
    n_teacher: int = 2,
    inplace_grad: bool = False,
    workspace: Optional[Workspace] = None,
) -> tuple[Tensor, Tensor]:
    """The loss and the teacher column sum from one fused pass (no second read of T).

    Same arguments as :func:`dino_loss`, plus ``workspace``: a :class:`Workspace` that recycles
    the eager fast path's gradient and chunk buffers between calls (CPU). Returns ``(loss, colsum)``: loss a 0-dim fp32 tensor
    (the input dtype for ``backend="reference"``, fp64 for fp64 inputs), colsum the (K,) fp32
    sum over the teacher rows of the raw teacher logits (for :func:`update_center`'s formula).
    """
    S = _as_2d(student, "student")
    T = _as_2d(teacher, "teacher")
    B, K, tau_s, tau_t = _check_inputs(S, T, center, ncrops, n_teacher, student_temp, teacher_temp)
    impl = resolve_backend(backend, S.device)
    T = T.detach()
    c = center.detach().reshape(-1)
    if impl == "reference":
        from dino_fast.reference.loss import dino_loss_reference

        loss = dino_loss_reference(S, T, c, ncrops=ncrops, student_temp=tau_s, teacher_temp=tau_t,
                                   n_teacher=n_teacher)
        return loss, T.sum(0, dtype=_math_dtype(T))
    if S.stride(-1) != 1:
        S = S.contiguous()
    if T.stride(-1) != 1:
        T = T.contiguous()
    # a private copy (K floats): the caller's center is updated in place after the forward, and
    # the Triton backward needs the value the forward used
    c = c.to(torch.float64 if c.dtype == torch.float64 and impl == "torch" else torch.float32, copy=True).contiguous()
    if torch.compiler.is_compiling():
        if inplace_grad:
            raise ValueError("inplace_grad=True is eager-only; it cannot be traced by torch.compile")
        loss, colsum = torch.ops.dino_fast.dino_loss_fwd(S, T, c, ncrops, n_teacher, tau_s, tau_t, impl)[:2]
        return loss, colsum
    return _FusedDINOLoss.apply(S, T, c, ncrops, n_teacher, tau_s, tau_t, impl, bool(inplace_grad), workspace)


def dino_loss(
    student: TensorOrCrops,
    teacher: TensorOrCrops,
    center: Tensor,
    *,
    ncrops: int,
    student_temp: float,
    teacher_temp: float,
    backend: str = "auto",
    n_teacher: int = 2,
    inplace_grad: bool = False,
) -> Tensor:
    """Functional DINO loss (no center update): the official pair loop, fused.

    Args:
        student: (ncrops*B, K) student logits, crop-major, fp32/bf16/fp16 (fp64 on the torch and
            reference backends), or a list of ``ncrops`` (B, K) tensors.
        teacher: (n_teacher*B, K) teacher logits (or a list of (B, K)); no gradient flows into it.
        center: (1, K) or (K,) center.
        ncrops: number of student crops (>= 2); n_teacher: teacher crops (1..ncrops), which are
            the first ``n_teacher`` student crops.
        student_temp, teacher_temp: positive temperatures.
        backend: "auto", "triton", "torch" ("cpu"), or "reference".
        inplace_grad: write dL/dS into the student tensor's storage in the backward (saves one
            (ncrops*B, K) buffer; only safe when nothing upstream saved the student tensor for its
            own backward; eager only). Off by default.

    Returns:
        0-dim fp32 tensor (fp64 for fp64 inputs; the input dtype with ``backend="reference"``).
    """
    return dino_loss_with_colsum(student, teacher, center, ncrops=ncrops, student_temp=student_temp,
                                 teacher_temp=teacher_temp, backend=backend, n_teacher=n_teacher,
                                 inplace_grad=inplace_grad)[0]


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo regulariser (DINOv2; Sablayrolles et al. 2019): ``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)``.

    Args:
        features: ``[N, D]`` float (any float dtype; computed in fp32, or fp64 for fp64 input),
            N >= 2; rows are L2-normalised here first. Per rank: the nearest neighbour is
            searched within this tensor only, as DINOv2 does.
        eps: added to the distance (and the normalisation's norm) so identical rows give a finite
            loss (``-log(eps)``) instead of infinity.

    Returns:
        scalar fp32 (fp64 for fp64 input). Differentiable in ``features``; the neighbour choice
        is not (arg-max under no_grad).

    Raises:
        ValueError: ``features`` is not 2-D with N >= 2 rows, or not floating point.
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] < 2:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"koleo_loss expects features [N, D] with N >= 2, got {got}")
    if not features.is_floating_point():
        raise ValueError(f"koleo_loss expects floating-point features, got {features.dtype}")
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    with torch.autocast(features.device.type, enabled=False):
        x = nn.functional.normalize(features.to(dtype), p=2.0, dim=1, eps=eps)
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
            nn_index = sim.argmax(dim=1)
        dist_nn = (x - x[nn_index]).norm(dim=1)
        return -torch.log(dist_nn + eps).mean()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def _apply_center(center: Tensor, batch_sum: Tensor, count: int, momentum: float) -> None:
    """center <- m*center + (1-m) * batch_sum / count, in place."""
    center.mul_(momentum).add_(batch_sum.reshape(center.shape).to(center.dtype), alpha=(1.0 - momentum) / count)


@torch.no_grad()
def update_center(center: Tensor, teacher_output: TensorOrCrops, momentum: float) -> None:
    """In-place center update ``c <- m*c + (1-m) * sum_rows(T) / (rows * world_size)``.

    Args:
        center: (1, K) or (K,) float tensor, updated in place.
        teacher_output: (rows, K) raw teacher logits (or a list of (B, K) crops).
        momentum: m in [0, 1].

    The column sum is accumulated in fp32 and all-reduced (sum) over ranks when
    ``torch.distributed`` is initialised; without a process group it is the local sum.
    """
    T = _as_2d(teacher_output, "teacher_output")
    if not isinstance(center, Tensor) or not center.is_floating_point():
        raise TypeError(f"center: expected a float tensor, got {type(center).__name__}"
                        f"{'' if not isinstance(center, Tensor) else ' of dtype ' + str(center.dtype)}")
    if T.dim() != 2 or T.shape[1] != center.numel():
        raise ValueError(f"teacher_output: expected (rows, {center.numel()}) to match center "
                         f"{tuple(center.shape)}, got {tuple(T.shape)}")
    if not T.is_floating_point():
        raise TypeError(f"teacher_output: expected a float tensor, got dtype {T.dtype}")
    if T.device != center.device:
        raise ValueError(f"teacher_output and center must be on one device, got {T.device} and {center.device}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    batch = T.sum(0, dtype=_math_dtype(T, center))
    world = _world_size()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch)
    _apply_center(center, batch, T.shape[0] * world, float(momentum))


class DINOLoss(nn.Module):
    """Drop-in replacement for the official DINO ``DINOLoss``, fused.

    Same constructor (plus keyword-only options), state (a (1, out_dim) fp32 ``center`` buffer,
    ``teacher_temp_schedule``) and ``forward(student_output, teacher_output, epoch)``.

    Args:
        out_dim: K. ncrops: student crops (2 global + local). warmup_teacher_temp, teacher_temp,
        warmup_teacher_temp_epochs, nepochs: the per-epoch teacher temperature schedule
        (``np.linspace(warmup, final, warmup_epochs)`` then constant). student_temp: tau_s.
        center_momentum: m of the center EMA.
        backend: "auto" | "triton" | "torch" ("cpu") | "reference".
        n_teacher: teacher crops (2 in DINO); they are the first ``n_teacher`` student crops.
        async_center: start the center all-reduce asynchronously and apply it at the next call
            (DINOv2 style; overlaps the reduce with the backward). A pending update is applied
            by :meth:`flush_center`, automatically before ``state_dict()`` and at the next
            ``forward``; call ``flush_center()`` yourself before reading ``center`` directly.
            Eager mode only (its Python-side state does not trace under torch.compile).
        check_finite: check both inputs for NaN/inf and raise :class:`NonFiniteError` naming the
            crop and row (costs a read of the inputs and a host sync).
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        *,
        backend: str = "auto",
        n_teacher: int = 2,
        async_center: bool = False,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        out_dim = _check_int("out_dim", out_dim, 1)
        self.ncrops = _check_int("ncrops", ncrops, 2)
        self.n_teacher = _check_int("n_teacher", n_teacher, 1)
        if self.n_teacher > self.ncrops:
            raise ValueError(f"n_teacher must be <= ncrops, got n_teacher={n_teacher}, ncrops={ncrops}")
        self.student_temp = _check_temp("student_temp", student_temp)
        _check_temp("warmup_teacher_temp", warmup_teacher_temp)
        _check_temp("teacher_temp", teacher_temp)
        warm = _check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0)
        nepochs = _check_int("nepochs", nepochs, 1)
        if warm > nepochs:
            raise ValueError(f"warmup_teacher_temp_epochs ({warm}) must be <= nepochs ({nepochs})")
        if isinstance(center_momentum, bool) or not isinstance(center_momentum, (int, float)) \
                or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be a float in [0, 1], got {center_momentum!r}")
        self.center_momentum = float(center_momentum)
        self.backend = check_backend(backend)
        self.async_center = bool(async_center)
        self.check_finite = bool(check_finite)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warm, nepochs)
        self._temps = [float(t) for t in self.teacher_temp_schedule]
        self._pending: Optional[tuple[object, Tensor, int]] = None
        self._workspace = Workspace()
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.flush_center())

    def teacher_temp_at(self, epoch: int) -> float:
        """Teacher temperature of ``epoch`` (0-based) from the schedule."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__} {epoch!r}")
        if not 0 <= epoch < len(self._temps):
            raise ValueError(f"epoch must be in [0, {len(self._temps)}) (nepochs), got {epoch}")
        return self._temps[int(epoch)]

    def forward(self, student_output: TensorOrCrops, teacher_output: TensorOrCrops, epoch: int) -> Tensor:
        """Loss of one step (0-dim fp32 tensor), then the center update.

        student_output: (ncrops*B, out_dim) crop-major, or a list of ``ncrops`` (B, out_dim);
        teacher_output: (n_teacher*B, out_dim), or a list of ``n_teacher`` (B, out_dim).
        """
        if self.check_finite:
            rows = (student_output.shape[0] // self.ncrops if isinstance(student_output, Tensor)
                    else student_output[0].shape[0])
            _check_finite(student_output, "student_output", max(rows, 1))
            _check_finite(teacher_output, "teacher_output", max(rows, 1))
        self.flush_center()
        temp = self.teacher_temp_at(epoch)
        T = _as_2d(teacher_output, "teacher_output")
        loss, colsum = dino_loss_with_colsum(
            student_output, T, self.center, ncrops=self.ncrops, student_temp=self.student_temp,
            teacher_temp=temp, backend=self.backend, n_teacher=self.n_teacher, workspace=self._workspace,
        )
        self._update_center(colsum, T.shape[0])
        return loss

    @torch.no_grad()
    def _update_center(self, colsum: Tensor, rows: int) -> None:
        batch = colsum.detach()
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        if self.async_center:
            handle = dist.all_reduce(batch, async_op=True) if distributed else None
            self._pending = (handle, batch, rows * world)
            return
        if distributed:
            dist.all_reduce(batch)
        _apply_center(self.center, batch, rows * world, self.center_momentum)

    @torch.no_grad()
    def flush_center(self) -> None:
        """Apply a pending asynchronous center update (waits for its all-reduce); no-op if none."""
        pending = self._pending
        if pending is None:
            return
        handle, batch, count = pending
        if handle is not None:
            handle.wait()
        _apply_center(self.center, batch, count, self.center_momentum)
        self._pending = None

    def extra_repr(self) -> str:  # noqa: D102
        return (f"out_dim={self.center.shape[1]}, ncrops={self.ncrops}, n_teacher={self.n_teacher}, "
                f"student_temp={self.student_temp}, center_momentum={self.center_momentum}, "
                f"backend={self.backend!r}, async_center={self.async_center}")

"""Dispatch, custom ops and autograd of the centered soft-target cross-entropy (the DINO loss op).

Math (docs/DESIGN.md, "The DINO loss"). S: student logits (ncrops*B, K), crop-major; T: teacher
logits (n_teacher*B, K); c: center (K,); tau_s, tau_t: temperatures.

    q_i  = softmax((T_i - c) / tau_t)                              (no gradient)
    loss = 1/(B*n_terms) * sum_v sum_b ( |Q_v| lse_vb - <Q_vb, S_vb / tau_s> )
    Q_v  = sum_{i != v} q_i,   |Q_v| = n_teacher - [v < n_teacher],   lse = logsumexp(S / tau_s)
    n_terms = n_teacher * ncrops - n_teacher
    dL/dS_v = ( |Q_v| softmax(S_v / tau_s) - Q_v ) / (tau_s * B * n_terms)

which equals the official loop over (teacher i, student v != i) pairs of cross-entropies.

Per-student-crop pair weights (``crop_weights=w``, Mugs' group loss): every pair (i, v != i) is
weighted by ``w_v`` instead of ``1/n_terms``, so ``1/(B n_terms)`` above becomes ``w_v / B`` for
crop v; the default (None) is the uniform weighting, bit for bit the unweighted op.

Backends (``backend=``): ``"triton"`` (:mod:`dino_fast.ops.soft_ce.kernels`), ``"torch"``/``"cpu"``
(:mod:`dino_fast.ops.soft_ce.eager`), ``"reference"`` (:mod:`dino_fast.reference.loss`, op by op),
``"auto"`` (Triton on CUDA tensors, the eager fast path otherwise; see
:func:`dino_fast.ops.backend.resolve_backend`).

Both fast backends are registered as ``torch.library`` custom ops (``dino_fast::dino_loss_fwd``
and ``dino_fast::dino_loss_bwd``) with an autograd formula and fake (meta) implementations,
so ``torch.compile(fullgraph=True)`` traces through a function that calls the loss.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from dino_fast.ops.backend import resolve_backend
from dino_fast.ops.soft_ce.checks import TensorOrCrops, as_2d, check_crop_weights, check_inputs, math_dtype
from dino_fast.ops.soft_ce.eager import Workspace, soft_ce_forward_torch

__all__ = ["dino_loss", "dino_loss_with_colsum"]


def _impl_forward(impl: str, S: Tensor, T: Tensor, c: Tensor, ncrops: int, n_teacher: int,
                  tau_s: float, tau_t: float, inplace: bool = False, workspace: Optional[Workspace] = None,
                  crop_weights: Optional[Sequence[float]] = None,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, colsum, lse, teacher max, teacher sum-exp, G). The Triton path returns an empty G
    (it recomputes the gradient in the backward); the torch path empty teacher statistics.
    ``crop_weights``: validated per-crop pair weights (floats) or None (uniform)."""
    if impl == "triton":
        from dino_fast.ops.soft_ce.kernels import dino_loss_forward_triton

        loss, lse, TM, TZ, colsum = dino_loss_forward_triton(
            S, T, c, ncrops=ncrops, n_teacher=n_teacher, student_temp=tau_s, teacher_temp=tau_t,
            crop_weights=_weights_tensor(crop_weights, S.device))
        return loss, colsum, lse, TM, TZ, S.new_empty((0,))
    if impl == "torch":
        loss, colsum, lse, G = soft_ce_forward_torch(S, T, c, ncrops, n_teacher, tau_s, tau_t,
                                              out=S if inplace else None, workspace=workspace,
                                              crop_weights=crop_weights)
        empty = lse.new_empty((0,))
        return loss, colsum, lse, empty, empty.clone(), G
    raise ValueError(f"impl must be 'triton' or 'torch', got {impl!r}")


def _weights_tensor(crop_weights: Optional[Sequence[float]], device: torch.device) -> Optional[Tensor]:
    """The kernels' (ncrops,) fp32 weight tensor on ``device`` (None stays None)."""
    return None if crop_weights is None else torch.tensor(crop_weights, dtype=torch.float32, device=device)


def _triton_backward(grad: Tensor, S: Tensor, T: Tensor, c: Tensor, lse: Tensor, TM: Tensor, TZ: Tensor,
                     ncrops: int, n_teacher: int, tau_s: float, tau_t: float,
                     crop_weights: Optional[Sequence[float]] = None, out: Optional[Tensor] = None) -> Tensor:
    from dino_fast.ops.soft_ce.kernels import dino_loss_backward_triton

    return dino_loss_backward_triton(grad, S, T, c, lse, TM, TZ, ncrops=ncrops, n_teacher=n_teacher,
                                     student_temp=tau_s, teacher_temp=tau_t, out=out,
                                     crop_weights=_weights_tensor(crop_weights, S.device))


@torch.library.custom_op("dino_fast::dino_loss_fwd", mutates_args=())
def _dino_loss_fwd_op(student: Tensor, teacher: Tensor, center: Tensor, ncrops: int, n_teacher: int,
                      student_temp: float, teacher_temp: float, impl: str,
                      crop_weights: Optional[list[float]] = None,
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward: (loss, colsum (K,), lse (ncrops*B,), teacher max, teacher sum-exp, G, center
    used). The Triton backward recomputes from the center, so the op returns its own copy (K,)
    fp32 for the backward to save (empty for the torch path, whose G is the gradient already):
    saving the ``center`` input instead lets AOTAutograd's partitioner re-derive the copy from
    the module's center buffer in the backward, after the in-place center update of the same
    graph has changed it (a wrong gradient under torch.compile, tests/losses/test_dino.py)."""
    out = _impl_forward(impl, student, teacher, center, ncrops, n_teacher, student_temp, teacher_temp,
                        crop_weights=crop_weights)
    c_used = center.clone() if impl == "triton" else center.new_empty((0,))
    return tuple(t if t is not student else t.clone() for t in out) + (c_used,)  # type: ignore[return-value]


@_dino_loss_fwd_op.register_fake
def _(student, teacher, center, ncrops, n_teacher, student_temp, teacher_temp, impl, crop_weights=None):
    dt = math_dtype(student, teacher)
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
                      student_temp: float, teacher_temp: float, impl: str,
                      crop_weights: Optional[list[float]] = None) -> Tensor:
    """Fused backward: dL/dS (ncrops*B, K) in the student's dtype."""
    if impl == "torch":
        return G * grad.to(G.dtype)
    return _triton_backward(grad, student, teacher, center, lse, tmax, tsum, ncrops, n_teacher,
                            student_temp, teacher_temp, crop_weights)


@_dino_loss_bwd_op.register_fake
def _(grad, student, teacher, center, lse, tmax, tsum, G, ncrops, n_teacher, student_temp, teacher_temp, impl,
      crop_weights=None):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, _, ncrops, n_teacher, tau_s, tau_t, impl = inputs[:8]
    crop_weights = inputs[8] if len(inputs) > 8 else None
    _, _, lse, tmax, tsum, G, c_used = output
    ctx.save_for_backward(student, teacher, c_used, lse, tmax, tsum, G)
    ctx.args = (ncrops, n_teacher, tau_s, tau_t, impl, crop_weights)


def _backward(ctx, g_loss, g_colsum, g_lse, g_tmax, g_tsum, g_G, g_c):
    student, teacher, center, lse, tmax, tsum, G = ctx.saved_tensors
    dS = None
    if ctx.needs_input_grad[0]:
        if g_loss is None:
            g_loss = lse.new_zeros(())
        dS = torch.ops.dino_fast.dino_loss_bwd(g_loss, student, teacher, center, lse, tmax, tsum, G, *ctx.args)
    return dS, None, None, None, None, None, None, None, None


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
    def forward(ctx, S, T, c, ncrops, n_teacher, tau_s, tau_t, impl, inplace, workspace, crop_weights):  # noqa: D102
        loss, colsum, lse, TM, TZ, G = _impl_forward(impl, S, T, c, ncrops, n_teacher, tau_s, tau_t, inplace,
                                                     workspace, crop_weights)
        ctx.impl, ctx.inplace, ctx.args = impl, inplace, (ncrops, n_teacher, tau_s, tau_t, crop_weights)
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
                return (G,) + (None,) * 10
            # scaled in place: a second backward through this graph (retain_graph=True) then fails
            # autograd's saved-tensor version check with a RuntimeError instead of a wrong result
            return (G.mul_(g_loss.to(G.dtype)),) + (None,) * 10
        S, T, c, lse, TM, TZ = ctx.saved_tensors
        dS = _triton_backward(g_loss, S, T, c, lse, TM, TZ, *ctx.args, out=S if ctx.inplace else None)
        return (dS,) + (None,) * 10


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
    crop_weights: Optional[Sequence[float] | Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The loss and the teacher column sum from one fused pass (no second read of T).

    Same arguments as :func:`dino_loss`, plus ``workspace``: a :class:`Workspace` that recycles
    the eager fast path's gradient and chunk buffers between calls (CPU). Returns ``(loss, colsum)``: loss a 0-dim fp32 tensor
    (the input dtype for ``backend="reference"``, fp64 for fp64 inputs), colsum the (K,) fp32
    sum over the teacher rows of the raw teacher logits (for :func:`update_center`'s formula).
    """
    S = as_2d(student, "student")
    T = as_2d(teacher, "teacher")
    B, K, tau_s, tau_t = check_inputs(S, T, center, ncrops, n_teacher, student_temp, teacher_temp)
    cw = check_crop_weights(crop_weights, ncrops)
    impl = resolve_backend(backend, S.device)
    T = T.detach()
    c = center.detach().reshape(-1)
    if impl == "reference":
        from dino_fast.reference.loss import dino_loss_reference

        loss = dino_loss_reference(S, T, c, ncrops=ncrops, student_temp=tau_s, teacher_temp=tau_t,
                                   n_teacher=n_teacher, crop_weights=cw)
        return loss, T.sum(0, dtype=math_dtype(T))
    if S.stride(-1) != 1:
        S = S.contiguous()
    if T.stride(-1) != 1:
        T = T.contiguous()
    # Triton: a private copy (K floats): the caller's center is updated in place after the
    # forward, and the Triton backward needs the value the forward used. The CPU paths read the
    # center in the forward only (their gradient is computed there): no copy, whose fresh pages
    # would cost more than the copy
    c = c.to(torch.float64 if c.dtype == torch.float64 and impl == "torch" else torch.float32,
             copy=impl == "triton").contiguous()
    if torch.compiler.is_compiling():
        if inplace_grad:
            raise ValueError("inplace_grad=True is eager-only; it cannot be traced by torch.compile")
        loss, colsum = torch.ops.dino_fast.dino_loss_fwd(S, T, c, ncrops, n_teacher, tau_s, tau_t, impl,
                                                         None if cw is None else list(cw))[:2]
        return loss, colsum
    return _FusedDINOLoss.apply(S, T, c, ncrops, n_teacher, tau_s, tau_t, impl, bool(inplace_grad), workspace, cw)


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
    crop_weights: Optional[Sequence[float] | Tensor] = None,
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
        crop_weights: optional ``ncrops`` finite weights >= 0 (not all 0), one per student crop:
            every pair (teacher i, student v != i) gets weight ``w_v``, so the loss is
            ``sum_v w_v sum_{i != v} mean_b H(q_ib, p_vb)`` (Mugs: ``1/4`` for the two global crops,
            ``1/(4L)`` for the L local ones). None (default): the official ``1/n_terms`` for
            every pair, bit for bit the unweighted op.

    Returns:
        0-dim fp32 tensor (fp64 for fp64 inputs; the input dtype with ``backend="reference"``).
    """
    return dino_loss_with_colsum(student, teacher, center, ncrops=ncrops, student_temp=student_temp,
                                 teacher_temp=teacher_temp, backend=backend, n_teacher=n_teacher,
                                 inplace_grad=inplace_grad, crop_weights=crop_weights)[0]



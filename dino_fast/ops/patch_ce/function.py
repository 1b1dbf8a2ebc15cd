"""Dispatch, custom ops and autograd of the row-aligned soft-target cross-entropy (iBOT op).

Math. S, T: (R, K) student and teacher logits, row r of S pairs with row r of T only; c: (K,)
center; w: (R,) per-row weights; tau_s, tau_t: temperatures.

    q_r     = softmax((T_r - c) / tau_t)                    (no gradient into T)
    loss    = sum_r w_r H(q_r, softmax(S_r / tau_s)) = sum_r w_r (lse_r - <q_r, S_r / tau_s>)
    dL/dS_r = w_r (softmax(S_r / tau_s) - q_r) / tau_s

DINOv2's iBOT patch loss is this with R the masked tokens of the global crops, w_r =
1 / (#masked tokens of r's crop * #global crops); with Sinkhorn-Knopp targets Q, pass
``log Q`` as the teacher with a zero center and ``teacher_temp=1``.

Backends (``backend=``): ``"triton"`` (:mod:`dino_fast.ops.patch_ce.kernels`), ``"torch"``/``"cpu"``
(:mod:`dino_fast.ops.patch_ce.eager`), ``"reference"`` (:mod:`dino_fast.reference.ibot`),
``"auto"`` (Triton on CUDA, the eager path otherwise). Both fast backends are also registered as
the ``torch.library`` custom ops ``dino_fast::patch_ce_fwd`` / ``dino_fast::patch_ce_bwd`` with
fake implementations and an autograd formula, used under ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dino_fast.ops.backend import resolve_backend
from dino_fast.ops.patch_ce.checks import check_patch_inputs, math_dtype
from dino_fast.ops.patch_ce.eager import patch_ce_forward_torch
from dino_fast.ops.soft_ce.eager import Workspace

__all__ = ["patch_ce_loss", "patch_ce_loss_with_colsum"]


def _impl_forward(impl: str, S: Tensor, T: Tensor, c: Tensor, w: Tensor, tau_s: float, tau_t: float,
                  with_colsum: bool, workspace: Optional[Workspace] = None,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, colsum, lse, teacher max, teacher sum-exp, G): the Triton path returns an empty G
    (its backward recomputes), the torch path empty teacher statistics."""
    if impl == "triton":
        from dino_fast.ops.patch_ce.kernels import patch_ce_forward_triton

        loss, lse, TM, TZ, colsum = patch_ce_forward_triton(S, T, c, w, student_temp=tau_s, teacher_temp=tau_t,
                                                            with_colsum=with_colsum)
        return loss, colsum, lse, TM, TZ, S.new_empty((0,))
    if impl == "torch":
        loss, colsum, lse, G = patch_ce_forward_torch(S, T, c, w, tau_s, tau_t, with_colsum=with_colsum,
                                                      workspace=workspace)
        empty = lse.new_empty((0,))
        return loss, colsum, lse, empty, empty.clone(), G
    raise ValueError(f"impl must be 'triton' or 'torch', got {impl!r}")


def _triton_backward(grad: Tensor, S: Tensor, T: Tensor, c: Tensor, w: Tensor, lse: Tensor, TM: Tensor,
                     TZ: Tensor, tau_s: float, tau_t: float) -> Tensor:
    from dino_fast.ops.patch_ce.kernels import patch_ce_backward_triton

    return patch_ce_backward_triton(grad, S, T, c, w, lse, TM, TZ, student_temp=tau_s, teacher_temp=tau_t)


@torch.library.custom_op("dino_fast::patch_ce_fwd", mutates_args=())
def _patch_ce_fwd_op(student: Tensor, teacher: Tensor, center: Tensor, weights: Tensor, student_temp: float,
                     teacher_temp: float, with_colsum: bool, impl: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward: (loss, colsum, lse, teacher max, teacher sum-exp, G, center used). The op
    returns its own copy of the center for the Triton backward to save (see the DINO op: saving
    the input lets AOTAutograd re-derive it after an in-place center update)."""
    out = _impl_forward(impl, student, teacher, center, weights, student_temp, teacher_temp, with_colsum)
    c_used = center.clone() if impl == "triton" else center.new_empty((0,))
    return tuple(out) + (c_used,)  # type: ignore[return-value]


@_patch_ce_fwd_op.register_fake
def _(student, teacher, center, weights, student_temp, teacher_temp, with_colsum, impl):
    dt = math_dtype(student, teacher)
    rows, K = student.shape
    new = student.new_empty
    rows_t = rows if impl == "triton" else 0
    G = new((0,)) if impl == "triton" else torch.empty_like(student, memory_format=torch.contiguous_format)
    c_used = center.new_empty((K,) if impl == "triton" else (0,))
    return (new((), dtype=dt), new((K,), dtype=dt), new((rows,), dtype=dt), new((rows_t,), dtype=dt),
            new((rows_t,), dtype=dt), G, c_used)


@torch.library.custom_op("dino_fast::patch_ce_bwd", mutates_args=())
def _patch_ce_bwd_op(grad: Tensor, student: Tensor, teacher: Tensor, center: Tensor, weights: Tensor,
                     lse: Tensor, tmax: Tensor, tsum: Tensor, G: Tensor, student_temp: float,
                     teacher_temp: float, impl: str) -> Tensor:
    """Fused backward: dL/dS (R, K) in the student's dtype."""
    if impl == "torch":
        return G * grad.to(G.dtype)
    return _triton_backward(grad, student, teacher, center, weights, lse, tmax, tsum, student_temp, teacher_temp)


@_patch_ce_bwd_op.register_fake
def _(grad, student, teacher, center, weights, lse, tmax, tsum, G, student_temp, teacher_temp, impl):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, _, weights, tau_s, tau_t, _, impl = inputs
    _, _, lse, tmax, tsum, G, c_used = output
    ctx.save_for_backward(student, teacher, c_used, weights, lse, tmax, tsum, G)
    ctx.args = (tau_s, tau_t, impl)


def _backward(ctx, g_loss, g_colsum, g_lse, g_tmax, g_tsum, g_G, g_c):
    student, teacher, center, weights, lse, tmax, tsum, G = ctx.saved_tensors
    dS = None
    if ctx.needs_input_grad[0]:
        if g_loss is None:
            g_loss = lse.new_zeros(())
        dS = torch.ops.dino_fast.patch_ce_bwd(g_loss, student, teacher, center, weights, lse, tmax, tsum, G,
                                              *ctx.args)
    return dS, None, None, None, None, None, None, None


_patch_ce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedPatchCE(torch.autograd.Function):
    """Eager autograd Function over the fused implementations. torch path: the gradient comes
    from the forward and is returned (scaled in place when the upstream gradient is not exactly
    1, so a second backward through the graph fails autograd's version check); Triton path: the
    backward kernel recomputes from the saved per-row statistics."""

    @staticmethod
    def forward(ctx, S, T, c, w, tau_s, tau_t, with_colsum, impl, workspace):  # noqa: D102
        loss, colsum, lse, TM, TZ, G = _impl_forward(impl, S, T, c, w, tau_s, tau_t, with_colsum, workspace)
        ctx.impl, ctx.args = impl, (tau_s, tau_t)
        if impl == "torch":
            ctx.save_for_backward(G)
        else:
            ctx.save_for_backward(S, T, c, w, lse, TM, TZ)
        ctx.mark_non_differentiable(colsum)
        return loss, colsum

    @staticmethod
    def backward(ctx, g_loss, g_colsum):  # noqa: D102
        none = (None,) * 8
        if ctx.impl == "torch":
            (G,) = ctx.saved_tensors
            if G.device.type == "cpu" and float(g_loss) == 1.0:
                return (G,) + none
            return (G.mul_(g_loss.to(G.dtype)),) + none
        S, T, c, w, lse, TM, TZ = ctx.saved_tensors
        return (_triton_backward(g_loss, S, T, c, w, lse, TM, TZ, *ctx.args),) + none


def patch_ce_loss_with_colsum(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    weights: Tensor,
    *,
    student_temp: float,
    teacher_temp: float,
    backend: str = "auto",
    with_colsum: bool = True,
    workspace: Optional[Workspace] = None,
) -> tuple[Tensor, Tensor]:
    """The weighted row-aligned loss and the teacher column sum from one fused pass.

    Args:
        student: (R, K) student logits (fp32/bf16/fp16; fp64 on the torch and reference
            backends); the gradient flows into it. R may be 0 (the loss is then 0).
        teacher: (R, K) teacher logits, row r paired with student row r; no gradient.
        center: (K,) or (1, K) center subtracted from the teacher logits.
        weights: (R,) per-row weights (no gradient).
        student_temp, teacher_temp: positive temperatures.
        backend: "auto", "triton", "torch" ("cpu") or "reference".
        with_colsum: compute the column sum of T (False saves its accumulation, e.g. for SK).
        workspace: a :class:`~dino_fast.ops.soft_ce.eager.Workspace` recycling the eager path's
            buffers between calls (CPU).

    Returns:
        ``(loss, colsum)``: loss a 0-dim fp32 tensor (fp64 for fp64 inputs; the input dtype with
        ``backend="reference"``), colsum the (K,) fp32 sum over rows of the raw teacher logits
        (zeros when ``with_colsum`` is False).

    Raises:
        TypeError / ValueError: wrong types, dtypes, shapes, devices or temperatures (the message
        names the argument, what was expected and what came).
    """
    R, K, tau_s, tau_t = check_patch_inputs(student, teacher, center, weights, student_temp, teacher_temp)
    impl = resolve_backend(backend, student.device)
    T = teacher.detach()
    w = weights.detach()
    c = center.detach().reshape(-1)
    if impl == "reference":
        from dino_fast.reference.ibot import patch_ce_reference

        loss = patch_ce_reference(student, T, c, w, student_temp=tau_s, teacher_temp=tau_t)
        return loss, T.sum(0, dtype=math_dtype(T)) if with_colsum else T.new_zeros((K,), dtype=math_dtype(T))
    dt = math_dtype(student, T)
    if R == 0:  # nothing masked: a zero loss that still connects to the student's graph
        return (student.sum() * 0).to(dt), torch.zeros((K,), dtype=dt, device=student.device)
    S = student if student.stride(-1) == 1 else student.contiguous()
    if T.stride(-1) != 1:
        T = T.contiguous()
    if impl == "triton":
        c = c.to(torch.float32, copy=True).contiguous()
        w = w.to(torch.float32).contiguous()
    else:
        c = c.to(dt, copy=True).contiguous()
    if torch.compiler.is_compiling():
        out = torch.ops.dino_fast.patch_ce_fwd(S, T, c, w, tau_s, tau_t, bool(with_colsum), impl)
        return out[0], out[1]
    return _FusedPatchCE.apply(S, T, c, w, tau_s, tau_t, bool(with_colsum), impl, workspace)


def patch_ce_loss(student: Tensor, teacher: Tensor, center: Tensor, weights: Tensor, *, student_temp: float,
                  teacher_temp: float, backend: str = "auto") -> Tensor:
    """The weighted row-aligned soft-target cross-entropy (no column sum); arguments, result and
    errors as :func:`patch_ce_loss_with_colsum`."""
    return patch_ce_loss_with_colsum(student, teacher, center, weights, student_temp=student_temp,
                                     teacher_temp=teacher_temp, backend=backend, with_colsum=False)[0]

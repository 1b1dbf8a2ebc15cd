"""Inputs, float64 reference and error measure shared by the loss tests (eager path and kernels)."""
from __future__ import annotations

import torch

from dino_fast.reference.loss import dino_loss_reference


def make_inputs(B: int, K: int, ncrops: int, n_teacher: int = 2, dtype: torch.dtype = torch.float32):
    """Fresh logits in the range a DINO head produces (N(0, 1)-ish), rounded to ``dtype``."""
    S = torch.randn(ncrops * B, K).to(dtype)
    T = (torch.randn(n_teacher * B, K) + 0.3 * torch.randn(1, K)).to(dtype)
    c = 0.1 * torch.randn(1, K)
    return S, T, c


def reference64(S, T, c, ncrops, n_teacher, tau_s, tau_t, crop_weights=None):
    """float64 reference loss and gradient for the inputs as given (after their rounding), with
    optional per-crop pair weights."""
    S64 = S.detach().double().requires_grad_()
    loss = dino_loss_reference(S64, T.double(), c.double(), ncrops=ncrops, student_temp=tau_s,
                               teacher_temp=tau_t, n_teacher=n_teacher, crop_weights=crop_weights)
    (g,) = torch.autograd.grad(loss, S64)
    return loss.detach(), g


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against b (absolute when b is 0)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def run_kernels(S, T, c, ncrops, n_teacher, tau_s, tau_t, upstream):
    """Forward and backward launchers directly (on the inputs' device), with the gradient buffer
    poisoned with NaN. Returns (loss, lse, colsum, gradient)."""
    from dino_fast.ops.soft_ce.kernels import dino_loss_backward_triton, dino_loss_forward_triton

    c32 = c.reshape(-1).float().contiguous()
    loss, lse, tmax, tsum, colsum = dino_loss_forward_triton(
        S, T, c32, ncrops=ncrops, n_teacher=n_teacher, student_temp=tau_s, teacher_temp=tau_t)
    out = torch.full_like(S, float("nan"))
    g = dino_loss_backward_triton(torch.tensor(upstream, device=S.device), S, T, c32, lse, tmax, tsum, ncrops=ncrops,
                                  n_teacher=n_teacher, student_temp=tau_s, teacher_temp=tau_t, out=out)
    assert g is out
    return loss, lse, colsum, g


def check_kernels_against_float64(S, T, c, ncrops, n_teacher, tol, tau_s=0.1, tau_t=0.04):
    """The kernels (gradient buffer NaN-poisoned, a random upstream gradient in [0.5, 2)) against
    the float64 reference: every gradient element written, in S's dtype; loss and gradient within
    ``tol`` (relative) for K > 1; lse and the teacher column sum within 1e-6. For K == 1 (p = q = 1:
    loss and gradient are zero up to exp rounding) only the loss is checked here (|loss| < 1e-6):
    the gradient's bound depends on the device, so the caller asserts it.

    Returns (gradient, upstream).
    """
    K = S.shape[-1]
    upstream = float(torch.empty(()).uniform_(0.5, 2.0))
    ref_loss, ref_g = reference64(S, T, c, ncrops, n_teacher, tau_s, tau_t)
    loss, lse, colsum, g = run_kernels(S, T, c, ncrops, n_teacher, tau_s, tau_t, upstream)
    assert g.dtype == S.dtype and torch.isfinite(g).all(), "gradient has unwritten (NaN-poisoned) elements"
    if K == 1:
        assert abs(loss.item()) < 1e-6
    else:
        assert rel(loss, ref_loss) < tol, (loss.item(), ref_loss.item())
        assert rel(g, upstream * ref_g) < tol
    assert rel(lse, torch.logsumexp(S.double() / tau_s, dim=-1)) < 1e-6
    assert rel(colsum, T.double().sum(0)) < 1e-6
    return g, upstream

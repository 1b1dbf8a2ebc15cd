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


def reference64(S, T, c, ncrops, n_teacher, tau_s, tau_t):
    """float64 reference loss and gradient for the inputs as given (after their rounding)."""
    S64 = S.detach().double().requires_grad_()
    loss = dino_loss_reference(S64, T.double(), c.double(), ncrops=ncrops, student_temp=tau_s,
                               teacher_temp=tau_t, n_teacher=n_teacher)
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
    from dino_fast.kernels.dino_loss import dino_loss_backward_triton, dino_loss_forward_triton

    c32 = c.reshape(-1).float().contiguous()
    loss, lse, tmax, tsum, colsum = dino_loss_forward_triton(
        S, T, c32, ncrops=ncrops, n_teacher=n_teacher, student_temp=tau_s, teacher_temp=tau_t)
    out = torch.full_like(S, float("nan"))
    g = dino_loss_backward_triton(torch.tensor(upstream, device=S.device), S, T, c32, lse, tmax, tsum, ncrops=ncrops,
                                  n_teacher=n_teacher, student_temp=tau_s, teacher_temp=tau_t, out=out)
    assert g is out
    return loss, lse, colsum, g

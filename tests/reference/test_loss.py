"""The reference itself against an independent float64 computation of the official definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dino_fast.reference.loss import DINOLossReference, dino_loss_reference, update_center_reference


def numpy_dino_loss(S, T, c, ncrops, n_teacher, tau_s, tau_t):
    """Pair-by-pair cross-entropy with numpy in float64, written from docs/DESIGN.md, "The DINO loss"."""
    S, T, c = (np.asarray(x, dtype=np.float64) for x in (S, T, c))
    B = S.shape[0] // ncrops
    terms = []
    for i in range(n_teacher):
        t = (T[i * B:(i + 1) * B] - c) / tau_t
        q = np.exp(t - t.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        for v in range(ncrops):
            if v == i:
                continue
            s = S[v * B:(v + 1) * B] / tau_s
            logp = s - s.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            terms.append(np.mean(-(q * logp).sum(1)))
    return float(np.mean(terms))


@pytest.mark.parametrize("B,K,ncrops,n_teacher", [(1, 5, 2, 2), (3, 64, 4, 2), (2, 33, 6, 3), (2, 17, 3, 1)])
def test_reference_matches_numpy_definition(B, K, ncrops, n_teacher):
    S = torch.randn(ncrops * B, K, dtype=torch.float64)
    T = torch.randn(n_teacher * B, K, dtype=torch.float64)
    c = 0.1 * torch.randn(1, K, dtype=torch.float64)
    got = dino_loss_reference(S, T, c, ncrops=ncrops, student_temp=0.1, teacher_temp=0.05, n_teacher=n_teacher)
    expect = numpy_dino_loss(S, T, c, ncrops, n_teacher, 0.1, 0.05)
    assert abs(got.item() - expect) <= 1e-12 * abs(expect)


@pytest.mark.parametrize("B,K,ncrops,n_teacher", [(1, 5, 2, 2), (3, 64, 4, 2), (2, 33, 6, 3), (2, 17, 3, 1)])
def test_dinov2_composition_equals_the_official_loop(B, K, ncrops, n_teacher):
    from dino_fast.reference.loss import dino_loss_dinov2_composition

    S = torch.randn(ncrops * B, K, dtype=torch.float64, requires_grad=True)
    T = torch.randn(n_teacher * B, K, dtype=torch.float64)
    c = 0.1 * torch.randn(1, K, dtype=torch.float64)
    kw = dict(ncrops=ncrops, student_temp=0.1, teacher_temp=0.05, n_teacher=n_teacher)
    a = dino_loss_reference(S, T, c, **kw)
    b = dino_loss_dinov2_composition(S, T, c, **kw)
    assert abs(a.item() - b.item()) <= 1e-12 * abs(a.item())
    ga, = torch.autograd.grad(a, S)
    gb, = torch.autograd.grad(b, S)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-14)
    # bf16 inputs are computed in fp32: against the float64 loss of the same (rounded) inputs the
    # error is fp32 rounding of logits of size max|S|/tau_s and max|T - c|/tau_t (the bf16
    # rounding of the inputs themselves is not the composition's error: it moved the loss by up to
    # 2.7 % at K = 5 on a fresh-input sweep, seed 12)
    S16, T16 = S.detach().bfloat16(), T.bfloat16()
    half = dino_loss_dinov2_composition(S16, T16, c.float(), **kw)
    want = dino_loss_reference(S16.double(), T16.double(), c.float().double(), **kw).item()
    scale = S16.double().abs().max().item() / 0.1 + (T16.double() - c).abs().max().item() / 0.05
    assert half.dtype == torch.float32
    assert abs(half.item() - want) <= 1e-6 * abs(want) + 16 * torch.finfo(torch.float32).eps * scale


def test_reference_gradient_matches_identity():
    """dL/dS_v = (|Q_v| softmax(S_v/tau_s) - Q_v) / (tau_s B n_terms) (docs/DESIGN.md, "The DINO loss")."""
    B, K, ncrops = 3, 50, 5
    S = torch.randn(ncrops * B, K, dtype=torch.float64, requires_grad=True)
    T = torch.randn(2 * B, K, dtype=torch.float64)
    c = 0.1 * torch.randn(1, K, dtype=torch.float64)
    dino_loss_reference(S, T, c, ncrops=ncrops, student_temp=0.1, teacher_temp=0.04).backward()
    q = torch.softmax((T - c) / 0.04, -1).view(2, B, K)
    p = torch.softmax(S.detach() / 0.1, -1).view(ncrops, B, K)
    Q = torch.stack([q[1], q[0]] + [q[0] + q[1]] * (ncrops - 2))
    nq = torch.tensor([1.0, 1.0] + [2.0] * (ncrops - 2), dtype=torch.float64).view(-1, 1, 1)
    expect = (nq * p - Q) / (0.1 * B * (2 * ncrops - 2))
    assert torch.allclose(S.grad, expect.reshape(ncrops * B, K), rtol=1e-10, atol=1e-14)


def test_reference_module_schedule_and_center():
    crit = DINOLossReference(8, 4, 0.04, 0.07, 3, 5, center_momentum=0.8)
    np.testing.assert_allclose(crit.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07])
    T = torch.randn(4, 8)
    crit(torch.randn(8, 8), T, 1)
    assert torch.allclose(crit.center, 0.2 * T.mean(0, keepdim=True))
    new = update_center_reference(crit.center, T, 0.8)
    assert torch.allclose(new, 0.8 * crit.center + 0.2 * T.mean(0, keepdim=True))

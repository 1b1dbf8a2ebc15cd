"""The Mugs weighting: the group loss on the fused DINO-loss op with per-crop weights against the
official pair loop (reference/mugs.py), and the gated total."""
from __future__ import annotations

import pytest
import torch

from dino_fast.losses.dino import DINOLoss
from dino_fast.losses.mugs import mugs_crop_weights, mugs_loss_scales, mugs_total
from dino_fast.reference.loss import update_center_reference
from dino_fast.reference.mugs import group_loss_reference, mugs_total_reference
from tests._loss_utils import make_inputs, rel


def test_crop_weights_values():
    assert mugs_crop_weights(12) == [0.25, 0.25] + [1 / 40] * 10
    w = mugs_crop_weights(7, 3)
    pairs = sum(w[s] for t in range(3) for s in range(7) if s != t)
    assert abs(pairs - 1.0) < 1e-15
    with pytest.raises(ValueError, match=r"needs local crops: ncrops \(2\) must exceed n_teacher \(2\)"):
        mugs_crop_weights(2)
    with pytest.raises(ValueError, match="n_teacher must be >= 2"):
        mugs_crop_weights(4, 1)


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("torch", torch.float32, 1e-5),
                                               ("triton", torch.float32, 1e-5), ("triton", torch.bfloat16, 1e-2),
                                               ("reference", torch.float64, 1e-12)])
@pytest.mark.parametrize("B,K,L", [(3, 1000, 10), (2, 4099, 3), (4, 64, 1)])
def test_group_loss_on_the_fused_op_matches_the_official_loop(backend, dtype, tol, B, K, L):
    ncrops = 2 + L
    loss = DINOLoss(K, ncrops, 0.04, 0.07, 2, 4, backend=backend, crop_weights=mugs_crop_weights(ncrops))
    for epoch in range(3):
        center = loss.center.detach().double().clone()   # the module's (fp32) center, as it is
        S, T, _ = make_inputs(B, K, ncrops, 2, dtype)
        s = S.clone().requires_grad_()
        got = loss(s, T, epoch)
        got.backward()
        s64 = S.detach().double().requires_grad_()
        want = group_loss_reference(s64, T.double(), center, ncrops=ncrops, student_temp=0.1,
                                    teacher_temp=loss.teacher_temp_at(epoch))
        want.backward()
        center = update_center_reference(center, T.double(), 0.9)
        assert rel(got.detach(), want.detach()) < tol
        assert rel(s.grad, s64.grad) < tol
        assert rel(loss.center, center) < 1e-6


def test_total_matches_the_official_combination():
    ls = [torch.rand(()) for _ in range(3)]
    for w in ([1, 1, 1], [1, 1, 2], [0, 1, 1], [0.5, 0, 0]):
        assert torch.allclose(mugs_total(ls, w), mugs_total_reference(ls, w), rtol=1e-6, atol=0)
    assert mugs_loss_scales([1, 1, 2]) == [0.25, 0.25, 0.25]
    with pytest.raises(ValueError, match="not all 0"):
        mugs_loss_scales([0, 0, 0])

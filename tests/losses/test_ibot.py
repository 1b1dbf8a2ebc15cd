"""iBOTPatchLoss against DINOv2's iBOT patch loss restated in float64 (centered and
Sinkhorn-Knopp targets), its center update, the masked = dense identity, and 2 ranks (gloo) =
1 process for the loss, the center and the SK targets."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast.losses.ibot import iBOTPatchLoss, masks_weight
from dino_fast.reference.ibot import (
    ibot_center_update_reference,
    ibot_masks_weight_reference,
    ibot_patch_loss_dense_reference,
    ibot_patch_loss_reference,
)
from dino_fast.reference.sinkhorn import sinkhorn_knopp_reference
from tests._loss_utils import rel

TAU_S, TAU_T = 0.1, 0.05


def _batch(n_crops=6, N=20, K=300, dtype=torch.float32):
    masks = torch.rand(n_crops, N) < 0.3
    masks[0] = False  # an unmasked crop still counts in the 1 / n_crops
    masks[1, :3] = True
    S = torch.randn(n_crops, N, K).to(dtype)
    T = (torch.randn(n_crops, N, K) + 0.5 * torch.randn(1, 1, K)).to(dtype)
    return masks, S, T


def test_masks_weight_matches_dinov2():
    masks, _, _ = _batch()
    assert torch.allclose(masks_weight(masks), ibot_masks_weight_reference(masks).float())
    with pytest.raises(ValueError, match=r"masks: expected a bool \[n_crops, N\] tensor"):
        masks_weight(masks.float())


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("torch", torch.float32, 1e-5),
                                               ("triton", torch.float32, 1e-5), ("torch", torch.bfloat16, 1e-2)])
def test_center_mode_matches_dinov2_forward_masked_and_center_update(backend, dtype, tol):
    masks, S, T = _batch(dtype=dtype)
    n_crops, N, K = S.shape
    loss_mod = iBOTPatchLoss(K, TAU_S, 0.9, backend=backend)
    c0 = 0.2 * torch.randn(1, K)
    loss_mod.center.copy_(c0)
    s = S[masks].clone().requires_grad_()
    loss = loss_mod(s, T[masks], masks_weight(masks, torch.float64 if dtype == torch.float64 else torch.float32),
                    n_crops, TAU_T)
    loss.backward()
    s64 = S[masks].double().requires_grad_()
    ref = ibot_patch_loss_reference(s64, T[masks].double(), masks, c0.double(), student_temp=TAU_S, teacher_temp=TAU_T)
    ref.backward()
    assert loss.dtype == torch.float32 and rel(loss.detach(), ref.detach()) < max(tol, 1e-6)
    assert rel(s.grad, s64.grad) < tol
    want_c = ibot_center_update_reference(c0.double(), T[masks].double(), 0.9)
    assert rel(loss_mod.center, want_c) < 1e-6


def test_masked_form_equals_dense_form():
    masks, S, T = _batch(dtype=torch.float64)
    c = 0.1 * torch.randn(S.shape[-1], dtype=torch.float64)
    a = ibot_patch_loss_reference(S[masks], T[masks], masks, c, student_temp=TAU_S, teacher_temp=TAU_T)
    b = ibot_patch_loss_dense_reference(S, T, masks, c, student_temp=TAU_S, teacher_temp=TAU_T)
    assert rel(a, b) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sinkhorn_mode_matches_dinov2(backend):
    masks, S, T = _batch()
    n_crops, N, K = S.shape
    mod = iBOTPatchLoss(K, TAU_S, centering="sinkhorn_knopp", backend=backend)
    s = S[masks].clone().requires_grad_()
    loss = mod(s, T[masks], masks_weight(masks), n_crops, TAU_T)
    loss.backward()
    q = sinkhorn_knopp_reference(T[masks].double(), TAU_T)
    s64 = S[masks].double().requires_grad_()
    per = torch.sum(q * torch.log_softmax(s64 / TAU_S, dim=-1), dim=-1)
    ref = -(per * ibot_masks_weight_reference(masks).double()).sum() / n_crops
    ref.backward()
    assert rel(loss.detach(), ref.detach()) < 1e-5 and rel(s.grad, s64.grad) < 1e-5
    assert not mod.center.any()  # unused in this mode


def test_no_masked_token_gives_zero_and_keeps_the_center():
    K = 30
    mod = iBOTPatchLoss(K, backend="torch")
    mod.center.fill_(0.5)
    s = torch.randn(0, K, requires_grad=True)
    loss = mod(s, torch.randn(0, K), torch.zeros(0), 4, TAU_T)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(mod.center == 0.5)
    sk = iBOTPatchLoss(K, centering="sinkhorn_knopp")
    assert sk(torch.randn(0, K, requires_grad=True), torch.randn(0, K), torch.zeros(0), 4, TAU_T).item() == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="centering must be"):
        iBOTPatchLoss(10, centering="nope")
    with pytest.raises(ValueError, match="center_momentum must be a float in"):
        iBOTPatchLoss(10, center_momentum=1.5)
    mod = iBOTPatchLoss(10)
    with pytest.raises(ValueError, match="n_crops must be >= 1"):
        mod(torch.randn(2, 10), torch.randn(2, 10), torch.ones(2), 0, TAU_T)
    with pytest.raises(ValueError, match=r"teacher: expected shape \(2, 10\)"):
        mod(torch.randn(2, 10), torch.randn(3, 10), torch.ones(2), 2, TAU_T)


def _worker(rank, world, init, data, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        masks, S, T, centering = data
        n_crops = masks.shape[0] // world
        sl = slice(rank * n_crops, (rank + 1) * n_crops)
        m, s_all, t_all = masks[sl], S[sl], T[sl]
        mod = iBOTPatchLoss(S.shape[-1], TAU_S, 0.9, centering=centering, backend="torch")
        s = s_all[m].clone().requires_grad_()
        loss = mod(s, t_all[m], masks_weight(m, torch.float64), n_crops, TAU_T)
        loss.backward()
        results[rank] = (loss.detach(), s.grad, mod.center.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_two_ranks_equal_one_process(centering, tmp_path):
    """Two gloo ranks with different numbers of masked tokens: the mean of the rank losses, the
    gradients and the center equal one process on the concatenated batch."""
    masks, S, T = _batch(n_crops=8, N=16, K=64, dtype=torch.float64)
    masks[4:6] = torch.rand(2, 16) < 0.7
    one = iBOTPatchLoss(64, TAU_S, 0.9, centering=centering, backend="torch")
    s = S[masks].clone().requires_grad_()
    loss = one(s, T[masks], masks_weight(masks, torch.float64), 8, TAU_T)
    loss.backward()
    manager = mp.Manager()
    results = manager.dict()
    init = f"file://{tmp_path / 'pg'}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, init, (masks, S, T, centering), results), nprocs=2, join=True)
    l0, g0, c0 = results[0]
    l1, g1, c1 = results[1]
    assert rel((l0 + l1) / 2, loss.detach().float()) < 1e-6
    # DDP averages gradients over ranks: rank r's gradient / 2 is one process's gradient on its rows
    assert rel(torch.cat([g0, g1]) / 2, s.grad) < 1e-10
    assert torch.allclose(c0, c1) and rel(c0, one.center) < 1e-6

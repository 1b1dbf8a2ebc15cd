"""Queue InfoNCE (one negatives matmul and log-sum-exp per student crop) against the official pair
loop of reference/mugs.py, in float64 (1e-10) and float32; the queue is a snapshot and a FIFO ring."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dino_fast.losses import infonce
from dino_fast.losses.infonce import QueueInfoNCE, negatives_logsumexp, queue_infonce_loss
from dino_fast.losses.mugs import mugs_crop_weights
from dino_fast.reference.mugs import infonce_queue_loss_reference, ring_enqueue_reference
from tests._loss_utils import rel


def _unit(n: int, d: int, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1).to(dtype)


@pytest.mark.parametrize("B,d,Kq,ncrops", [(1, 4, 3, 3), (3, 16, 500, 12), (4, 8, 20, 5), (16, 32, 4099, 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_infonce_matches_the_pair_loop(B, d, Kq, ncrops, dtype, monkeypatch):
    # small chunks, so the chunked forward-gradient path runs over several chunks
    monkeypatch.setitem(infonce.CHUNK_BYTES, "cpu", 8 * Kq * 3)
    S, T, Q = _unit(ncrops * B, d, dtype), _unit(2 * B, d, dtype), _unit(Kq, d, dtype)
    s64 = S.detach().clone().double().requires_grad_()
    want = infonce_queue_loss_reference(s64, T.double(), Q.double(), ncrops=ncrops, temperature=0.2)
    (g_want,) = torch.autograd.grad(want, s64)
    s = S.clone().requires_grad_()
    got = queue_infonce_loss(s, T, Q, ncrops=ncrops, temperature=0.2, crop_weights=mugs_crop_weights(ncrops))
    upstream = float(torch.empty(()).uniform_(0.5, 2.0))
    (got * upstream).backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel(got.detach(), want.detach()) < tol
    assert rel(s.grad, upstream * g_want) < tol


def test_negatives_logsumexp_gradient_and_no_queue_gradient():
    y = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: negatives_logsumexp(t, q, 0.3), (y,))
    negatives_logsumexp(y, q, 0.3).sum().backward()
    assert q.grad is None
    with pytest.raises(ValueError, match=r"queue: expected a non-empty \(Kq, 5\) torch.float64 tensor"):
        negatives_logsumexp(y, q[:, :4], 0.3)
    with pytest.raises(ValueError, match=r"temperature must be a positive finite float, got 0.0"):
        negatives_logsumexp(y, q, 0.0)


def test_uniform_default_is_the_mean_over_pairs():
    B, d, ncrops = 2, 6, 4
    S, T, Q = _unit(ncrops * B, d), _unit(2 * B, d), _unit(9, d)
    got = queue_infonce_loss(S, T, Q, ncrops=ncrops, temperature=0.2)
    terms = []
    for t in range(2):
        for s in range(ncrops):
            if s != t:
                terms.append(queue_infonce_loss(torch.cat([S[s * B:(s + 1) * B]] * 2), torch.cat([T[t * B:(t + 1) * B]] * 2),
                                                Q, ncrops=2, n_teacher=2, temperature=0.2))
    assert abs(got.item() - sum(t.item() for t in terms) / len(terms)) < 1e-12


def test_queue_is_a_snapshot_and_a_ring():
    """forward does not touch the queue; enqueue after several steps of uneven sizes leaves the
    queue and pointer of the official ring write."""
    loss = QueueInfoNCE(4, 10, ncrops=3)
    q0 = loss.queue.clone()
    S, T = _unit(6, 4, torch.float32), _unit(4, 4, torch.float32)
    loss(S, T)
    assert torch.equal(loss.queue, q0) and int(loss.queue_ptr) == 0
    ref, ptr = q0.clone(), 0
    for n in (4, 4, 3, 7, 10, 1):
        keys = torch.randn(n, 4)
        loss.enqueue(keys)
        ref, ptr = ring_enqueue_reference(ref, ptr, keys)
        assert torch.equal(loss.queue, ref) and int(loss.queue_ptr) == ptr
    with pytest.raises(ValueError, match=r"keys: expected \(n, 4\) with n <= 10, got \(11, 4\)"):
        loss.enqueue(torch.randn(11, 4))


def test_bad_shapes_are_refused():
    S, T, Q = _unit(6, 4), _unit(4, 4), _unit(5, 4)
    with pytest.raises(ValueError, match=r"teacher: expected shape \(4, 4\) \(n_teacher\*B, d\), got \(3, 4\)"):
        queue_infonce_loss(S, T[:3], Q, ncrops=3, temperature=0.2)
    with pytest.raises(ValueError, match=r"student: rows \(6\) must be a positive multiple of ncrops \(4\)"):
        queue_infonce_loss(S, T, Q, ncrops=4, temperature=0.2)
    with pytest.raises(ValueError, match=r"queue: expected \(Kq, 4\), got \(5, 3\)"):
        queue_infonce_loss(S, T, Q[:, :3], ncrops=3, temperature=0.2)

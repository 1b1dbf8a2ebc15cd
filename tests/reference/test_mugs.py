"""The Mugs references against independent float64 computations of the official definitions:
numpy pair loops, the DINO reference composed with other weights, a Python model of the queue
and memory pointers, brute-force top-k."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_fast.reference.loss import dino_loss_reference
from dino_fast.reference.mugs import (
    group_loss_reference,
    infonce_queue_loss_reference,
    memory_topk_reference,
    memory_write_reference,
    mugs_total_reference,
    ring_enqueue_reference,
)


def _unit(n: int, d: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)


def numpy_infonce(S, T, Q, ncrops, n_teacher, tau):
    """Pair loop in numpy: -log(exp(pos) / (exp(pos) + sum exp(neg))), per row, log-sum-exp by hand."""
    S, T, Q = (np.asarray(x, dtype=np.float64) for x in (S, T, Q))
    B = S.shape[0] // ncrops
    large, small = [], []
    for t in range(n_teacher):
        z = T[t * B:(t + 1) * B]
        for s in range(ncrops):
            if s == t:
                continue
            y = S[s * B:(s + 1) * B]
            logits = np.concatenate([(y * z).sum(1, keepdims=True), y @ Q.T], axis=1) / tau
            m = logits.max(1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
            (large if s < n_teacher else small).append(np.mean(lse - logits[:, 0]))
    return 0.5 * (np.mean(large) + np.mean(small))


@pytest.mark.parametrize("B,d,Kq,ncrops", [(1, 4, 3, 3), (3, 16, 50, 12), (4, 8, 20, 5)])
def test_infonce_reference_matches_numpy_pair_loop(B, d, Kq, ncrops):
    S, T, Q = _unit(ncrops * B, d), _unit(2 * B, d), _unit(Kq, d)
    got = infonce_queue_loss_reference(S, T, Q, ncrops=ncrops, temperature=0.2)
    want = numpy_infonce(S, T, Q, ncrops, 2, 0.2)
    assert abs(got.item() - want) <= 1e-12 * abs(want)


def test_infonce_reference_has_no_in_batch_negatives():
    """Only the queue and an image's own positive enter its logits: the batch loss is the mean of
    the one-image losses (in-batch negatives would couple the images and break this)."""
    B, d, ncrops = 4, 8, 4
    S, T, Q = _unit(ncrops * B, d), _unit(2 * B, d), _unit(10, d)
    whole = infonce_queue_loss_reference(S, T, Q, ncrops=ncrops, temperature=0.2)
    per_image = [infonce_queue_loss_reference(S[b::B], T[b::B], Q, ncrops=ncrops, temperature=0.2)
                 for b in range(B)]
    assert abs(whole.item() - float(sum(per_image)) / B) <= 1e-12 * abs(whole.item())


@pytest.mark.parametrize("B,K,L", [(2, 33, 10), (3, 64, 1), (1, 7, 4)])
def test_group_reference_is_dino_with_mugs_pair_weights(B, K, L):
    """1/2 (mean_large + mean_small) = a L_dino(all crops) + b L_dino(the 2 global crops), with a
    and b solved from the pair counts (2 large pairs, 2L small ones; 0.55 and 0.45 at L = 10)."""
    ncrops = 2 + L
    S = torch.randn(ncrops * B, K, dtype=torch.float64)
    T = torch.randn(2 * B, K, dtype=torch.float64)
    c = 0.1 * torch.randn(1, K, dtype=torch.float64)
    kw = dict(student_temp=0.1, teacher_temp=0.04)
    got = group_loss_reference(S, T, c, ncrops=ncrops, **kw)
    n_all = 2 * ncrops - 2
    a = n_all / (4.0 * L)              # sum_small weight: a / n_all = 1 / (2 * 2L)
    b = 2.0 * (0.25 - a / n_all)       # sum_large weight: a / n_all + b / 2 = 1 / 4
    if L == 10:
        assert abs(a - 0.55) < 1e-15 and abs(b - 0.45) < 1e-15
    want = (a * dino_loss_reference(S, T, c, ncrops=ncrops, **kw)
            + b * dino_loss_reference(S[: 2 * B], T, c, ncrops=2, **kw))
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())


def test_group_reference_needs_local_crops():
    S, T, c = torch.randn(4, 5), torch.randn(4, 5), torch.zeros(5)
    with pytest.raises(ValueError, match="both large and small pairs"):
        group_loss_reference(S, T, c, ncrops=2, student_temp=0.1, teacher_temp=0.04)


def test_total_gates_and_normalises_only():
    ls = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    assert mugs_total_reference(ls, [1, 1, 1]).item() == pytest.approx(7 / 3)
    assert mugs_total_reference(ls, [1, 1, 2]).item() == pytest.approx(7 / 4)  # not 1 + 2 + 8
    assert mugs_total_reference(ls, [0, 1, 1]).item() == pytest.approx(3)
    with pytest.raises(ValueError, match="at least one weight"):
        mugs_total_reference(ls, [0, 0, 0])


def test_ring_enqueue_is_a_fifo_of_the_last_keys():
    K, d = 7, 2
    q = torch.zeros(K, d, dtype=torch.float64)
    ptr, model, counter = 0, deque([0.0] * K, maxlen=K), 0   # 0: never written (keys are >= 1)
    for n in (3, 3, 5, 1, 7, 2, 6):
        keys = torch.arange(counter, counter + n, dtype=torch.float64)[:, None].expand(n, d) + 1
        counter += n
        q, ptr = ring_enqueue_reference(q, ptr, keys)
        model.extend(keys[:, 0].tolist())
        assert ptr == counter % K
        # slot (ptr + j) % K holds the j-th oldest of the last K keys
        assert [q[(ptr + j) % K, 0].item() for j in range(K)] == list(model)


def test_memory_pointer_faithful_writes_half_fixed_writes_all():
    """Constant batches: the official pointer (advancing twice) leaves exactly half the memory
    unwritten; the ring writes all of it. Pointer sequence against a Python model of the official code."""
    K, n, D = 64, 8, 3
    for faithful, frac in ((True, 0.5), (False, 1.0)):
        m = torch.full((K, D), float("nan"), dtype=torch.float64)
        ptr, model = 0, 0
        for step in range(40):
            m, ptr = memory_write_reference(m, ptr, torch.full((n, D), float(step)), faithful_pointer=faithful)
            if model + n - K <= 0:
                model = (model + 2 * n) % K if faithful else (model + n) % K
            else:
                model = model + n - K
            assert ptr == model
        assert (~torch.isnan(m[:, 0])).double().mean().item() == frac


def test_memory_write_filters_weak_rows_after_gathering():
    K, D = 10, 2
    m = torch.zeros(K, D)
    rows = torch.arange(6.0)[:, None].expand(6, D)
    weak = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    m2, ptr = memory_write_reference(m, 8, rows, weak)
    assert ptr == 1 and m2[8, 0] == 0 and m2[9, 0] == 2 and m2[0, 0] == 3   # wrapped
    m3, ptr3 = memory_write_reference(m, 4, rows, torch.zeros(6, dtype=torch.bool))
    assert ptr3 == 4 and torch.equal(m3, m)


def test_memory_topk_matches_brute_force():
    n, K, D, k = 5, 40, 6, 8
    query, mem = torch.randn(n, D, dtype=torch.float64), torch.randn(K, D, dtype=torch.float64) * 3
    idx, nb = memory_topk_reference(query, mem, k)
    for i in range(n):
        cos = [float(query[i] @ mem[j] / (query[i].norm() * mem[j].norm())) for j in range(K)]
        assert idx[i].tolist() == sorted(range(K), key=lambda j: -cos[j])[:k]
        assert torch.equal(nb[i], mem[idx[i]])

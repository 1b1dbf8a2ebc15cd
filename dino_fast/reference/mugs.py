"""Eager reference of the Mugs losses and memory (Zhou et al. 2022), op by op (tests and benchmarks only).

Restated from the semantics of the official code (sail-sg/mugs ``src/loss.py``, ``src/model.py``),
independently of the fast code in :mod:`dino_fast.losses.infonce`, :mod:`dino_fast.losses.mugs` and
:mod:`dino_fast.methods.mugs`. Computed in the input dtype: pass float64 for a ground truth.

Crop layout: ``n_teacher`` teacher crops (2), ``ncrops`` student crops (2 global + L local),
crop-major rows (row ``v*B + b`` is crop ``v`` of image ``b``). A pair is (teacher crop t, student
crop s) with ``s != t``; a pair is "large" when ``s < n_teacher`` (a student global crop) and
"small" otherwise. Every Mugs loss is ``1/2 * (mean over large pairs + mean over small pairs)``.

- :func:`infonce_queue_loss_reference`: instance / local-group discrimination, MoCo-style InfoNCE
  of each pair against a queue of teacher keys (no in-batch negatives), label 0 = the positive.
- :func:`group_loss_reference`: group discrimination, DINO's centered, sharpened soft
  cross-entropy with the Mugs pair weighting.
- :func:`mugs_total_reference`: the official combination (weights gate and normalise only).
- :func:`ring_enqueue_reference`, :func:`memory_write_reference`, :func:`memory_topk_reference`:
  the FIFO queue write, the memory write (with the official double-advancing pointer as an
  option) and the top-k cosine neighbour lookup.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["infonce_queue_loss_reference", "group_loss_reference", "mugs_total_reference",
           "ring_enqueue_reference", "memory_write_reference", "memory_topk_reference"]


def _pairs_mean(losses: dict[tuple[int, int], Tensor], n_teacher: int) -> Tensor:
    large = [v for (t, s), v in losses.items() if s < n_teacher]
    small = [v for (t, s), v in losses.items() if s >= n_teacher]
    if not large or not small:
        raise ValueError(f"the Mugs weighting needs both large and small pairs, got {len(large)} large "
                         f"and {len(small)} small (ncrops must exceed n_teacher, n_teacher >= 2)")
    return 0.5 * (sum(large) / len(large) + sum(small) / len(small))


def infonce_queue_loss_reference(
    student: Tensor, teacher: Tensor, queue: Tensor, *, ncrops: int, temperature: float, n_teacher: int = 2,
) -> Tensor:
    """The official ``InfoNCELoss.forward`` (pair loop, one negatives matmul per pair).

    Args:
        student: ``(ncrops*B, d)`` student predictions (unit rows in Mugs), crop-major.
        teacher: ``(n_teacher*B, d)`` teacher keys (unit rows), crop-major; no gradient.
        queue: ``(Kq, d)`` negative keys (a snapshot taken before this step's keys are enqueued).
        ncrops, n_teacher: crop counts; temperature: tau (0.2 in Mugs).

    Returns:
        0-dim tensor: ``1/2 (mean_large + mean_small)`` of
        ``mean_b CE([y_sb . z_tb, y_sb . queue^T] / tau, label 0)``.
    """
    preds = student.chunk(ncrops)
    targets = teacher.detach().chunk(n_teacher)
    negs = queue.detach()
    losses: dict[tuple[int, int], Tensor] = {}
    for t, z in enumerate(targets):
        for s, y in enumerate(preds):
            if s == t:
                continue
            l_pos = (y * z).sum(-1, keepdim=True)
            l_neg = y @ negs.t()
            logits = torch.cat([l_pos, l_neg], dim=1) / temperature
            labels = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
            losses[(t, s)] = F.cross_entropy(logits, labels)
    return _pairs_mean(losses, n_teacher)


def group_loss_reference(
    student: Tensor, teacher: Tensor, center: Tensor, *, ncrops: int, student_temp: float,
    teacher_temp: float, n_teacher: int = 2,
) -> Tensor:
    """The official ``ClusteringLoss.forward`` loss (no center update).

    Args:
        student: ``(ncrops*B, K)`` student prototype logits; teacher: ``(n_teacher*B, K)``;
        center: ``(1, K)`` or ``(K,)``; student_temp (0.1), teacher_temp (the epoch's value).

    Returns:
        0-dim tensor: ``1/2 (mean_large + mean_small)`` of ``mean_b H(q_tb, p_sb)`` with
        ``q_t = softmax((T_t - c) / tau_t)``, ``log p_s = log_softmax(S_s / tau_s)``.
    """
    logp = F.log_softmax(student / student_temp, dim=-1).chunk(ncrops)
    q = F.softmax((teacher - center.reshape(1, -1)) / teacher_temp, dim=-1).detach().chunk(n_teacher)
    losses = {(t, s): torch.sum(-q[t] * logp[s], dim=-1).mean()
              for t in range(n_teacher) for s in range(ncrops) if s != t}
    return _pairs_mean(losses, n_teacher)


def mugs_total_reference(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """The official combination: the losses whose weight is > 0 are *added unweighted* and the
    sum is divided by the sum of those weights (``main.py``: weights gate and normalise only)."""
    if len(losses) != len(weights):
        raise ValueError(f"expected one weight per loss, got {len(losses)} losses and {len(weights)} weights")
    total, wsum = None, 0.0
    for v, w in zip(losses, weights):
        if w > 0:
            total = v if total is None else total + v
            wsum += w
    if total is None:
        raise ValueError(f"at least one weight must be > 0, got {list(weights)}")
    return total / wsum


@torch.no_grad()
def ring_enqueue_reference(queue: Tensor, ptr: int, keys: Tensor) -> tuple[Tensor, int]:
    """The official ``InfoNCELoss._dequeue_and_enqueue`` on a row-major ``(Kq, d)`` queue: a FIFO
    ring with a correct wrap. Returns ``(new queue, new pointer)`` (the input is not modified)."""
    q = queue.clone()
    K, n = q.shape[0], keys.shape[0]
    if n > K:
        raise ValueError(f"cannot enqueue {n} keys into a queue of {K}")
    if ptr + n <= K:
        q[ptr:ptr + n] = keys
        ptr = (ptr + n) % K
    else:
        first = K - ptr
        q[ptr:] = keys[:first]
        q[: n - first] = keys[first:]
        ptr = n - first
    return q, ptr


@torch.no_grad()
def memory_write_reference(memory: Tensor, ptr: int, rows: Tensor, weak: Optional[Tensor] = None,
                           *, faithful_pointer: bool = False) -> tuple[Tensor, int]:
    """The official ``Block_mem._dequeue_and_enqueue`` on a ``(K, D)`` memory.

    ``rows`` ``(n, D)`` are the (already all-gathered) features; with ``weak`` (bool ``(n,)``, also
    gathered) only the weak rows are written, and nothing when there is none. Without a wrap the
    official pointer advances by twice the number of rows written (``faithful_pointer=True``);
    the correct ring (default) advances once. Returns ``(new memory, new pointer)``.
    """
    m = memory.clone()
    if weak is not None:
        rows = rows[weak.bool()]
        if rows.shape[0] == 0:
            return m, ptr
    K, n = m.shape[0], rows.shape[0]
    if n > K:
        raise ValueError(f"cannot write {n} rows into a memory of {K}")
    rest = ptr + n - K
    if rest <= 0:
        m[ptr:ptr + n] = rows
        ptr = (ptr + 2 * n) % K if faithful_pointer else (ptr + n) % K
    else:
        m[ptr:] = rows[: K - ptr]
        m[:rest] = rows[K - ptr:]
        ptr = rest
    return m, ptr


@torch.no_grad()
def memory_topk_reference(query: Tensor, memory: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The official ``Block_mem._get_similarity_samples``: the ``k`` memory rows most cosine-similar
    to each query row. ``query`` ``(n, D)``, ``memory`` ``(K, D)``. Returns ``(indices (n, k) int64,
    neighbours (n, k, D))`` with the neighbours taken from ``memory`` as stored (not normalised)."""
    sim = F.normalize(query, dim=-1) @ F.normalize(memory, dim=-1).t()
    idx = torch.topk(sim, k, dim=-1).indices
    return idx, memory[idx.reshape(-1)].view(query.shape[0], k, memory.shape[1])

"""InfoNCE against a queue of teacher keys (Mugs' instance and local-group discrimination, MoCo style).

Pairs (teacher crop t, student crop s != t), crop-major rows. For a student row ``y`` and its
teacher key ``z`` (both unit vectors in Mugs), the official loss of a pair is the cross-entropy of
``[y.z, y.Q^T] / tau`` with label 0 (the positive): only the queue ``Q`` supplies negatives (no
in-batch negatives), and the queue is read before this step's keys are enqueued.

What is fused, and why: with ``a = y.z / tau`` and ``n = logsumexp(y.Q^T / tau)``,

    CE([a, negatives], 0) = log(exp(a) + exp(n)) - a = softplus(n - a)        (exact)

``n`` depends on the student row only, so the (rows, Kq) negatives matmul and its log-sum-exp are
computed **once per student crop** (ncrops of them), not once per pair (``n_teacher * ncrops -
n_teacher``, 22 in Mugs, as the official loop does). :func:`negatives_logsumexp` also computes its
gradient ``softmax(y.Q^T / tau) Q / tau`` in the forward, in row chunks of about
``CHUNK_BYTES``, so no (rows, Kq) matrix is kept for the backward (autograd would keep two).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_fast.ops.soft_ce.checks import check_crop_weights, check_int, check_temp

__all__ = ["negatives_logsumexp", "queue_infonce_loss", "QueueInfoNCE", "CHUNK_BYTES"]

# bytes of one (rows, Kq) logits chunk: a few MiB on CPU (cache-resident), larger on GPUs
CHUNK_BYTES = {"cpu": 4 << 20, "other": 256 << 20}


class _NegativesLSE(torch.autograd.Function):
    """lse_r = logsumexp(y_r . Q^T / tau) per row, with d lse / d y computed in the forward."""

    @staticmethod
    def forward(ctx, y: Tensor, queue: Tensor, tau: float) -> Tensor:  # noqa: D102
        rows, Kq = y.shape[0], queue.shape[0]
        budget = CHUNK_BYTES["cpu" if y.device.type == "cpu" else "other"]
        step = max(1, budget // (y.element_size() * max(Kq, 1)))
        lse = torch.empty((rows,), dtype=y.dtype, device=y.device)
        grad = torch.empty_like(y) if ctx.needs_input_grad[0] else None
        qs = queue * (1.0 / tau)
        for r0 in range(0, rows, step):
            logits = y[r0:r0 + step] @ qs.t()                     # (chunk, Kq)
            chunk_lse = torch.logsumexp(logits, dim=1)
            lse[r0:r0 + step] = chunk_lse
            if grad is not None:                                  # softmax in place, then @ Q / tau
                torch.mm(logits.sub_(chunk_lse.unsqueeze(1)).exp_(), qs, out=grad[r0:r0 + step])
        ctx.save_for_backward(grad if grad is not None else y.new_empty((0,)))
        return lse

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * g.unsqueeze(1), None, None


def negatives_logsumexp(y: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """``logsumexp(y @ queue.T / temperature, dim=1)``, differentiable in ``y`` (not in ``queue``).

    Args:
        y: ``(rows, d)`` float32 or float64 student rows.
        queue: ``(Kq, d)`` negative keys, same dtype and device (no gradient flows into it).
        temperature: tau > 0.

    Returns:
        ``(rows,)`` in ``y``'s dtype. The gradient is computed in the forward, chunked over rows,
        so the (rows, Kq) logits are never stored (module doc).
    """
    tau = check_temp("temperature", temperature)
    for name, t in (("y", y), ("queue", queue)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: expected a 2-D float32/float64 tensor, got {t.dtype} {tuple(t.shape)}")
    if queue.shape[1] != y.shape[1] or queue.shape[0] == 0 or queue.dtype != y.dtype or queue.device != y.device:
        raise ValueError(f"queue: expected a non-empty (Kq, {y.shape[1]}) {y.dtype} tensor on {y.device}, got "
                         f"{queue.dtype} {tuple(queue.shape)} on {queue.device}")
    return _NegativesLSE.apply(y, queue.detach(), tau)


def queue_infonce_loss(
    student: Tensor, teacher: Tensor, queue: Tensor, *, ncrops: int, temperature: float, n_teacher: int = 2,
    crop_weights: Optional[Sequence[float]] = None,
) -> Tensor:
    """Queue InfoNCE over the (teacher crop t, student crop s != t) pairs (module doc).

    Args:
        student: ``(ncrops*B, d)`` student predictions, crop-major, any float dtype (computed in
            float32, float64 for float64 input).
        teacher: ``(n_teacher*B, d)`` teacher keys, crop-major (no gradient flows into it).
        queue: ``(Kq, d)`` negatives (a snapshot: enqueue this step's keys after the loss).
        ncrops, n_teacher: crop counts (``1 <= n_teacher <= ncrops``, ncrops >= 2).
        temperature: tau (0.2 in Mugs).
        crop_weights: weight of every pair (t, s != t) by student crop s (Mugs:
            :func:`dino_fast.losses.mugs.mugs_crop_weights`); None: the mean over the pairs.

    Returns:
        0-dim tensor (float32, or float64): ``sum_{t, s != t} w_s mean_b softplus(n_sb - a_tsb)``
        with ``a_tsb = y_sb . z_tb / tau`` and ``n_sb = logsumexp(y_sb . Q^T / tau)``.
    """
    ncrops = check_int("ncrops", ncrops, 2)
    n_teacher = check_int("n_teacher", n_teacher, 1)
    if n_teacher > ncrops:
        raise ValueError(f"n_teacher must be <= ncrops, got n_teacher={n_teacher}, ncrops={ncrops}")
    tau = check_temp("temperature", temperature)
    for name, t in (("student", student), ("teacher", teacher), ("queue", queue)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 2:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 2-D float tensor, got {got}")
    rows, d = student.shape
    if rows == 0 or rows % ncrops:
        raise ValueError(f"student: rows ({rows}) must be a positive multiple of ncrops ({ncrops})")
    B = rows // ncrops
    if tuple(teacher.shape) != (n_teacher * B, d):
        raise ValueError(f"teacher: expected shape ({n_teacher * B}, {d}) (n_teacher*B, d), got {tuple(teacher.shape)}")
    if queue.shape[1] != d:
        raise ValueError(f"queue: expected (Kq, {d}), got {tuple(queue.shape)}")
    w = check_crop_weights(crop_weights, ncrops)
    dt = torch.float64 if student.dtype == torch.float64 else torch.float32
    y = student.to(dt)
    z = teacher.detach().to(dt)
    n = negatives_logsumexp(y, queue.detach().to(dt), tau).view(ncrops, B)          # once per student row
    a = torch.einsum("sbd,tbd->tsb", y.view(ncrops, B, d), z.view(n_teacher, B, d)) / tau
    pair_loss = F.softplus(n.unsqueeze(0) - a).mean(-1)                               # (n_teacher, ncrops)
    s_idx = torch.arange(ncrops, device=y.device)
    t_idx = torch.arange(n_teacher, device=y.device)
    pair = (s_idx.unsqueeze(0) != t_idx.unsqueeze(1)).to(dt)
    if w is None:
        weights = pair / pair.sum()
    else:
        weights = pair * torch.tensor(w, dtype=dt, device=y.device).unsqueeze(0)
    return (pair_loss * weights).sum()


class QueueInfoNCE(nn.Module):
    """A queue InfoNCE loss with its queue as method state (buffers ``queue`` and ``queue_ptr``).

    Args:
        dim: key width d. queue_size: Kq (65536 in Mugs). temperature: tau.
        ncrops, n_teacher: crop counts. crop_weights: per-student-crop pair weights (see
        :func:`queue_infonce_loss`).

    ``forward(student, teacher)`` reads the queue (no update); :meth:`enqueue` writes keys after
    the loss (FIFO ring, correct wrap). The queue starts as unit random rows, as the official one
    (``randn`` normalised per key), drawn from torch's global generator.
    """

    def __init__(self, dim: int, queue_size: int, *, temperature: float = 0.2, ncrops: int, n_teacher: int = 2,
                 crop_weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        dim = check_int("dim", dim, 1)
        queue_size = check_int("queue_size", queue_size, 1)
        self.temperature = check_temp("temperature", temperature)
        self.ncrops = check_int("ncrops", ncrops, 2)
        self.n_teacher = check_int("n_teacher", n_teacher, 1)
        self.crop_weights = check_crop_weights(crop_weights, self.ncrops)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """0-dim loss of ``student (ncrops*B, d)`` against ``teacher (n_teacher*B, d)`` and the queue."""
        return queue_infonce_loss(student, teacher, self.queue, ncrops=self.ncrops, temperature=self.temperature,
                                  n_teacher=self.n_teacher, crop_weights=self.crop_weights)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys (n, d)`` (n <= Kq; already gathered over ranks) at the pointer, wrapping."""
        K, d = self.queue.shape
        if keys.dim() != 2 or keys.shape[1] != d or keys.shape[0] > K:
            raise ValueError(f"keys: expected (n, {d}) with n <= {K}, got {tuple(keys.shape)}")
        n = keys.shape[0]
        ptr = int(self.queue_ptr)
        first = min(n, K - ptr)
        self.queue[ptr:ptr + first] = keys[:first].to(self.queue.dtype)
        if n > first:
            self.queue[: n - first] = keys[first:].to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % K)

    def extra_repr(self) -> str:  # noqa: D102
        return (f"queue_size={self.queue.shape[0]}, dim={self.queue.shape[1]}, temperature={self.temperature}, "
                f"ncrops={self.ncrops}, n_teacher={self.n_teacher}")

"""Sinkhorn-Knopp teacher targets as DINOv2 writes them (its ``sinkhorn_knopp_teacher``),
restated op by op for tests: ``Q = exp(T / tau)`` transposed to (K, rows), normalised by its
total, then per iteration divided by the (all-reduced) prototype sums and K, by the sample sums
and the global sample count; scaled by that count and transposed back. No max subtraction, as
in DINOv2 (so fp32 overflows above ``88 * tau``; use float64 here for a ground truth)."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["sinkhorn_knopp_reference"]


@torch.no_grad()
def sinkhorn_knopp_reference(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """``[rows, K]`` targets (rows sum to 1) from ``[rows, K]`` logits; arithmetic in the input dtype."""
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1] * world
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    if distributed:
        dist.all_reduce(sum_Q)
    Q = Q / sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(sum_of_rows)
        Q = Q / sum_of_rows
        Q = Q / K
        Q = Q / torch.sum(Q, dim=0, keepdim=True)
        Q = Q / B
    Q = Q * B
    return Q.t()

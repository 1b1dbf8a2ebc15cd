"""Centered soft-target cross-entropy over crop pairs (the DINO loss op).

``checks`` (input validation), ``eager`` (CPU fast path), ``kernels`` (Triton kernels and launchers),
``function`` (custom ops, autograd, the functional :func:`dino_loss`).
"""
from dino_fast.ops.soft_ce.function import dino_loss, dino_loss_with_colsum

__all__ = ["dino_loss", "dino_loss_with_colsum"]

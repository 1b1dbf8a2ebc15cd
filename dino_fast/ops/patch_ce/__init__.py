"""Centered soft-target cross-entropy over row-aligned pairs with per-row weights (the iBOT
patch loss op): student row r against teacher row r only.

``checks`` (input validation), ``eager`` (CPU fast path), ``kernels`` (Triton kernels and
launchers), ``function`` (custom ops, autograd, the functional :func:`patch_ce_loss`).
"""
from dino_fast.ops.patch_ce.function import patch_ce_loss, patch_ce_loss_with_colsum

__all__ = ["patch_ce_loss", "patch_ce_loss_with_colsum"]

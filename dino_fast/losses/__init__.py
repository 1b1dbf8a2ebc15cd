"""Losses, one per file, thin modules over :mod:`dino_fast.ops`.

- ``dino``: :class:`DINOLoss`, the official DINO loss (drop-in), fused;
- ``centering``: the EMA teacher center every centering loss shares (:class:`CenterEMA`,
  :func:`update_center`);
- ``koleo``: the KoLeo regulariser of DINOv2;
- ``ibot``: :class:`iBOTPatchLoss`, DINOv2's iBOT masked-patch loss over the fused row-aligned op;
- ``registry``: :data:`LOSSES`, each loss with its float64 definition and an example input (the
  contract test checks every registered loss).
"""
from dino_fast.losses.centering import CenterEMA, update_center
from dino_fast.losses.dino import DINOLoss
from dino_fast.losses.ibot import iBOTPatchLoss, masks_weight
from dino_fast.losses.koleo import koleo_loss

__all__ = ["CenterEMA", "DINOLoss", "iBOTPatchLoss", "koleo_loss", "masks_weight", "update_center"]

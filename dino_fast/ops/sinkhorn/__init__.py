"""Sinkhorn-Knopp teacher targets on the GPU (``kernels``: Triton column / row / output passes;
``function``: the iteration driver with the cross-rank reductions). The CPU path is
:func:`dino_fast.losses.sinkhorn.sinkhorn_knopp_log_targets`'s eager one."""
from dino_fast.ops.sinkhorn.function import sinkhorn_log_targets_triton

__all__ = ["sinkhorn_log_targets_triton"]

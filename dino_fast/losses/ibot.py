"""DINOv2's iBOT masked-patch loss over the fused row-aligned op (:mod:`dino_fast.ops.patch_ce`).

For the masked tokens of the global crops (student rows from the masked crops, teacher rows at
the same positions of the unmasked crops, both after the patch head):

    loss = -(1 / n_crops) sum_{j masked} w_j sum_k t_jk log softmax(s_j / tau_s)_k,
    w_j  = 1 / #masked tokens of j's crop                 (every masked crop weighs the same)

with ``n_crops`` the rank's global crops, masked or not (DINOv2's ``forward_masked``: unmasked
crops count as zero). Teacher targets ``t``: ``softmax((T - c) / tau_t)`` with the loss's own
patch center ``c`` (``centering="center"``), or DINOv2's Sinkhorn-Knopp targets over the masked
tokens of every rank (``"sinkhorn_knopp"``; :func:`dino_fast.losses.sinkhorn.sinkhorn_knopp_log_targets`,
fed to the op as ``log Q`` at temperature 1 with a zero center; the center is then unused).

Center update (center mode), after the loss: ``c <- m c + (1 - m) * sum(T_masked) / n_masked``,
the column sum from the fused op and the masked count all-reduced together over ranks: the mean
over the **global** batch's masked tokens. DINOv2 instead averages the per-rank means, which
differs when ranks hold different numbers of masked tokens; the global mean keeps 2 ranks = 1
process. Synchronous (no async variant).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dino_fast.losses.centering import apply_center
from dino_fast.losses.sinkhorn import sinkhorn_knopp_log_targets
from dino_fast.ops.backend import check_backend
from dino_fast.ops.patch_ce.function import patch_ce_loss_with_colsum
from dino_fast.ops.soft_ce.checks import check_int, check_temp
from dino_fast.ops.soft_ce.eager import Workspace

__all__ = ["iBOTPatchLoss", "masks_weight"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def masks_weight(masks: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-token weights ``1 / #masked(crop)`` of the masked tokens, ``[n_masked]`` in ``dtype``,
    in the order of ``masks.flatten().nonzero()`` (crop-major, then patch); ``masks`` bool
    ``[n_crops, N]``."""
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.dim() != 2:
        got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"masks: expected a bool [n_crops, N] tensor, got {got}")
    per_crop = 1.0 / masks.sum(1).clamp(min=1).to(dtype)
    return per_crop.unsqueeze(1).expand(masks.shape)[masks]


class iBOTPatchLoss(nn.Module):
    """The iBOT patch loss with its own center (a ``(1, out_dim)`` fp32 buffer ``center``).

    Args:
        out_dim: K, the patch head's prototypes.
        student_temp: tau_s (DINOv2: 0.1). center_momentum: m of the patch center EMA (0.9).
        centering: ``"center"`` or ``"sinkhorn_knopp"``.
        backend: the op's backend (``auto | triton | torch | cpu | reference``).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 centering: str = "center", backend: str = "auto") -> None:
        super().__init__()
        out_dim = check_int("out_dim", out_dim, 1)
        self.student_temp = check_temp("student_temp", student_temp)
        if isinstance(center_momentum, bool) or not isinstance(center_momentum, (int, float)) \
                or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be a float in [0, 1], got {center_momentum!r}")
        self.center_momentum = float(center_momentum)
        if centering not in ("center", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn_knopp', got {centering!r}")
        self.centering = centering
        self.backend = check_backend(backend)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._workspace = Workspace()

    def forward(self, student_masked: Tensor, teacher_masked: Tensor, weights: Tensor, n_crops: int,
                teacher_temp: float) -> Tensor:
        """Loss of one step (0-dim fp32), then the center update (center mode).

        Args:
            student_masked: ``[n_masked, K]`` student patch-head logits of the masked tokens
                (fp32/bf16/fp16); the gradient flows into it.
            teacher_masked: ``[n_masked, K]`` teacher patch-head logits at the same positions.
            weights: ``[n_masked]`` per-token ``1 / #masked(crop)`` (:func:`masks_weight`).
            n_crops: this rank's number of global crops (masked or not), >= 1.
            teacher_temp: tau_t > 0.

        Raises:
            ValueError: shapes, dtypes, temperatures (from the op), ``n_crops < 1``, or no masked
                token on a rank in Sinkhorn-Knopp mode under a process group (the iterations'
                all-reduces need every rank).
        """
        n_crops = check_int("n_crops", n_crops, 1)
        tau_t = check_temp("teacher_temp", teacher_temp)
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights: expected a torch.Tensor, got {type(weights).__name__}")
        wdt = torch.float64 if torch.float64 in (weights.dtype, student_masked.dtype) else torch.float32
        w = weights.detach().to(wdt) / n_crops
        T = teacher_masked.detach()
        K = self.center.shape[1]
        if self.centering == "sinkhorn_knopp":
            if T.shape[0] == 0:
                if _distributed():
                    raise ValueError("sinkhorn_knopp iBOT targets need at least one masked token on every rank "
                                     "(the iterations all-reduce over ranks); got none on this rank")
                return student_masked.sum() * 0.0
            logq = sinkhorn_knopp_log_targets(T, tau_t)
            zero = torch.zeros(K, dtype=torch.float32, device=T.device)
            loss, _ = patch_ce_loss_with_colsum(student_masked, logq, zero, w, student_temp=self.student_temp,
                                                teacher_temp=1.0, backend=self.backend, with_colsum=False,
                                                workspace=self._workspace)
            return loss.float()
        loss, colsum = patch_ce_loss_with_colsum(student_masked, T, self.center, w, student_temp=self.student_temp,
                                                 teacher_temp=tau_t, backend=self.backend, with_colsum=True,
                                                 workspace=self._workspace)
        self._update_center(colsum, T.shape[0])
        return loss.float()

    @torch.no_grad()
    def _update_center(self, colsum: Tensor, rows: int) -> None:
        """``c <- m c + (1 - m) sum / count`` over every rank's masked tokens (one all-reduce of
        ``[colsum, count]``); no change when no rank has a masked token."""
        buf = torch.cat([colsum.detach().to(torch.float64).reshape(-1),
                         torch.tensor([float(rows)], dtype=torch.float64, device=colsum.device)])
        if _distributed():
            dist.all_reduce(buf)
        count = float(buf[-1])
        if count > 0:
            apply_center(self.center, buf[:-1], count, self.center_momentum)

    def extra_repr(self) -> str:  # noqa: D102
        return (f"out_dim={self.center.shape[1]}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, centering={self.centering!r}, backend={self.backend!r}")

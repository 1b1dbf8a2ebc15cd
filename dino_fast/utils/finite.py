"""Finite checks shared by the losses, the EMA and the trainer: one read, no host sync.

:func:`all_finite` answers "is every element finite?" as a device tensor; :func:`check_finite`
names the crop, row and column of the first NaN/inf (it syncs, and is meant for error paths).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["NonFiniteError", "all_finite", "check_finite"]

TensorOrCrops = Union[Tensor, Sequence[Tensor]]


class NonFiniteError(ValueError):
    """An input of the loss holds NaN or inf (raised only with ``check_finite=True``)."""



def all_finite(*tensors: Tensor) -> Tensor:
    """0-dim bool tensor on the tensors' device: True when no element is NaN or +-inf.

    Args:
        tensors: floating tensors of any shape and dtype, on one device (empty ones are finite).

    One read of each tensor and no temporary as large as it: ``torch.aminmax`` (min and max
    propagate NaN and hold +-inf), then ``isfinite`` over the 2 extremes per tensor. No host
    sync (call ``bool()`` on the result to get a Python bool). ``isfinite(x).all()`` instead runs
    5 eager kernels over x (abs, ne, eq, mul, all) and writes temporaries of x's size.
    """
    ok = [torch.isfinite(torch.stack(torch.aminmax(t.detach().reshape(-1)))) for t in tensors if t.numel()]
    if not ok:  # (extremes are tested in their own dtype: a float64 max must not overflow a cast)
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
    return torch.cat(ok).all()



def check_finite(x: TensorOrCrops, name: str, rows_per_crop: int) -> None:
    """Raise :class:`NonFiniteError` naming the crop and row of the first NaN/inf in ``x``.

    Args:
        x: a (rows, ...) tensor, crop-major with ``rows_per_crop`` rows per crop, or a list of
            per-crop tensors (concatenated along rows).
        name: what ``x`` is, for the message.
        rows_per_crop: rows of one crop (B), >= 1.
    """
    if bool(all_finite(*(list(x) if isinstance(x, (list, tuple)) else [_cat_rows(x, name)]))):
        return  # one read; the element-wise scan below runs only when something is non-finite
    crops = list(x) if isinstance(x, (list, tuple)) else None
    full = _cat_rows(x, name) if crops is None else None
    tensors = crops if crops is not None else [full]
    offset = 0
    for t in tensors:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0, 0]) + offset
            crop, image = divmod(row, rows_per_crop)
            col = int(bad[row - offset].nonzero()[0, 0])
            raise NonFiniteError(f"{name} has a non-finite value ({t[row - offset, col].item()}) at crop {crop}, "
                                 f"row {image} of that crop (global row {row}, column {col})")
        offset += t.shape[0]




def _cat_rows(x: TensorOrCrops, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
        return torch.cat(list(x), dim=0)
    raise TypeError(f"{name}: expected a torch.Tensor or a non-empty list of tensors, got {type(x).__name__}")

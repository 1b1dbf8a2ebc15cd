"""Buffers of the CPU fast paths recycled between calls (:class:`Workspace`)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Workspace"]


def _storage_use_count(st: torch.UntypedStorage) -> int:
    """References to a storage (tensors and storage objects); 2**31 when torch cannot say."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    return int(fn(st._cdata)) if fn is not None else 2**31


class Workspace:
    """Buffers of the eager fast path recycled between calls (CPU only; CUDA has its own cache).

    A fresh (ncrops*B, K) gradient costs page faults on its first write (about 25 ms for 84 MB
    on the benchmark machine, as much as the loss's arithmetic). A workspace keeps the storage
    of the last gradient it handed out and hands it out again only when no tensor refers to it
    any more (storage use count 1: just the workspace), so a gradient still held by the caller
    (e.g. a leaf's ``.grad``) is never overwritten. :class:`DINOLoss` owns one.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._storages: dict[str, torch.UntypedStorage] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape``/``dtype`` on ``device`` (uninitialised)."""
        if not self.enabled or device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        st = self._storages.get(name)
        if st is not None and st.nbytes() == nbytes and _storage_use_count(st) == 1:
            return torch.empty((0,), dtype=dtype, device=device).set_(st, 0, tuple(shape))
        t = torch.empty(shape, dtype=dtype, device=device)
        self._storages[name] = t.untyped_storage()
        return t

    def clear(self) -> None:
        """Drop every cached buffer."""
        self._storages.clear()

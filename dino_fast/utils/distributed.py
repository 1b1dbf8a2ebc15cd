"""Distributed helpers: torchrun environment, process group set-up, rank queries.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process, on one
node or several; :func:`init_distributed` reads them. Without them the run is a single process
and no process group is created.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the only rank that writes checkpoints and logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is active."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from e


def init_distributed(backend: str = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment variables, if present.

    Args:
        backend: "auto" (nccl when CUDA is available, gloo otherwise), "nccl" or "gloo".
        timeout_s: collective timeout.

    Returns:
        :class:`DistInfo` for this process; CUDA device ``cuda:LOCAL_RANK`` when CUDA is available.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("dist backend 'nccl' needs CUDA devices; use 'gloo' on CPU")
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def is_dist() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Barrier across ranks (no-op in a single process)."""
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (returns ``t`` itself in a single process). Any shape/dtype."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


@torch.no_grad()
def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` ``[n, ...]`` over ranks along dim 0, rank-major (rank 0's rows first); no
    gradient. Every rank must pass the same shape. Returns ``t`` itself in a single process."""
    if not is_dist():
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Broadcast a picklable object from ``src`` to every rank (identity in a single process)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if is_dist():
        dist.destroy_process_group()

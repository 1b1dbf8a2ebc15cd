"""Helpers for multi-process tests: a free TCP port and a bounded spawn of N ranks."""
from __future__ import annotations

import socket
import time
from typing import Any, Callable, Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT`` / ``tcp://`` init)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn: Callable[..., Any], args: Sequence[Any], nprocs: int, timeout_s: float, what: str) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes and wait at most ``timeout_s``
    seconds: an AssertionError naming ``what`` when they have not finished by then (a rank stuck
    in a collective), the worker's exception when one raises; every process still alive is
    killed on the way out, so a hung rank never outlives the test."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=tuple(args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"{what} did not finish in {timeout_s:.0f} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)

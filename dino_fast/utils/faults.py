"""Test-only fault injection.

Fault injection (tests only): the environment variable ``DINO_FAST_FAULT=<point>:<iteration>``
makes :func:`fault_point` kill the process with SIGKILL when the trainer reaches ``<point>`` at
``<iteration>`` (0-based training iteration). Points:

- ``data_loading``: inside the loader, while the batch of that iteration is being fetched;
- ``mid_iteration``: after the backward pass, before the optimizer step;
- ``before_ema``: after the optimizer step, before the teacher EMA update;
- ``checkpoint_write``: inside :func:`dino_fast.utils.checkpoint.atomic_save` of the checkpoint written after that
  iteration (``obj["iteration"] == iteration + 1``), when half of its bytes are on disk;
- ``after_checkpoint``: right after that checkpoint was renamed into place.

Unset (the normal case) it costs one dictionary lookup per call.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

__all__ = ["FAULT_ENV", "FAULT_POINTS", "fault_point"]

FAULT_ENV = "DINO_FAST_FAULT"
FAULT_POINTS = ("data_loading", "mid_iteration", "before_ema", "checkpoint_write", "after_checkpoint")


def _parse_fault(raw: str) -> tuple[str, int]:
    point, sep, it = raw.partition(":")
    if not sep or point not in FAULT_POINTS or not it.strip().isdigit():
        raise ValueError(f"{FAULT_ENV} must be '<point>:<iteration>' with point one of {', '.join(FAULT_POINTS)} "
                         f"and iteration an int >= 0, got {raw!r}")
    return point, int(it)


def fault_point(point: str, iteration: Optional[int]) -> None:
    """Test-only fault injection: SIGKILL this process if ``DINO_FAST_FAULT`` is ``point:iteration``.

    Args:
        point: one of :data:`FAULT_POINTS`.
        iteration: the training iteration (int) the caller is at; None never matches.

    Raises:
        ValueError: ``DINO_FAST_FAULT`` is set but malformed.
    """
    raw = os.environ.get(FAULT_ENV)
    if not raw or iteration is None:
        return
    want_point, want_it = _parse_fault(raw)
    if want_point == point and want_it == int(iteration):
        os.kill(os.getpid(), signal.SIGKILL)

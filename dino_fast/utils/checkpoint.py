"""Atomic checkpoints: write to a temporary file, fsync, rename, fsync the folder.

A kill at any moment leaves either the previous checkpoint or the new one, never a torn file;
a full disk during the write raises :class:`CheckpointError` (naming the file and the OS error)
and leaves the previous checkpoint intact.

Fault points (tests only) are in :mod:`dino_fast.utils.faults`.
"""
from __future__ import annotations

import errno
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from dino_fast.utils.faults import FAULT_ENV, FAULT_POINTS, fault_point  # noqa: F401 (re-exported)

CHECKPOINT_NAME = "checkpoint.pth"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: truncated, corrupt, or from another configuration."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (full disk, I/O error); the previous checkpoint is intact.

    Both a :class:`CheckpointError` and an :class:`OSError` (``errno`` is the original one).
    """


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """Serialise ``obj`` with ``torch.save`` to ``path`` atomically.

    The bytes are written to a temporary file in the same folder, flushed and fsynced, then
    renamed over ``path`` (atomic on POSIX) and the folder is fsynced. On any error the temporary
    file is removed and the previous ``path`` is untouched.

    Raises:
        CheckpointWriteError: the write failed with an OS error (a full disk, ENOSPC, included); the
            message names the file, says the previous one is intact, and chains the OSError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    fault_it = None
    if FAULT_ENV in os.environ and isinstance(obj, dict) and isinstance(obj.get("iteration"), int):
        fault_it = obj["iteration"] - 1  # the checkpoint written after iteration `it` holds it + 1
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if fault_it is not None:
                f.flush()
                os.fsync(f.fileno())
                fault_point("checkpoint_write", fault_it)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "an OS error"
            kept = f"the previous {path.name} is intact" if path.exists() else "no previous checkpoint existed"
            err = CheckpointWriteError(f"could not write checkpoint {path} ({len(data)} bytes): {what} ({e}); {kept}")
            err.errno = e.errno
            raise err from e
        raise
    _fsync_dir(path.parent)
    fault_point("after_checkpoint", fault_it)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save`, with a clear error when it is unusable.
    With ``mmap`` the tensors are memory-mapped rather than read (for a look at the config or
    counters of a large checkpoint).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated/corrupt or is not a dino-fast checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # truncated zip, pickle error, ...
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) cannot be read, it is truncated or corrupt: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(ckpt, dict) or "student" not in ckpt:
        raise CheckpointError(f"{path} is not a dino-fast training checkpoint (no 'student' entry)")
    return ckpt


def find_latest(output_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from in ``output_dir`` (``checkpoint.pth``), or None."""
    p = Path(output_dir) / CHECKPOINT_NAME
    return p if p.is_file() else None


def resume_path(mode: str, output_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``train.resume`` names: ``"none"`` -> None, ``"auto"`` -> :func:`find_latest`
    in ``output_dir`` (None when there is none), anything else -> that path (not checked here)."""
    if mode == "none":
        return None
    return find_latest(output_dir) if mode == "auto" else Path(mode)


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed mid-way left in ``output_dir``
    (``.checkpoint*.pth.*.tmp``; a killed write never touches the checkpoint itself).

    Call it only when no other process is writing checkpoints there (rank 0, before training).
    Returns the removed paths.
    """
    removed = []
    for p in Path(output_dir).glob(".checkpoint*.pth.*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:  # pragma: no cover - removed concurrently
            pass
    return removed


def numbered_name(epoch: int) -> str:
    """File name of the numbered copy kept every ``saveckp_freq`` epochs."""
    return f"checkpoint{epoch:04d}.pth"


def list_numbered(output_dir: str | Path) -> list[Path]:
    """Numbered checkpoints in ``output_dir``, oldest first."""
    pat = re.compile(r"checkpoint(\d{4,})\.pth$")
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint*.pth")
             if (m := pat.match(p.name))]
    return [p for _, p in sorted(found)]


def check_state_dict_compatible(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` naming the first mismatched key/shape between a model and a
    state dict (a checkpoint from another architecture)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{what} in the checkpoint does not match this model: "
            f"{len(missing)} missing keys (first: {missing[:3]}), {len(unexpected)} unexpected "
            f"(first: {unexpected[:3]}); was it written with another model.arch / patch_size / out_dim?"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{what} key {k!r}: checkpoint has shape {tuple(state[k].shape)}, the model expects "
                f"{tuple(v.shape)}; was it written with another architecture?"
            )

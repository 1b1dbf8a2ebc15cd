"""Atomic checkpoint writes: never torn, full disk leaves the previous one, truncated files and
other architectures are reported clearly."""
import errno
import os

import pytest
import torch
from torch import nn

from dino_fast.utils import checkpoint as ck


def _state(v: float) -> dict:
    return {"student": {"w": torch.full((64, 64), v)}, "epoch": int(v)}


def test_round_trip(tmp_path):
    p = ck.atomic_save(_state(3.0), tmp_path / "checkpoint.pth")
    got = ck.load_checkpoint(p)
    assert got["epoch"] == 3 and torch.equal(got["student"]["w"], torch.full((64, 64), 3.0))
    assert ck.find_latest(tmp_path) == p
    assert [x.name for x in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary left


def test_resume_path_and_a_memory_mapped_look(tmp_path):
    """train.resume's three forms, one rule for the trainer and the budget; mmap=True gives the
    same contents without reading the tensors up front."""
    assert ck.resume_path("auto", tmp_path) is None and ck.resume_path("none", tmp_path) is None
    p = ck.atomic_save(_state(2.0), tmp_path / "checkpoint.pth")
    assert ck.resume_path("auto", tmp_path) == p and ck.resume_path("none", tmp_path) is None
    assert ck.resume_path(str(tmp_path / "other.pth"), tmp_path) == tmp_path / "other.pth"  # not checked here
    got = ck.load_checkpoint(p, mmap=True)
    assert got["epoch"] == 2 and torch.equal(got["student"]["w"], torch.full((64, 64), 2.0))


def test_full_disk_keeps_previous(tmp_path, monkeypatch):
    p = ck.atomic_save(_state(1.0), tmp_path / "checkpoint.pth")
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        ck.atomic_save(_state(2.0), p)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert ck.load_checkpoint(p)["epoch"] == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_truncated_file_is_reported(tmp_path):
    p = ck.atomic_save(_state(1.0), tmp_path / "checkpoint.pth")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.load_checkpoint(p)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "x.pth"
    torch.save({"model": 1}, p)
    with pytest.raises(ck.CheckpointError, match="not a dino-fast training checkpoint"):
        ck.load_checkpoint(p)
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.pth")


def test_architecture_mismatch_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    other = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2)).state_dict()
    with pytest.raises(ck.CheckpointError, match="key '0.weight': checkpoint has shape"):
        ck.check_state_dict_compatible(model, other, "student")
    with pytest.raises(ck.CheckpointError, match="missing keys"):
        ck.check_state_dict_compatible(model, {"0.weight": torch.zeros(8, 4)}, "student")


def test_numbered_listing(tmp_path):
    for e in (20, 3, 100):
        ck.atomic_save(_state(e), tmp_path / ck.numbered_name(e))
    assert [p.name for p in ck.list_numbered(tmp_path)] == ["checkpoint0003.pth", "checkpoint0020.pth",
                                                             "checkpoint0100.pth"]

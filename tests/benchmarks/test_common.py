"""The measurement tools of bench/common.py count what they claim to count."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import common  # noqa: E402
from tests import _triton_fixtures as fx  # noqa: E402


def test_count_triton_traffic_counts_active_lanes_only():
    n = int(torch.randint(1, 5000, ()).item())
    x = torch.randn(n)
    y = torch.full((n,), float("nan"))
    block = 256
    grid = ((n + block - 1) // block,)
    stats = common.count_triton_traffic(lambda: fx.scale2[grid](x, y, n, BLOCK=block))
    assert stats == {"bytes_loaded": 4 * n, "bytes_stored": 4 * n, "launches": 1, "bytes": 8 * n}
    torch.testing.assert_close(y, 2 * x)


def test_count_aten_bytes_inputs_plus_outputs():
    x = torch.randn(123, 7)
    stats = common.count_aten_bytes(lambda: (x * 2).exp())
    # mul reads x, writes t; exp reads t, writes u: 4 tensors of 123*7 fp32.
    assert stats["bytes"] == 4 * 123 * 7 * 4
    assert stats["ops"] == {"mul": 1, "exp": 1}


def test_peak_cpu_memory_sees_temporaries():
    a = torch.randn(512, 512)
    nb = a.numel() * 4
    peak = common.peak_cpu_memory(lambda: ((a * 2) + 1).sum())
    # a*2 and (a*2)+1 are alive together for a moment: 2 * nb (plus the 4-byte sum).
    assert 2 * nb <= peak <= 2 * nb + 64


def test_time_cpu_reports_ordered_stats():
    st = common.time_cpu(lambda: torch.randn(64, 64) @ torch.randn(64, 64), repeats=3, warmup=1)
    assert st["repeats"] == 3
    assert 0 < st["min_s"] <= st["median_s"] <= st["max_s"]


def test_projected_seconds():
    assert common.projected_seconds(3.0e12) == pytest.approx(1.0)

"""bench/loss.py's comparison with torch.compile: the bars read the rows they are given."""
from __future__ import annotations

from bench import loss as bloss


def _rows(ours32: float, peer32: float, ours16: float, peer16: float) -> list[dict]:
    rows = []
    for dtype, ours, peer in (("float32", ours32, peer32), ("bfloat16", ours16, peer16)):
        rows += [dict(dtype=dtype, formulation="dino-fast", median_ms=ours, min_ms=ours / 1.1, median_over_min=1.1),
                 dict(dtype=dtype, formulation="official compiled", median_ms=peer, min_ms=peer, median_over_min=1.0),
                 dict(dtype=dtype, formulation="DINOv2 composition compiled", median_ms=peer * 2, min_ms=peer,
                      median_over_min=2.0),
                 dict(dtype=dtype, formulation="official eager", median_ms=peer / 10, min_ms=1, median_over_min=1.0)]
    return rows


def test_bars_use_the_best_compiled_peer_only() -> None:
    bars = bloss._compiled_bars(_rows(10.0, 16.0, 9.0, 12.0))
    assert bars["vs_best_compiled_peer_B32_2+8_float32"]["value"] == 1.6  # eager peers are not compiled peers
    assert bars["vs_best_compiled_peer_B32_2+8_float32"]["met"]
    assert not bars["vs_best_compiled_peer_B32_2+8_bfloat16"]["met"]  # 12 / 9 < 1.5
    assert bars["median_over_best_B32_2+8_float32"]["met"] and bars["bf16_over_fp32_median_B32_2+8"]["met"]
    assert not bloss._compiled_bars(_rows(10.0, 16.0, 11.0, 20.0))["bf16_over_fp32_median_B32_2+8"]["met"]

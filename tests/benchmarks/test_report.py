"""bench/report.py renders plots and the README section from result JSONs; every number in the
generated markdown comes from the JSON (checked on small synthetic results with random values)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench import report

PHASES = report.PHASES


def _r(rng: random.Random, lo: float, hi: float) -> float:
    return rng.uniform(lo, hi)


def _synthetic(rng: random.Random) -> dict[str, dict]:
    step_rows = []
    for model in ("vit_tiny", "vit_small"):
        ref = {p: _r(rng, 0.01, 2.0) for p in PHASES}
        ours = {p: _r(rng, 0.01, 2.0) for p in PHASES}
        ref["total"], ours["total"] = sum(ref.values()), sum(ours.values())
        sp = _r(rng, 0.5, 3.0)
        step_rows.append({
            "model": model, "setup": f"{model}/16 B=2 2x224+8x96 K=65536", "reference": ref, "ours": ours,
            "phase_speedup": {p: ref[p] / ours[p] for p in PHASES}, "speedup": sp,
            "speedup_min_max": [sp * 0.9, sp * 1.1], "images_per_s_reference": 2 / ref["total"],
            "images_per_s_ours": 2 / ours["total"], "reference_attention": "math", "ours_attention": "sdpa",
            "reference_optimizer": "AdamW default", "ours_optimizer": "AdamW fused",
            "optimizer_variants_s": {"default": _r(rng, 0.1, 1), "fused": _r(rng, 0.01, 0.1), "apex": "apex not installed"},
            "first_loss_reference": _r(rng, 5, 11), "first_loss_ours": _r(rng, 5, 11),
            "speedup_ceiling_if_forward_backward_unchanged": _r(rng, 1, 2), "rounds": 3,
        })
    vs = step_rows[1]["speedup"]
    sweep = [{"axis": "K", "B": 8, "K": k, "ref_ms": _r(rng, 10, 900), "ours_ms": _r(rng, 1, 90),
              "speedup": _r(rng, 2, 9), "ref_MiB": _r(rng, 10, 500), "ours_MiB": _r(rng, 1, 20)}
             for k in (4096, 16384, 65536)]
    sweep += [{"axis": "B", "B": b, "K": 65536, "ref_ms": _r(rng, 10, 900), "ours_ms": _r(rng, 1, 90),
               "speedup": _r(rng, 2, 9), "ref_MiB": _r(rng, 10, 500), "ours_MiB": _r(rng, 1, 20)} for b in (4, 8, 16)]
    machine = {"cpu_model": "Test CPU", "cpu_count": 2, "torch": "2.13.0+cpu", "threads": 2}
    return {
        "step": {"name": "step", "timestamp": "2026-01-01T00:00:00+00:00", "machine": machine, "quick": True,
                 "device": "cpu", "apex": "apex not installed", "rows": step_rows, "loadavg_1_5_15": [1.25, 1, 1],
                 "bars": {"step_speedup_vit_small_cpu": {"value": vs, "bar": 1.5, "met": vs >= 1.5}}},
        "loss": {"name": "loss", "timestamp": "2026-01-01T00:00:00+00:00", "machine": machine, "quick": True,
                 "K": 65536, "cpu_time": [{"B": 32, "crops": "2+8", "dtype": "float32", "ref_ms": _r(rng, 50, 150),
                                           "ours_ms": _r(rng, 5, 20), "speedup": _r(rng, 3, 9)}],
                 "memory": [{"B": 32, "crops": "2+8", "dtype": "float32", "ref_MiB": _r(rng, 100, 400),
                             "ours_MiB": _r(rng, 1, 20), "ratio": _r(rng, 0.01, 0.2)}],
                 "bytes": [{"B": 64, "crops": "2+10", "dtype": "float32", "floor_MB": 436.2, "ref_MB": _r(rng, 5000, 8000),
                            "triton_MB": _r(rng, 500, 700), "triton_x_floor": _r(rng, 1, 2),
                            "ref_over_triton": _r(rng, 8, 20), "projected_h100_ref_ms": _r(rng, 1, 3),
                            "projected_h100_triton_ms": _r(rng, 0.1, 0.3)}],
                 "sweep": sweep, "cuda": [],
                 "bars": {"cpu_speedup": {"value": 6.5, "bar": 4.0, "met": True},
                          "memory_ratio": {"value": 0.25, "bar": 0.1, "met": False}}},
        "ema": {"name": "ema", "timestamp": "2026-01-01T00:00:00+00:00", "machine": machine, "quick": True,
                "bar_vit_s": 8.0, "verdict_vit_s": "FAIL",
                "rows": [{"model": m, "params": n, "tensors": 158, "cpu_reference_ms": _r(rng, 20, 60),
                          "cpu_foreach_lerp_ms": _r(rng, 4, 12), "cpu_ours_ms": _r(rng, 4, 12),
                          "cpu_copy_floor_ms": _r(rng, 3, 10), "cpu_speedup_vs_reference": _r(rng, 2, 7),
                          "launches_reference": 474, "launches_ours_triton": 1, "triton_B_per_param": 12.0,
                          "projected_h100_reference_us": _r(rng, 200, 700), "projected_h100_ours_us": _r(rng, 100, 400),
                          "cuda": "no GPU", "apex": "apex not installed"}
                         for m, n in (("vit_small16+head", 44017792), ("vit_base16+head", 108937216))]},
        "loader": {"name": "loader", "timestamp": "2026-01-01T00:00:00+00:00", "machine": machine,
                   "config": {"images": 64, "batch_size": 32, "workers": 2, "quick": True},
                   "rows": [{"loader": n, "images": 64, "median_epoch_s": _r(rng, 0.5, 9),
                             "images_per_s": _r(rng, 5, 700), "vs_reference": _r(rng, 0.1, 12)}
                            for n in ("reference", "folder", "ffcv")],
                   "bar": {"metric": "ffcv images/s / reference", "target": 3.0, "value": 3.5, "met": True},
                   "notes": ["a note from the loader"]},
        # attention.json deliberately absent: reported as not run
    }


@pytest.fixture()
def results_dir(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    rng = random.Random()
    docs = _synthetic(rng)
    d = tmp_path / "results"
    d.mkdir()
    for name, doc in docs.items():
        (d / f"{name}.json").write_text(json.dumps(doc))
    return d, docs


def _readme(tmp_path: Path) -> Path:
    p = tmp_path / "README.md"
    p.write_text(f"# title\n\nbefore\n\n{report.BEGIN}\nold hand-typed text 999.99\n{report.END}\n\nafter\n")
    return p


def test_markdown_holds_every_number(results_dir, tmp_path: Path) -> None:
    d, docs = results_dir
    readme = _readme(tmp_path)
    out = report.generate(d, readme, plots=False)
    md = out["markdown"]
    for r in docs["step"]["rows"]:
        for side in ("reference", "ours"):
            for p in PHASES + ("total",):
                assert report.fmt(r[side][p] * 1e3) in md
            assert report.fmt(r[f"images_per_s_{side}"]) in md
        assert report.fmt(r["speedup"]) in md
        assert f"{r['first_loss_reference']:.6f}" in md and f"{r['first_loss_ours']:.6f}" in md
    for key in ("cpu_time", "memory", "bytes", "sweep"):
        for r in docs["loss"][key]:
            for k, v in r.items():
                if isinstance(v, float):
                    assert report.fmt(v) in md, (key, k, v)
    for r in docs["ema"]["rows"]:
        for k in ("cpu_reference_ms", "cpu_ours_ms", "cpu_speedup_vs_reference", "projected_h100_ours_us"):
            assert report.fmt(r[k]) in md
        assert str(r["params"]) in md
    for r in docs["loader"]["rows"]:
        assert report.fmt(r["images_per_s"]) in md
    assert "a note from the loader" in md
    # bars: met / not met as in the JSON, with the step bar's measured value
    vs = docs["step"]["bars"]["step_speedup_vit_small_cpu"]
    line = next(l for l in md.splitlines() if "step_speedup_vit_small_cpu" in l)
    assert report.fmt(vs["value"]) in line and ("**MET**" in line) == vs["met"]
    mem_line = next(l for l in md.splitlines() if "memory_ratio" in l)
    assert "**NOT MET**" in mem_line and "<= 0.1" in mem_line and "0.25" in mem_line
    assert ">= 4" in next(l for l in md.splitlines() if "| cpu_speedup |" in l)
    assert "**NOT MET**" in next(l for l in md.splitlines() if "cpu_speedup_vs_reference (vit_small16+head)" in l)
    assert "attention: not run" in md
    assert "projected" in md and "python -m bench.step" in md and "python -m bench.loss" in md
    # the README: region replaced, the rest kept, idempotent
    text = readme.read_text()
    assert "old hand-typed text" not in text and text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert md in text
    assert report.generate(d, readme, plots=False)["readme_changed"] is False


def test_fmt() -> None:
    assert report.fmt(1234.56) == "1235"
    assert report.fmt(12.345) == "12.3"
    assert report.fmt(0.012345) == "0.0123"
    assert report.fmt(7) == "7"
    assert report.fmt(True) == "yes"
    assert report.fmt("x") == "x"
    assert report.fmt(float("inf")) == "inf"


def test_plots_written(results_dir, tmp_path: Path) -> None:
    d, _ = results_dir
    readme = _readme(tmp_path)
    out = report.generate(d, readme, plots=True)
    names = sorted(Path(p).name for p in out["plots"])
    assert names == ["ema.png", "loader.png", "loss.png", "step.png"]
    for p in out["plots"]:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    for n in names:
        assert f"(bench/results/{n})" in out["markdown"]


def test_bad_inputs(tmp_path: Path) -> None:
    d = tmp_path / "r"
    d.mkdir()
    (d / "step.json").write_text("{not json")
    with pytest.raises(ValueError, match="step.json: expected a JSON object"):
        report.load_results(d)
    (d / "step.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        report.load_results(d)
    p = tmp_path / "README.md"
    p.write_text("no markers here\n")
    with pytest.raises(ValueError, match="expected the markers"):
        report.update_readme(p, "x")
    assert report.main(["--results", str(d), "--readme", str(p), "--no-plots"]) == 2

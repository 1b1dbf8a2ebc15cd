"""Plots and the README performance section, generated from bench/results/*.json.

``python -m bench.report`` from the repository root: reads every result the benchmark scripts
wrote (loss, ema, attention, loader, step; a missing one is reported as "not run"), writes PNG
plots next to them (bench/results/*.png) and replaces the README's region between
``<!-- BEGIN GENERATED: performance -->`` and ``<!-- END GENERATED: performance -->`` with
tables of those numbers, the command that reproduces each, links to the plots and every bar
marked MET / NOT MET. Nothing in that region is typed by hand: every number comes from the
JSON. Figures derived from bytes (``projected_*``) are labelled *projected*.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
README = ROOT / "README.md"
BEGIN = "<!-- BEGIN GENERATED: performance -->"
END = "<!-- END GENERATED: performance -->"
SUITES = ("step", "loss", "ema", "attention", "loader")
PHASES = ("forward", "loss", "backward", "clip", "optimizer", "ema")


# --------------------------------------------------------------------------------------------
# reading and formatting
# --------------------------------------------------------------------------------------------

def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """``{suite: parsed JSON}`` for every ``bench/results/SUITE.json`` that exists.

    Raises ``ValueError`` naming the file when one is not valid JSON or not a JSON object.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in SUITES + ("gpu",):
        path = Path(results_dir) / f"{name}.json"
        if not path.exists():
            continue
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: expected a JSON object written by bench/{name}.py, got invalid JSON ({e})") from e
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
        out[name] = doc
    return out


def fmt(v: Any) -> str:
    """A number as printed in the report: 3 significant digits below 1000, an integer above,
    ``inf``/``nan`` as such; strings and other values unchanged."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.3g}"
    return str(v)


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """Markdown table: ``cols`` is ``[(key, header), ...]``; a missing key prints as "-"."""
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[k]) if k in r and r[k] is not None else "-" for k, _ in cols) + " |")
    return "\n".join(lines)


def _met(b: dict[str, Any]) -> str:
    return "**MET**" if b.get("met") else "**NOT MET**"


def _target(value: Any, target: Any, met: bool) -> Any:
    """The target with its direction (">= x" or "<= x"), inferred from value, target and verdict."""
    if not isinstance(value, (int, float)) or not isinstance(target, (int, float)) or value == target:
        return target
    return f"{'>=' if (value >= target) == bool(met) else '<='} {fmt(target)}"


def _provenance(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    bits = [f"measured {doc.get('timestamp', '?')}"]
    if "quick" in doc or "quick" in doc.get("config", {}):
        q = doc.get("quick", doc.get("config", {}).get("quick"))
        bits.append("quick run (fewer shapes/repeats)" if q else "full run")
    bits.append(f"{m.get('cpu_model', m.get('processor', '?'))}, {m.get('cpu_count', '?')} CPUs, "
                f"torch {m.get('torch', '?')} ({m.get('threads', '?')} threads)")
    if m.get("gpu"):
        bits.append(f"GPU {m['gpu']}")
    la = doc.get("loadavg_1_5_15")
    if la:
        bits.append(f"load average after the run {fmt(float(la[0]))}")
    return "; ".join(bits)


def _img(name: str, png_dir: str, plots: set[str]) -> str:
    return f"![{name}]({png_dir}/{name}.png)" if name in plots else ""


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------

def _bars(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every bar found in the results: ``{suite, bar, value, target, met}``."""
    rows = []
    for suite, doc in results.items():
        bars = doc.get("bars")
        if isinstance(bars, dict):
            for k, b in bars.items():
                rows.append({"suite": suite, "bar": k, "value": b.get("value"),
                             "target": _target(b.get("value"), b.get("bar"), b.get("met")),
                             "met": _met(b), "note": b.get("note", "")})
        if suite == "ema" and "bar_vit_s" in doc and doc.get("rows"):
            r0 = doc["rows"][0]
            ok = r0["cpu_speedup_vs_reference"] >= doc["bar_vit_s"]
            rows.append({"suite": "ema", "bar": f"cpu_speedup_vs_reference ({r0['model']})",
                         "value": r0["cpu_speedup_vs_reference"], "target": f">= {fmt(doc['bar_vit_s'])}",
                         "met": _met({"met": ok}), "note": doc.get("verdict_vit_s", "")})
        if suite == "loader" and isinstance(doc.get("bar"), dict):
            b = doc["bar"]
            rows.append({"suite": "loader", "bar": b.get("metric", "bar"), "value": b.get("value"),
                         "target": _target(b.get("value"), b.get("target"), b.get("met")), "met": _met(b),
                         "note": ""})
    return rows


def step_phase_rows(step_rows: list[dict[str, Any]], *, ours: str = "dino-fast", ratio: str = "speed-up",
                    img_key: str = "img_s") -> list[dict[str, Any]]:
    """Table rows of the step benchmark: per setup, the reference and dino-fast times by phase in
    ms (plus total and images/s under ``img_key``), then a ``ratio`` row of reference/dino-fast
    per phase (total: the median of per-round ratios). ``step_rows``: ``step.json``'s ``rows``."""
    table = []
    for r in step_rows:
        for side in ("reference", "ours"):
            d = {"setup": r["setup"] if side == "reference" else "", "side": ours if side == "ours" else side}
            d.update({p: r[side][p] * 1e3 for p in PHASES + ("total",)})
            d[img_key] = r[f"images_per_s_{side}"]
            table.append(d)
        d = {"setup": "", "side": ratio}
        d.update({p: r["phase_speedup"][p] for p in PHASES})
        d["total"] = r["speedup"]
        table.append(d)
    return table


def section_step(doc: dict[str, Any], png_dir: str, plots: set[str]) -> str:
    """Markdown for bench/results/step.json."""
    rows = step_phase_rows(doc.get("rows", []))
    cols = [("setup", "setup"), ("side", "side")] + [(p, f"{p} ms") for p in PHASES] + \
        [("total", "total ms"), ("img_s", "images/s")]
    notes = []
    for r in doc.get("rows", []):
        ov = ", ".join(f"{k} {fmt(v * 1e3)} ms" if isinstance(v, (int, float)) else f"{k}: {v}"
                       for k, v in r.get("optimizer_variants_s", {}).items())
        notes.append(f"- {r['setup']}: attention {r['reference_attention']} vs {r['ours_attention']}; "
                     f"{r['reference_optimizer']} vs {r['ours_optimizer']}; AdamW step alone: {ov}; "
                     f"first-step loss {r['first_loss_reference']:.6f} vs {r['first_loss_ours']:.6f}"
                     f" (relative difference {r.get('loss_rel_diff_first_step', float('nan')):.1e}); "
                     f"ceiling with forward+backward unchanged "
                     f"{fmt(r['speedup_ceiling_if_forward_backward_unchanged'])}x; "
                     f"{r['rounds']} interleaved rounds, per-round speed-up "
                     f"{fmt(r['speedup_min_max'][0])}-{fmt(r['speedup_min_max'][1])}x"
                     + (f"; best-of-rounds step {fmt(r['reference_min']['total'] * 1e3)} vs "
                        f"{fmt(r['ours_min']['total'] * 1e3)} ms ({fmt(r['speedup_of_min_totals'])}x)"
                        if "reference_min" in r else ""))
    rate_rows = []
    labels = {"reference": "official eager", "reference_compiled": "official under torch.compile",
              "ours": "dino-fast step (same modules)", "trainer": "dino-fast Trainer step"}
    for r in doc.get("rows", []):
        for side, a in r.get("achieved", {}).items():
            t = r[side]["total"]
            rate_rows.append({"setup": r["setup"], "side": labels.get(side, side), "total_ms": t * 1e3,
                              "gflop": r["flops_per_step"] / 1e9, "gflops": a["flops_per_s"] / 1e9,
                              "of_peak": a["of_peak"], "peak": f"{r['peak_flops_dtype']} {r['peak_flops'] / 1e9:.0f}"})
    default_rows = [{**r, "ms": r["median_s"] * 1e3, "min_ms": r["min_s"] * 1e3, "gflop": r["flops_per_step"] / 1e9,
                     "gflops": r["achieved_flops_per_s"] / 1e9} for r in doc.get("default_run", [])]
    extra = []
    if rate_rows:
        peaks = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in doc.get("peak_matmul_flops", {}).items())
        extra += ["Achieved model FLOP/s (FLOPs per step counted by `torch.utils.flop_counter`: matmuls, "
                  f"convolutions, attention) against the dense-matmul peak measured in the same run ({peaks}):", "",
                  _table(rate_rows, [("setup", "setup"), ("side", "side"), ("total_ms", "step ms"),
                                     ("gflop", "GFLOP/step"), ("gflops", "GFLOP/s"), ("of_peak", "of peak"),
                                     ("peak", "peak GFLOP/s")]), ""]
    if default_rows:
        extra += ["The default run's own step (`Trainer.step_on_crops` of configs/default.yaml on real batches, "
                  "interleaved; `attn sdpa` is the step before issue 19):", "",
                  _table(default_rows, [("variant", "variant"), ("resolved_attention", "attention"),
                                        ("precision", "precision"), ("ms", "median ms"), ("min_ms", "min ms"),
                                        ("images_per_s", "images/s"), ("speedup_vs_before", "vs before"),
                                        ("gflop", "GFLOP/step"), ("gflops", "GFLOP/s"), ("of_peak", "of peak")]), ""]
    return "\n".join([
        "### End-to-end training step (`python -m bench.step`)", "",
        f"{_provenance(doc)}; device {doc.get('device', '?')}; apex: {doc.get('apex', '?')}.", "",
        "Reference = the official eager step (explicit-softmax attention, pair-loop loss, per-parameter "
        "clipping and EMA loops, AdamW as the official code builds it); dino-fast = the same model, weights "
        "and crops with sdpa attention, the fused loss, `clip_gradients`, `TeacherEMA` and the faster "
        "of foreach/fused AdamW. Medians over interleaved rounds; speed-up rows are reference / dino-fast.", "",
        _table(rows, cols), "", *notes, "", *extra, _img("step", png_dir, plots),
    ])


def section_loss(doc: dict[str, Any], png_dir: str, plots: set[str]) -> str:
    """Markdown for bench/results/loss.json."""
    parts = ["### DINO loss (`python -m bench.loss`)", "", f"{_provenance(doc)}; K = {doc.get('K', '?')}.", "",
             "CPU forward+backward, reference (pair loop) vs dino-fast (`DINOLoss(backend=\"torch\")`):", "",
             _table(doc.get("cpu_time", []), [("B", "B"), ("crops", "crops"), ("dtype", "dtype"), ("ref_ms", "reference ms"),
                                              ("ours_ms", "dino-fast ms"), ("speedup", "speed-up")]), "",
             "Peak extra CPU memory of forward+backward beyond inputs and gradient:", "",
             _table(doc.get("memory", []), [("B", "B"), ("crops", "crops"), ("dtype", "dtype"), ("ref_MiB", "reference MiB"),
                                            ("ours_MiB", "dino-fast MiB"), ("ratio", "ratio")]), ""]
    if doc.get("bytes"):
        parts += ["Bytes per forward+backward (Triton: loads/stores executed under the interpreter; reference: "
                  "aten ops). H100 times are **projected** (bytes / 3.0 TB/s), not measured:", "",
                  _table(doc["bytes"], [("B", "B"), ("crops", "crops"), ("dtype", "dtype"), ("floor_MB", "floor MB"),
                                        ("ref_MB", "reference MB"), ("triton_MB", "Triton MB"),
                                        ("triton_x_floor", "Triton / floor"), ("ref_over_triton", "reference / Triton"),
                                        ("projected_h100_ref_ms", "projected H100 reference ms"),
                                        ("projected_h100_triton_ms", "projected H100 Triton ms")]), ""]
    if doc.get("sweep"):
        parts += ["Sweep vs K (B = 8) and vs B (K = 65536), 2+8 crops, fp32:", "",
                  _table(doc["sweep"], [("axis", "sweep"), ("B", "B"), ("K", "K"), ("ref_ms", "reference ms"),
                                        ("ours_ms", "dino-fast ms"), ("speedup", "speed-up"),
                                        ("ref_best_ms", "reference best ms"), ("ours_best_ms", "dino-fast best ms"),
                                        ("ref_MiB", "reference MiB"), ("ours_MiB", "dino-fast MiB")]), ""]
    if doc.get("cuda"):
        parts += ["CUDA (`triton.testing.do_bench`):", "",
                  _table(doc["cuda"], [("B", "B"), ("crops", "crops"), ("dtype", "dtype"), ("ref_ms", "reference ms"),
                                       ("triton_ms", "Triton ms"), ("speedup", "speed-up")]), ""]
    parts.append(_img("loss", png_dir, plots))
    return "\n".join(parts)


def section_ema(doc: dict[str, Any], png_dir: str, plots: set[str]) -> str:
    """Markdown for bench/results/ema.json."""
    rows = doc.get("rows", [])
    cuda_notes = [f"- {r['model']}: CUDA: {r.get('cuda')}; apex: {r.get('apex')}" for r in rows]
    return "\n".join([
        "### Teacher EMA (`python -m bench.ema`)", "", f"{_provenance(doc)}.", "",
        _table(rows, [("model", "model"), ("params", "parameters"), ("tensors", "tensors"),
                      ("cpu_reference_ms", "reference ms"), ("cpu_foreach_lerp_ms", "_foreach_lerp_ ms"),
                      ("cpu_ours_ms", "dino-fast ms"), ("cpu_copy_floor_ms", "copy_ floor ms"),
                      ("cpu_speedup_vs_reference", "speed-up"), ("launches_reference", "reference launches"),
                      ("launches_ours_triton", "Triton launches"), ("triton_B_per_param", "Triton B/param"),
                      ("projected_h100_reference_us", "projected H100 reference us"),
                      ("projected_h100_ours_us", "projected H100 Triton us")]),
        "", *cuda_notes, "", _img("ema", png_dir, plots),
    ])


def section_attention(doc: dict[str, Any], png_dir: str, plots: set[str]) -> str:
    """Markdown for bench/results/attention.json."""
    cfg = doc.get("config", {})
    desc = ", ".join(f"{k} {v}" for k, v in cfg.items() if k in ("model", "depth", "images", "crops", "measures"))
    return "\n".join([
        "### Attention (`python -m bench.attention`)", "", f"{_provenance(doc)}; {desc}.", "",
        _table(doc.get("rows", []), [("device", "device"), ("backend", "backend"), ("dtype", "dtype"), ("median_s", "median s"),
                                     ("time_vs_math", "time / math"), ("peak_MiB", "peak MiB"),
                                     ("peak_vs_math", "memory / math")]),
        "", _img("attention", png_dir, plots),
    ])


def section_loader(doc: dict[str, Any], png_dir: str, plots: set[str]) -> str:
    """Markdown for bench/results/loader.json."""
    cfg = doc.get("config", {})
    desc = ", ".join(f"{k} {v}" for k, v in cfg.items() if k in ("images", "batch_size", "workers", "n_local"))
    notes = [f"- {n}" for n in doc.get("notes", [])]
    return "\n".join([
        "### Loaders (`python -m bench.loader`)", "", f"{_provenance(doc)}; {desc}.", "",
        _table(doc.get("rows", []), [("loader", "loader"), ("images", "images"), ("median_epoch_s", "epoch s"),
                                     ("images_per_s", "images/s"), ("vs_reference", "vs reference")]),
        "", *notes, "", _img("loader", png_dir, plots),
    ])


def section_gpu(doc: dict[str, Any], png_dir: str, plots: set[str]) -> str:
    """bench/gpu.py: the CUDA rows of every suite, measured on one GPU in one run."""
    del png_dir, plots
    m = doc.get("machine", {})
    copy = doc.get("copy") or {}
    parts = [f"### GPU ({m.get('gpu', '?')}, torch {m.get('torch', '?')}, triton {m.get('triton', '?')}; "
             f"`python -m bench.gpu`, {doc.get('timestamp', '?')})", "",
             "Timed on the GPU with `triton.testing.do_bench` (median ms, host overhead included) and, for the "
             "loss and the EMA, the GPU time alone (the kernels' summed durations from `torch.profiler`). TF32 off. "
             f"Roofline: a device-to-device `copy_` moves {fmt(copy.get('GBps'))} GB/s (read + write); "
             "*floor* = the bytes a kernel must move at that rate.", ""]
    if doc.get("loss"):
        parts += ["DINO loss, forward + backward, K = 65536:", "", _table(doc["loss"], [
            ("B", "B"), ("crops", "crops"), ("dtype", "dtype"), ("ref_ms", "reference ms"),
            ("triton_ms", "dino-fast ms"), ("speedup", "speed-up"), ("ref_device_ms", "reference GPU ms"),
            ("triton_device_ms", "dino-fast GPU ms"), ("floor_ms_at_copy_bw", "floor ms"),
            ("triton_device_x_floor", "dino-fast GPU / floor")]), ""]
    if doc.get("ema"):
        parts += ["Teacher EMA update (momentum 0.996):", "", _table(doc["ema"], [
            ("model", "model"), ("params", "parameters"), ("tensors", "tensors"), ("reference_ms", "official loop ms"),
            ("foreach_lerp_ms", "torch foreach lerp ms"), ("ours_triton_ms", "dino-fast ms"),
            ("speedup_vs_reference", "vs official"), ("floor_ms_at_copy_bw", "floor ms (12 B/param)"),
            ("ours_x_floor_time", "dino-fast / floor")]), ""]
    if doc.get("attention"):
        parts += ["Attention, 12 blocks of ViT-S/16 over a multi-crop batch, forward + backward:", "", _table(
            doc["attention"], [("backend", "backend"), ("median_s", "s"), ("time_vs_math", "time vs math"),
                               ("peak_MiB", "peak MiB"), ("peak_vs_math", "peak vs math"),
                               ("grad_rel_diff_vs_math", "grad rel. diff")]), ""]
    if doc.get("augment"):
        parts += ["`MultiCropAugment` on the GPU (uint8 crops in, normalised float out):", "", _table(
            doc["augment"], [("batch", "batch"), ("crops", "crops"), ("ms_per_batch", "ms per batch"),
                             ("images_per_s", "images/s"), ("us_per_image", "us per image")]), ""]
    if doc.get("step"):
        parts += ["End-to-end DINO step, bf16 autocast on both sides (ms per phase, medians of interleaved rounds):",
                  "", _table(step_phase_rows(doc["step"], ours="dino-fast", ratio="speed-up", img_key="img_s"),
                             [("setup", "setup"), ("side", "side"), *[(p, p) for p in PHASES], ("total", "total"),
                              ("img_s", "img/s")]), ""]
    if doc.get("errors"):
        parts += [f"Parts that failed: {doc['errors']}", ""]
    return "\n".join(parts).rstrip()


SECTIONS = {"step": section_step, "loss": section_loss, "ema": section_ema, "attention": section_attention,
            "loader": section_loader}


def render_markdown(results: dict[str, dict[str, Any]], png_dir: str = "bench/results",
                    plots: Optional[set[str]] = None) -> str:
    """The README performance section (without the markers) from ``results`` (see
    :func:`load_results`). ``png_dir``: the plots' folder relative to the README; ``plots``: names
    of the PNGs that exist (an image link is emitted only for those)."""
    plots = set() if plots is None else set(plots)
    bars = _bars(results)
    parts = [
        "## Performance", "",
        "Generated by `python -m bench.report` from bench/results/*.json (rerun the benchmarks with "
        "`dino-fast bench all [--quick]`, then `python -m bench.report`); do not edit by hand. "
        "How each figure is measured: [bench/README.md](bench/README.md). Figures labelled *projected* are "
        "byte counts divided by an H100's 3.0 TB/s copy bandwidth, not measurements.", "",
        "#### Bars", "",
        _table(bars, [("suite", "benchmark"), ("bar", "bar"), ("value", "measured"), ("target", "target"),
                      ("met", "status"), ("note", "note")]) if bars else "No results yet.", "",
    ]
    for name in SUITES:
        if name in results:
            parts += [SECTIONS[name](results[name], png_dir, plots), ""]
        else:
            parts += [f"### {name}: not run (`python -m bench.{name}` writes bench/results/{name}.json)", ""]
    if "gpu" in results:
        parts += [section_gpu(results["gpu"], png_dir, plots), ""]
    else:
        parts += ["### GPU: not run (`python -m bench.gpu` on a CUDA machine writes bench/results/gpu.json)", ""]
    return "\n".join(parts).rstrip() + "\n"


def update_readme(readme: Path, markdown: str) -> bool:
    """Replace the text between the performance markers of ``readme`` with ``markdown``.

    Returns True when the file changed. Raises ``ValueError`` when the markers are missing or
    out of order.
    """
    text = readme.read_text()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"{readme}: expected the markers {BEGIN!r} then {END!r}, found begin at {i}, end at {j}")
    new = text[: i + len(BEGIN)] + "\n" + markdown + text[j:]
    if new == text:
        return False
    readme.write_text(new)
    return True


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------

def make_plots(results: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write the PNG plots for the results present; returns their paths.

    loss.png (time and memory vs K and vs B), ema.png (per-update time vs parameter count),
    loader.png (images/s per loader), step.png (per-phase step time, both sides), attention.png.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        p = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    loss = results.get("loss")
    if loss and loss.get("sweep"):
        fig, ax = plt.subplots(2, 2, figsize=(10, 7))
        for col, axis, xkey in ((0, "K", "K"), (1, "B", "B")):
            # every row at the fixed value of the other axis (the shared point B=8, K=65536 is in both)
            fixed_key, fixed_val = ("B", 8) if axis == "K" else ("K", 65536)
            by_x: dict[int, dict[str, Any]] = {}
            for r in loss["sweep"]:
                if r[fixed_key] == fixed_val:
                    by_x.setdefault(r[xkey], r)  # one point per x (older results repeat B=8, K=65536)
            rows = [by_x[x] for x in sorted(by_x)]
            xs = [r[xkey] for r in rows]
            best = all("ref_best_ms" in r for r in rows)  # best of the repeats when recorded
            for side, key, style in (("reference", "ref", "o-"), ("dino-fast", "ours", "s-")):
                ax[0][col].plot(xs, [r[f"{key}_best_ms" if best else f"{key}_ms"] for r in rows], style, label=side)
                ax[1][col].plot(xs, [r[f"{key}_MiB"] for r in rows], style, label=side)
            fixed = "B=8" if axis == "K" else "K=65536"
            ax[0][col].set(xscale="log", yscale="log", xlabel=xkey,
                           ylabel="forward+backward ms" + (" (best of repeats)" if best else " (median)"),
                           title=f"loss time vs {xkey} ({fixed}, 2+8 crops, fp32, CPU)")
            ax[1][col].set(xscale="log", yscale="log", xlabel=xkey, ylabel="peak extra MiB",
                           title=f"loss memory vs {xkey} ({fixed})")
            for a in (ax[0][col], ax[1][col]):
                a.legend()
                a.grid(True, which="both", alpha=0.3)
        save(fig, "loss")

    ema = results.get("ema")
    if ema and ema.get("rows"):
        rows = sorted(ema["rows"], key=lambda r: r["params"])
        xs = [r["params"] / 1e6 for r in rows]
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for key, label, style in (("cpu_reference_ms", "reference loop", "o-"),
                                  ("cpu_foreach_lerp_ms", "torch._foreach_lerp_", "^-"),
                                  ("cpu_ours_ms", "dino-fast TeacherEMA", "s-"),
                                  ("cpu_copy_floor_ms", "copy_ floor", "k--")):
            ax.plot(xs, [r[key] for r in rows], style, label=label)
        ax.set(xlabel="parameters (millions)", ylabel="ms per update (CPU)", title="teacher EMA per update")
        ax.legend()
        ax.grid(True, alpha=0.3)
        save(fig, "ema")

    loader = results.get("loader")
    if loader and loader.get("rows"):
        rows = loader["rows"]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
        ax.barh([r["loader"] for r in rows], [r["images_per_s"] for r in rows], color="tab:blue")
        for i, r in enumerate(rows):
            ax.text(r["images_per_s"], i, f" {r['images_per_s']:.3g}", va="center")
        ax.invert_yaxis()
        ax.set(xlabel="images/s (CPU)", title="multi-crop loaders")
        save(fig, "loader")

    step = results.get("step")
    if step and step.get("rows"):
        rows = step["rows"]
        labels, bottoms = [], []
        fig, ax = plt.subplots(figsize=(8, 4.5))
        bars = []
        for r in rows:
            for side in ("reference", "ours"):
                labels.append(f"{r['model']}\n{'reference' if side == 'reference' else 'dino-fast'}")
                bars.append([r[side][p] * 1e3 for p in PHASES])
        bottoms = [0.0] * len(bars)
        for j, p in enumerate(PHASES):
            vals = [b[j] for b in bars]
            ax.bar(range(len(bars)), vals, bottom=bottoms, label=p)
            bottoms = [a + v for a, v in zip(bottoms, vals)]
        for i, r in enumerate(rows):
            ax.text(2 * i + 1, bottoms[2 * i + 1], f"{r['speedup']:.2f}x", ha="center", va="bottom")
        ax.set_xticks(range(len(bars)), labels)
        ax.set(ylabel="ms per step", title=f"DINO step by phase ({step.get('device', 'cpu')}; speed-up over reference)")
        ax.legend(fontsize=8)
        save(fig, "step")

    att = results.get("attention")
    if att and att.get("rows"):
        rows = att["rows"]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        names = [r["backend"] for r in rows]
        ax[0].barh(names, [r["median_s"] for r in rows])
        ax[0].set(xlabel="median s", title="attention time")
        ax[1].barh(names, [r["peak_MiB"] for r in rows])
        ax[1].set(xlabel="peak MiB", title="attention memory")
        for a in ax:
            a.invert_yaxis()
        save(fig, "attention")
    return paths


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------

def generate(results_dir: Path = RESULTS_DIR, readme: Optional[Path] = README, plots: bool = True,
             png_dir: str = "bench/results") -> dict[str, Any]:
    """Read the results, write the plots into ``results_dir`` and the README section.

    Returns ``{"markdown": str, "plots": [paths], "readme_changed": bool, "suites": [names]}``.
    ``readme=None`` renders without writing a README.
    """
    results = load_results(results_dir)
    paths = make_plots(results, Path(results_dir)) if plots else []
    md = render_markdown(results, png_dir, {p.stem for p in paths} if plots else None)
    changed = update_readme(Path(readme), md) if readme is not None else False
    return {"markdown": md, "plots": [str(p) for p in paths], "readme_changed": changed,
            "suites": sorted(results)}


def run(quick: bool = False) -> dict[str, Any]:
    """Regenerate plots and the README section from the current results (``quick`` is unused:
    the report measures nothing)."""
    del quick
    out = generate()
    print(f"report: suites {', '.join(out['suites']) or 'none'}; plots {len(out['plots'])}; "
          f"README {'updated' if out['readme_changed'] else 'unchanged'}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.report [--results DIR] [--readme PATH] [--no-plots] [--print]``."""
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the result JSONs (and the PNGs)")
    p.add_argument("--readme", type=Path, default=README, help="README with the performance markers")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--print", action="store_true", help="also print the generated markdown")
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        out = generate(a.results, a.readme, plots=not a.no_plots)
    except ValueError as e:
        print(f"bench.report: {e}", file=sys.stderr)
        return 2
    if a.print:
        print(out["markdown"])
    print(f"report: suites {', '.join(out['suites']) or 'none'}; plots: {', '.join(out['plots']) or 'none'}; "
          f"{a.readme} {'updated' if out['readme_changed'] else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

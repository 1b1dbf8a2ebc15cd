"""Does the default recipe learn on image sets nobody tuned it on? (``python -m bench.learning``)

For each image set of :mod:`bench.datasets` (and the built-in dataset with ``--builtin``) and
each seed, this runs the main job exactly as a user would - ``python -m dino_fast train --config
configs/default.yaml data.root=<set>/train data.val_root=<set>/val train.seed=<seed>``, a fresh
process, nothing else set - and reads back what it reports:

- k-NN top-1 (weighted, k = 20, T = 0.07) and linear-probe top-1 of the trained teacher and of
  its random-init twin (``knn.json``, ``linear.json``), their difference (the gain);
- the collapse check (warnings in the log; the last ``collapse/teacher_entropy`` in
  ``metrics.jsonl`` against ln K);
- the wall time of the whole command (data loading, training and both evaluations).

Beside them, once per set, k-NN on the raw pixels of the same evaluation images (resized and
centre-cropped as the evaluation does, each image flattened, the train mean image subtracted,
L2-normalised; the same weighted k-NN) - the floor that learnt features are compared with.

The held-out set (:data:`bench.datasets.HELD_OUT`) runs and is reported last. The bars (issue 17)
are checked per set: no collapse warning in any seed, final teacher entropy below
``--entropy-frac`` x ln K, k-NN and linear gains of at least ``--min-gain`` points (mean over
seeds), every run under ``--max-seconds``; and trained k-NN at or above raw-pixel k-NN on at
least one set.

Usage::

    python -m bench.learning                      # digits, glyphs, scenes, tints, then photos (held out); seeds 0 1 2
    python -m bench.learning --sets digits --seeds 0 --extra optim.lr=0.001
    python -m bench.learning --sets fashion       # Fashion-MNIST, from Debian's dataset-fashion-mnist
    python -m bench.learning --sets --folder cifar=/data/cifar10_5k   # your own DIR/train, DIR/val only

Writes ``--out`` (default ``bench/results/learning.json``): one record per run and one summary per
set. Runs one at a time (two at once on a small machine time each other); minutes per run.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from bench import datasets
from bench.common import machine_info, write_json

ROOT = Path(__file__).resolve().parents[1]
KNN_K = "20"


def raw_pixel_knn(train_root: Path, val_root: Path, *, image_size: int, resize_size: int, k: int = 20,
                  temperature: float = 0.07) -> dict[str, float]:
    """Weighted k-NN top-1/top-5 (%) on mean-centred, L2-normalised raw pixels of the evaluation images."""
    from dino_fast.eval.knn import eval_loaders, knn_classify

    loaders, classes = eval_loaders(train_root, val_root, image_size=image_size, resize_size=resize_size,
                                    batch_size=256, num_workers=0)
    feats = []
    for loader in loaders:
        xs, ys = zip(*[(x.flatten(1).double(), y) for x, y in loader])
        feats.append((torch.cat(xs), torch.cat(ys).long()))
    mean = feats[0][0].mean(0, keepdim=True)
    (xtr, ytr), (xva, yva) = [(torch.nn.functional.normalize(x - mean, dim=1).float(), y) for x, y in feats]
    return knn_classify(xtr, ytr, xva, yva, k=k, temperature=temperature, num_classes=len(classes) or None)


def _last_entropy(metrics: Path) -> Optional[float]:
    last = None
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "collapse/teacher_entropy" in rec:
                last = rec["collapse/teacher_entropy"]
    return last


def run_one(name: str, root: Path, seed: int, out_dir: Path, config: str, extra: Sequence[str]) -> dict[str, Any]:
    """One ``dino_fast train`` run on ``root/train`` (evaluated on ``root/val``) and what it reported."""
    run_dir = out_dir / f"{name}-seed{seed}"
    cmd = [sys.executable, "-m", "dino_fast", "train", "--config", config, f"data.root={root / 'train'}",
           f"data.val_root={root / 'val'}", f"train.seed={seed}", f"train.output_dir={run_dir}",
           "train.resume=none", "train.progress=false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (out_dir / f"{name}-seed{seed}.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{log[-3000:]}")
    knn = json.loads((run_dir / "knn.json").read_text())
    linear = json.loads((run_dir / "linear.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    out_dim = int(cfg["model"]["out_dim"])
    summary = json.loads((run_dir / "summary.json").read_text())
    rec = {
        "set": name, "seed": seed, "seconds": round(seconds, 1), "command": " ".join(cmd[1:]),
        "knn_teacher": knn["teacher"][KNN_K]["top1"], "knn_random": knn["random_init"][KNN_K]["top1"],
        "linear_teacher": linear["teacher"]["top1"], "linear_random": linear["random_init"]["top1"],
        "teacher_entropy": _last_entropy(run_dir / "metrics.jsonl"), "ln_k": math.log(out_dim),
        "collapse_warnings": summary["collapse_warnings"], "train_seconds": summary["train_seconds"],
        "iterations": summary["iterations"],
    }
    rec["knn_gain"] = rec["knn_teacher"] - rec["knn_random"]
    rec["linear_gain"] = rec["linear_teacher"] - rec["linear_random"]
    return rec


def parse_folders(specs: Sequence[str], *, taken: set[str]) -> dict[str, Path]:
    """``NAME=DIR`` arguments as ``{NAME: DIR}``, each DIR checked to hold ``train/`` and ``val/`` folders.

    Raises:
        ValueError: an argument is not ``NAME=DIR``, a NAME repeats or is one of ``taken`` (the
            sets of this run), or DIR lacks ``train/`` or ``val/``; the message names the argument
            and what was expected.
    """
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--folder {spec!r}: expected NAME=DIR (e.g. cifar=/data/cifar10, with "
                             f"/data/cifar10/train and /data/cifar10/val)")
        if name in out or name in taken:
            raise ValueError(f"--folder {spec!r}: the name {name!r} is already used in this run")
        root = Path(path).expanduser()
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise ValueError(f"--folder {spec!r}: {root} has no {' or '.join(m + '/' for m in missing)} folder "
                             f"(expected {root}/train/<class>/... and {root}/val/<class>/...)")
        out[name] = root.resolve()
    return out


def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}


def summarise(name: str, runs: list[dict[str, Any]], raw: dict[str, float], *, min_gain: float,
              entropy_frac: float, max_seconds: float) -> dict[str, Any]:
    """Mean/std over seeds and the per-set bars of issue 17."""
    s: dict[str, Any] = {"set": name, "seeds": [r["seed"] for r in runs], "raw_pixel_knn": raw["top1"]}
    for key in ("knn_random", "knn_teacher", "knn_gain", "linear_random", "linear_teacher", "linear_gain", "seconds"):
        s[key] = _ms([r[key] for r in runs])
    ent = [r["teacher_entropy"] / r["ln_k"] for r in runs if r["teacher_entropy"] is not None]
    s["teacher_entropy_frac_max"] = round(max(ent), 3) if ent else None
    s["collapse_warnings"] = sum(len(r["collapse_warnings"]) for r in runs)
    s["bars"] = {
        "no_collapse_warning": s["collapse_warnings"] == 0,
        "teacher_entropy_below": bool(ent) and max(ent) < entropy_frac,
        "knn_gain": s["knn_gain"]["mean"] >= min_gain,
        "linear_gain": s["linear_gain"]["mean"] >= min_gain,
        "time": max(r["seconds"] for r in runs) <= max_seconds,
    }
    s["knn_at_or_above_raw_pixels"] = s["knn_teacher"]["mean"] >= raw["top1"]
    return s


def _row(s: dict[str, Any]) -> str:
    def f(d: dict[str, float]) -> str:
        return f"{d['mean']:5.1f}+-{d['std']:.1f}"
    held = " (held out)" if s["set"] == datasets.HELD_OUT else ""
    return (f"{s['set'] + held:<20} raw-pixel {s['raw_pixel_knn']:5.1f} | k-NN random {f(s['knn_random'])} trained "
            f"{f(s['knn_teacher'])} gain {f(s['knn_gain'])} | linear random {f(s['linear_random'])} trained "
            f"{f(s['linear_teacher'])} gain {f(s['linear_gain'])} | {s['seconds']['mean']:.0f} s | "
            f"H/lnK {s['teacher_entropy_frac_max']} | warnings {s['collapse_warnings']} | "
            f"bars {'met' if all(s['bars'].values()) else 'NOT met: ' + ', '.join(k for k, v in s['bars'].items() if not v)}")


def check_mergeable(old: dict[str, Any], config: str, extra: Sequence[str]) -> None:
    """Raise ValueError unless results ``old`` were run with ``config`` and ``extra`` (see :func:`merge_results`)."""
    for key, value in (("config", config), ("extra", list(extra))):
        if old.get(key) != value:
            raise ValueError(f"cannot merge into results of {key}={old.get(key)!r}: this run has "
                             f"{key}={value!r} (write them to another --out)")


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the sets that ``old`` holds and ``new`` did not run kept from ``old``.

    Both are :func:`main`'s output dicts. The summaries are ordered tuning sets first (``old``'s
    order, then new ones), the held-out set last; ``any_knn_at_or_above_raw_pixels`` is recomputed
    over all of them.

    Raises:
        ValueError: the two were run with another config or other ``--extra`` overrides (their
            figures would not belong in one table); the message names both.
    """
    check_mergeable(old, new["config"], new["extra"])
    ran = {s["set"] for s in new["summaries"]}
    summaries = [s for s in old["summaries"] if s["set"] not in ran] + list(new["summaries"])
    order = [s["set"] for s in old["summaries"]] + [s["set"] for s in new["summaries"] if s["set"] not in
                                                    {o["set"] for o in old["summaries"]}]
    summaries.sort(key=lambda s: (s["set"] == datasets.HELD_OUT, order.index(s["set"])))
    runs = [r for r in old["runs"] if r["set"] not in ran] + list(new["runs"])
    runs.sort(key=lambda r: ([s["set"] for s in summaries].index(r["set"]), r["seed"]))
    return {**new, "summaries": summaries, "runs": runs,
            "any_knn_at_or_above_raw_pixels": any(s["knn_at_or_above_raw_pixels"] for s in summaries)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (0 also when a bar is not met: read the report)."""
    p = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="*", default=list(datasets.DEFAULT_SETS),
                   help=f"image sets, of {sorted(datasets.SETS)} (the held-out {datasets.HELD_OUT!r} always runs last; "
                        f"default {list(datasets.DEFAULT_SETS)})")
    p.add_argument("--folder", nargs="*", default=[], metavar="NAME=DIR",
                   help="also (or, with --sets and nothing after it, only) your own folders: DIR/train and DIR/val, "
                        "classes as subfolders; reported under NAME, after the sets")
    p.add_argument("--builtin", action="store_true", help="also the built-in dataset (the one the recipe was tuned on)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--extra", nargs="*", default=[], help="more section.key=value overrides (for experiments)")
    p.add_argument("--cache", default="data_cache/sets", help="where the image sets are written")
    p.add_argument("--runs", default="runs/learning", help="where the training runs go")
    p.add_argument("--out", default="bench/results/learning.json")
    p.add_argument("--update", action="store_true",
                   help="keep the other sets' results already in --out (same config and --extra), replace these sets'")
    p.add_argument("--min-gain", type=float, default=25.0)
    p.add_argument("--entropy-frac", type=float, default=0.8)
    p.add_argument("--max-seconds", type=float, default=600.0)
    args = p.parse_args(list(argv) if argv is not None else None)
    unknown = [s for s in args.sets if s not in datasets.SETS]
    if unknown:
        p.error(f"unknown set(s) {unknown}; known: {sorted(datasets.SETS)}")
    try:
        folders = parse_folders(args.folder, taken=set(args.sets))
    except ValueError as e:
        p.error(str(e))
    if not args.sets and not folders:
        p.error("nothing to run: give --sets, --folder NAME=DIR, or both")
    sets = [s for s in args.sets if s != datasets.HELD_OUT] + [s for s in args.sets if s == datasets.HELD_OUT]
    out_path = ROOT / args.out
    if args.update and out_path.exists():  # before an hour of runs, not after
        try:
            check_mergeable(json.loads(out_path.read_text()), args.config, args.extra)
        except ValueError as e:
            p.error(f"--update: {e}")
    cache, runs_dir = ROOT / args.cache, ROOT / args.runs
    runs_dir.mkdir(parents=True, exist_ok=True)
    roots: dict[str, Path] = {s: datasets.build(s, cache) for s in sets}
    roots.update(folders)
    if args.builtin:
        from dino_fast.data.builtin import ensure_builtin_dataset
        roots = {"builtin": Path(ensure_builtin_dataset(ROOT / "data_cache" / "builtin")), **roots}
    from dino_fast.config import apply_auto_crops, load_config
    from dino_fast.data.sizing import median_image_side
    cfg = load_config(str(ROOT / args.config), list(args.extra))
    records: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for name, root in roots.items():
        # at the evaluation size the run uses (data.auto_crops may change it for small images)
        set_cfg, _ = apply_auto_crops(cfg, median_image_side(root / "train"))
        raw = raw_pixel_knn(root / "train", root / "val", image_size=set_cfg.eval.image_size,
                            resize_size=set_cfg.eval.resize_size)
        runs = []
        for seed in args.seeds:
            rec = run_one(name, root, seed, runs_dir, args.config, args.extra)
            print(f"{name} seed {seed}: k-NN {rec['knn_teacher']:.1f} (random {rec['knn_random']:.1f}), linear "
                  f"{rec['linear_teacher']:.1f} (random {rec['linear_random']:.1f}), {rec['seconds']:.0f} s, "
                  f"{len(rec['collapse_warnings'])} collapse warning(s)", flush=True)
            runs.append(rec)
            records.append(rec)
        summaries.append(summarise(name, runs, raw, min_gain=args.min_gain, entropy_frac=args.entropy_frac,
                                   max_seconds=args.max_seconds))
    print("\n".join(_row(s) for s in summaries))
    any_raw = any(s["knn_at_or_above_raw_pixels"] for s in summaries)
    print(f"trained k-NN at or above raw-pixel k-NN on at least one set: {any_raw}")
    out = {"machine": machine_info(),
           "config": args.config, "extra": list(args.extra), "held_out": datasets.HELD_OUT,
           "summaries": summaries, "runs": records, "any_knn_at_or_above_raw_pixels": any_raw}
    if args.update and out_path.exists():
        out = merge_results(json.loads(out_path.read_text()), out)
        print("\n".join(_row(s) for s in out["summaries"]))
        print(f"with the other sets of {out_path}: trained k-NN at or above raw-pixel k-NN on at least one set: "
              f"{out['any_knn_at_or_above_raw_pixels']}")
    print(f"wrote {write_json(out_path, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

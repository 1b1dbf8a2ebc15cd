"""k-NN quality of the default run across config variants and seeds (``python -m bench.knn_sweep``).

Each run trains ``configs/default.yaml`` with a variant's ``section.key=value`` overrides and a
seed, then measures weighted k-NN top-1 (k=20, the ``make train`` protocol) of the trained
teacher and of the random-init twin (``run_eval_report``'s seed) on an evaluation split, and
reports the gain (teacher minus random init). Runs go ``--parallel`` at a time as subprocesses
(1 CPU thread and 1 loader worker each), so a 16-core GPU machine takes ~14 at once.

Two phases: every variant with ``--seeds`` (seed-major, so a deadline still leaves one seed of
every variant), then the ``--top`` variants by mean gain, and ``base`` when swept, with ``--more-seeds``.

The evaluation split (``--eval-dir``, generated when missing) is the built-in dataset with 100
val images per class (the built-in val split is its first 30 per class; the train split is the
same), so one run's k-NN is read on 1000 images, not 300: about +-1.5 points of binomial noise
instead of +-2.8. ``gain_std`` is the gain on the built-in val split itself.

Usage::

    python -m bench.knn_sweep                       # the sweep behind configs/default.yaml
    python -m bench.knn_sweep --variants base koleo03 --seeds 0 1 2 --parallel 2
    python -m bench.knn_sweep --list                # the variants

Writes one JSON line per run to ``--out`` (default bench/results/knn_sweep.jsonl) and prints the
mean gain per variant. Several minutes per run on a CPU core; about a minute on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides of configs/default.yaml. The sweep was run when the default was DINO's center
# with KoLeo 0.03 (koleo03; "base" without KoLeo); the default has since changed (issue 17,
# README). A variant may name its own dataset ("@data=DIR:TRAIN:VAL": generated with TRAIN/VAL images per class and used both to train and to evaluate).
VARIANTS: dict[str, list[str]] = {
    "base": ["loss.koleo_weight=0"],
    "koleo10": ["loss.koleo_weight=0.1"],
    "koleo30": ["loss.koleo_weight=0.3"],
    "koleo03": ["loss.koleo_weight=0.03"],
    "ep10": ["loss.koleo_weight=0", "train.epochs=10"],
    "ep20_koleo10": ["train.epochs=20", "loss.koleo_weight=0.1"],
    "bs32": ["loss.koleo_weight=0", "data.batch_size_per_gpu=32"],
    "bs32_lr4": ["loss.koleo_weight=0", "data.batch_size_per_gpu=32", "optim.lr=0.004"],
    "nolastnorm": ["loss.koleo_weight=0", "model.norm_last_layer=false"],
    "cm97": ["loss.koleo_weight=0", "loss.center_momentum=0.97"],
    "loc8": ["loss.koleo_weight=0", "data.local_crops_number=8"],
    "loc4": ["loss.koleo_weight=0", "data.local_crops_number=4"],
    "mom90": ["loss.koleo_weight=0", "optim.momentum_teacher=0.9"],
    "mom97": ["loss.koleo_weight=0", "optim.momentum_teacher=0.97", "optim.momentum_teacher_end=0.995"],
    "tt_down": ["loss.koleo_weight=0", "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.025",
                "loss.warmup_teacher_temp_epochs=14"],
    "wdconst": ["loss.koleo_weight=0", "optim.weight_decay_end=0.04"],
    "dp0": ["loss.koleo_weight=0", "model.drop_path_rate=0.0"],
    "head1024": ["loss.koleo_weight=0", "model.head_hidden_dim=1024", "model.head_bottleneck_dim=256"],
    "gscale25": ["loss.koleo_weight=0", "data.global_crops_scale=[0.25,1.0]"],
    "lscale": ["loss.koleo_weight=0", "data.local_crops_scale=[0.05,0.3]"],
    "lr15": ["loss.koleo_weight=0", "optim.lr=0.0015"],
    "warm4": ["loss.koleo_weight=0", "optim.warmup_epochs=4"],
    "noclip": ["loss.koleo_weight=0", "optim.clip_grad=0"],
    "k2048": ["loss.koleo_weight=0", "model.out_dim=2048"],
    "big8": ["loss.koleo_weight=0", "train.epochs=8", "optim.warmup_epochs=1", "@data=data_cache/knn_sweep_big:240:100"],
    "ep10_koleo10": ["train.epochs=10", "loss.koleo_weight=0.1"],
    "bs32_koleo10": ["data.batch_size_per_gpu=32", "loss.koleo_weight=0.1"],
    "studt2": ["loss.koleo_weight=0", "loss.student_temp=0.2"],
}


def ensure_dataset(path: str | os.PathLike, train_per_class: int = 120, val_per_class: int = 100) -> Path:
    """The built-in dataset at ``path`` with the given images per class (generated if missing).

    Image i of class k of a split is the same whatever the counts, so the default 120 train /
    100 val holds the built-in train split and extends its val split (first 30 per class).
    """
    from dino_fast.data.builtin import _is_current, make_dataset

    p = Path(path)
    meta = p / "dataset.json"
    if _is_current(p):
        m = json.loads(meta.read_text())
        if (m.get("train_per_class"), m.get("val_per_class")) == (train_per_class, val_per_class):
            return p
    return make_dataset(p, train_per_class=train_per_class, val_per_class=val_per_class)


def _knn20(model: Any, root: Path, cfg: Any, device: Any) -> float:
    from dino_fast.eval.knn import knn_eval_backbone

    r = knn_eval_backbone(model, root / "train", root / "val", ks=(20,), temperature=cfg.eval.knn_temperature,
                          image_size=cfg.eval.image_size, resize_size=cfg.eval.resize_size, batch_size=256,
                          num_workers=0, device=device)
    return round(r["20"]["top1"], 1)


def run_one(name: str, overrides: Sequence[str], *, eval_dir: str, std_dir: str, work_dir: str,
            every: int = 0) -> dict[str, Any]:
    """Train the default config with ``overrides`` and measure k-NN (in this process).

    Returns a dict: ``gain``/``knn_t``/``knn_r`` (teacher, random init, k=20 top-1 % on
    ``eval_dir``), ``gain_std`` (the same on ``std_dir``), ``traj`` ([iteration, teacher k-NN,
    mean loss of the last 20 iterations] every ``every`` iterations), ``loss``, ``t_train``.
    """
    import torch

    from dino_fast.config import load_config
    from dino_fast.methods import build_backbone
    from dino_fast.train.loop import Trainer

    over = list(overrides)
    data = [o for o in over if o.startswith("@data=")]
    over = [o for o in over if not o.startswith("@data=")]
    eval_root, std_root = Path(eval_dir), Path(std_dir)
    if data:
        d, tr_n, va_n = data[-1][len("@data="):].split(":")
        eval_root = std_root = ensure_dataset(d, int(tr_n), int(va_n))
        over.append(f"data.builtin_dir={d}")
    else:
        over.append(f"data.builtin_dir={eval_dir}")  # the built-in train split, extended val split
    base = [f"train.output_dir={work_dir}/{name}", "train.progress=false", "train.resume=none",
            "train.threads=1", "data.num_workers=1", "train.log_every=1000", "eval.knn_after_training=false"]
    cfg = load_config(str(ROOT / "configs" / "default.yaml"), base + over)
    t0 = time.time()
    tr = Trainer(cfg)
    orig = tr.train_step
    traj: list[list[float]] = []
    losses: list[float] = []

    def step(g: Any, l: Any, epoch: int, it: int, sample_ids: Any = None) -> float:
        if every and it and it % every == 0:
            traj.append([it, _knn20(tr.teacher.backbone, eval_root, cfg, tr.device),
                         round(sum(losses[-20:]) / max(1, len(losses[-20:])), 3)])
        v = orig(g, l, epoch, it, sample_ids=sample_ids)
        losses.append(float(v))
        return v

    tr.train_step = step  # type: ignore[method-assign]
    summary = tr.fit()
    t_train = time.time() - t0
    torch.manual_seed(cfg.train.seed + 12345)  # run_eval_report's random-init twin
    rnd = build_backbone(cfg, teacher=True).to(tr.device)
    res: dict[str, Any] = {
        "name": name, "overrides": list(overrides), "iterations": summary["iterations"],
        "t_train": round(t_train, 1), "loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 3),
        "knn_t": _knn20(tr.teacher.backbone, eval_root, cfg, tr.device), "knn_r": _knn20(rnd, eval_root, cfg, tr.device),
        "knn_t_std": _knn20(tr.teacher.backbone, std_root, cfg, tr.device), "knn_r_std": _knn20(rnd, std_root, cfg, tr.device),
        "traj": traj, "device": str(tr.device),
    }
    res["gain"] = round(res["knn_t"] - res["knn_r"], 1)
    res["gain_std"] = round(res["knn_t_std"] - res["knn_r_std"], 1)
    return res


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: runs, mean/min/max gain, mean gain on the built-in val split; best first."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "gain" in r:
            by.setdefault(r["variant"], []).append(r)
    out = []
    for v, rs in by.items():
        g = [r["gain"] for r in rs]
        out.append({"variant": v, "runs": len(g), "gain": round(sum(g) / len(g), 1), "min": min(g), "max": max(g),
                    "gain_std": round(sum(r["gain_std"] for r in rs) / len(rs), 1),
                    "t_train_s": round(sum(r["t_train"] for r in rs) / len(rs))})
    return sorted(out, key=lambda d: -d["gain"])


def sweep(variants: Sequence[str], seeds: Sequence[int], more_seeds: Sequence[int], top: int, parallel: int,
          budget_s: float, out: Path, eval_dir: str, std_dir: str, every: int, extra: Sequence[str]) -> list[dict[str, Any]]:
    """Run the two phases (module doc) as subprocesses; append each result to ``out``; return all rows."""
    from dino_fast.data.builtin import _is_current

    for d, counts in ((eval_dir, (120, 100)), (std_dir, (120, 30))):
        if not _is_current(Path(d)):  # missing (or an older format): generate; an existing one is used as is
            ensure_dataset(d, *counts)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"knn_sweep-{os.getpid()}"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + budget_s
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def job(v: str, s: int) -> tuple[str, str, list[str]]:
        return f"{v}__s{s}", v, VARIANTS[v] + list(extra) + [f"train.seed={s}"]

    todo = [job(v, s) for s in seeds for v in variants]
    n1, phase, running = len(todo), 1, []  # running: (proc, name, variant, t0, log file)
    with out.open("a") as fout:
        def reap(force: bool) -> None:
            for p in list(running):
                proc, name, v, t0, f = p
                if proc.poll() is None and not force:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                running.remove(p)
                f.close()
                text = Path(f.name).read_text()
                lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
                row = json.loads(lines[-1][7:]) if lines else {"name": name, "error": text[-800:], "rc": proc.returncode}
                row.update(variant=v, wall_s=round(time.time() - t0, 1))
                rows.append(row)
                fout.write(json.dumps(row) + "\n")
                fout.flush()
                print(json.dumps({k: row.get(k) for k in ("name", "gain", "gain_std", "knn_t", "knn_r", "loss",
                                                         "wall_s", "error")}), flush=True)

        while time.time() < deadline:
            done1 = sum(1 for r in rows if "gain" in r)
            if not todo and phase == 1 and (not running or done1 >= n1 - parallel // 2):
                phase = 2
                leaders = [d["variant"] for d in summarize(rows) if d["variant"] != "base"][:top]
                todo = [job(v, s) for s in more_seeds for v in (["base"] if "base" in variants else []) + leaders]
            if not todo and not running:
                break
            while todo and len(running) < parallel:
                name, v, over = todo.pop(0)
                f = (logs / f"{name}.log").open("w")
                cmd = [sys.executable, "-m", "bench.knn_sweep", "--one", name, "--eval-dir", eval_dir,
                       "--std-dir", std_dir, "--work-dir", str(work), "--every", str(every), "--"] + over
                running.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT), name, v,
                                time.time(), f))
            reap(False)
            time.sleep(1)
        reap(True)
    if todo:
        print("not started (budget):", [t[0] for t in todo])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line (module doc); returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m bench.knn_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names from --list (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--more-seeds", nargs="*", type=int, default=[2, 3, 4], help="phase 2 seeds (none: no phase 2)")
    p.add_argument("--top", type=int, default=6, help="variants that get phase 2")
    p.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--budget-s", type=float, default=3600.0, help="no run is started or kept after this")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "knn_sweep.jsonl")
    p.add_argument("--eval-dir", default="data_cache/knn_sweep_eval")
    p.add_argument("--std-dir", default="data_cache/builtin")
    p.add_argument("--every", type=int, default=90, help="teacher k-NN every N iterations during training (0: off)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default="/tmp/knn_sweep", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.list:
        for k, v in VARIANTS.items():
            print(f"{k:14s} {' '.join(v)}")
        return 0
    if a.one:  # a child: one run, one RESULT line
        res = run_one(a.one, a.overrides, eval_dir=a.eval_dir, std_dir=a.std_dir, work_dir=a.work_dir, every=a.every)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    rows = sweep(a.variants, a.seeds, a.more_seeds, a.top, a.parallel, a.budget_s, a.out, a.eval_dir, a.std_dir,
                 a.every, a.overrides)
    from bench.common import fmt_table

    table = summarize(rows)
    print(fmt_table(table, ["variant", "runs", "gain", "min", "max", "gain_std", "t_train_s"]))
    return 0 if table else 1


if __name__ == "__main__":
    sys.exit(main())

"""How far labels take the same ViT on each image set: a ceiling for ``bench.learning``'s gains.

``python -m bench.learning`` asks self-distillation for a k-NN / linear gain of 25 points over
random init. Whether that is within reach of the model on a given set is a separate question,
which this benchmark answers with labels: the backbone of ``configs/default.yaml`` (after
``data.auto_crops`` for the set, so the same architecture, crop size and evaluation size as the
self-supervised run) plus a linear head, trained end to end with cross-entropy on the train split
and read once on the val split (top-1 at the last epoch; no model selection on val).

Training: the train images are loaded once as the evaluation does (shorter side to
``eval.resize_size``, centre ``eval.image_size`` crop) and held in memory; each step draws a
batch, takes a random resized crop of each image (area scale ``--crop-min`` to 1, aspect 3/4-4/3)
to the global crop size, flips half of them; AdamW (``--lr`` at batch 256, scaled linearly,
weight decay 0.05), a linear warm-up over the first 5 % of the steps and a cosine to 0, label
smoothing 0.1, under bfloat16 autocast (``--precision``, as the self-supervised run on a CPU with
native bf16) or float32. The val split is evaluated at ``eval.image_size`` (the self-supervised
run's probes read it at the same size). Every pair of ``--lr`` and ``--crop-min`` runs; a set's
ceiling is the best pair's mean over seeds, chosen on val, so it errs high, as a ceiling should.

Usage::

    python -m bench.supervised                         # digits, glyphs, scenes, photos; seeds 0 1 2
    python -m bench.supervised --sets scenes photos --seeds 0   # one seed per setting

Writes ``--out`` (default ``bench/results/supervised.json``) with one record per run and, per set,
every setting's mean top-1 and the best one beside the self-supervised figures of ``bench/results/learning.json`` when that
file holds the set. A few minutes per run on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench import datasets
from bench.common import machine_info, write_json

ROOT = Path(__file__).resolve().parents[1]


def load_splits(train_root: Path, val_root: Path, *, image_size: int, resize_size: int, num_workers: int = 2
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The images of a train and a val folder as the evaluation loads them
    (:func:`dino_fast.eval.knn.eval_loaders`, which also checks that both name the same classes).

    Returns:
        ``[(train images, train labels), (val images, val labels)]``: images float32
        [N, 3, image_size, image_size], normalised as the evaluation does; labels int64 [N].

    Raises:
        ValueError: the folders name different classes, or one holds no images.
    """
    from dino_fast.eval.knn import eval_loaders
    loaders, _ = eval_loaders(train_root, val_root, image_size=image_size, resize_size=resize_size,
                              batch_size=256, num_workers=num_workers)
    splits = []
    for root, loader in zip((train_root, val_root), loaders):
        batches = [(x.float(), y.long()) for x, y in loader]
        if not batches:
            raise ValueError(f"{root}: no images")
        splits.append((torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])))
    return splits


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator, *,
                        seed: int, epoch: int, samples: torch.Tensor) -> torch.Tensor:
    """A random resized crop of each image, resized to ``size``, flipped with probability 1/2.

    The box is the multi-crop loaders' own (:func:`dino_fast.data.crops.crop_box`: RandomResizedCrop
    semantics, aspect ratio log-uniform in [3/4, 4/3], 10 tries then the centre crop), drawn from
    the stream ``(seed, epoch, sample, 0)`` of each image's index in the train split, so a box does
    not depend on the batch it lands in; the flip comes from ``generator``.

    Args:
        x: float [B, C, H, W].
        size: output side.
        scale: (min, max) fraction of the image area kept.
        seed, epoch: non-negative integers naming the crop stream.
        samples: int64 [B], each image's index in the train split.

    Returns:
        float [B, C, size, size].

    Raises:
        ValueError: ``samples`` does not hold one index per image.
    """
    from dino_fast.data.crops import crop_box
    B, _, H, W = x.shape
    if samples.shape != (B,):
        raise ValueError(f"samples: expected one index per image, shape ({B},), got {tuple(samples.shape)}")
    out = []
    for i, sample in enumerate(samples.tolist()):
        top, left, h, w = crop_box(H, W, scale[0], scale[1], 3 / 4, 4 / 3, seed, epoch, int(sample), 0)
        crop = F.interpolate(x[i:i + 1, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)
        if torch.rand((), generator=generator).item() < 0.5:
            crop = crop.flip(3)
        out.append(crop)
    return torch.cat(out)


class Classifier(nn.Module):
    """``backbone`` (images -> [B, D] CLS features) followed by a linear layer to ``num_classes``."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] -> logits float [B, num_classes]."""
        return self.head(self.backbone(x))


def train_supervised(cfg: Any, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
                     epochs: int, lr: float, batch_size: int, crop_scale: tuple[float, float], seed: int,
                     precision: str = "fp32") -> dict[str, Any]:
    """Train ``cfg``'s student backbone plus a linear head on ``train`` and score it on ``val``.

    Args:
        cfg: a resolved :class:`dino_fast.config.TrainConfig` (architecture, crop size).
        train, val: (images float [N, 3, S, S], labels int64 [N]) as :func:`load_splits` returns.
        epochs: passes over ``train``; lr: AdamW lr at batch 256 (scaled by ``batch_size`` / 256).
        precision: ``"bf16"`` (CPU autocast to bfloat16; weights and optimizer stay float32) or ``"fp32"``.

    Returns:
        ``{"top1", "top5", "train_top1", "steps", "seconds"}`` (top-k in %, ``train_top1`` on the
        centre crops of the train split).
    """
    from dino_fast.methods import build_backbone
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = train
    num_classes = int(max(y_tr.max().item(), val[1].max().item())) + 1
    backbone = build_backbone(cfg, teacher=False)
    with torch.no_grad():
        dim = backbone(x_tr[:1]).shape[-1]
    model = Classifier(backbone, dim, num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr * batch_size / 256, weight_decay=0.05)
    steps_per_epoch = max(1, x_tr.shape[0] // batch_size)
    steps = epochs * steps_per_epoch
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(x_tr.shape[0], generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            xb = random_resized_crop(x_tr[idx], cfg.data.global_crops_size, crop_scale, gen,
                                     seed=seed, epoch=epoch, samples=idx)
            with autocast:
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), y_tr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    model.eval()

    @torch.no_grad()
    def score(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        with autocast:
            logits = torch.cat([model(x[i:i + 256]).float() for i in range(0, x.shape[0], 256)])
        top = logits.topk(min(5, num_classes), dim=1).indices
        return (100.0 * (top[:, 0] == y).float().mean().item(), 100.0 * (top == y[:, None]).any(1).float().mean().item())

    top1, top5 = score(*val)
    train_top1, _ = score(x_tr, y_tr)
    return {"top1": top1, "top5": top5, "train_top1": train_top1, "steps": steps, "seconds": round(seconds, 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m bench.supervised", description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=list(datasets.DEFAULT_SETS), help=f"of {sorted(datasets.SETS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3], help="AdamW lr(s) at batch 256")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--crop-min", type=float, nargs="+", default=[0.25, 0.5],
                   help="smallest area fraction(s) of the random resized crop (the largest is 1)")
    p.add_argument("--cache", default="data_cache/sets", help="where the image sets are written")
    p.add_argument("--learning", default="bench/results/learning.json", help="self-supervised results to set beside")
    p.add_argument("--out", default="bench/results/supervised.json")
    args = p.parse_args(list(argv) if argv is not None else None)
    unknown = [s for s in args.sets if s not in datasets.SETS]
    if unknown:
        p.error(f"unknown set(s) {unknown}; known: {sorted(datasets.SETS)}")
    if args.epochs < 1 or args.batch_size < 1 or not all(0 < c <= 1 for c in args.crop_min) \
            or not all(lr > 0 for lr in args.lr):
        p.error("--epochs and --batch-size must be >= 1, --lr > 0 and --crop-min in (0, 1]")
    from dino_fast.config import apply_auto_crops, load_config
    from dino_fast.data.sizing import median_image_side
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(str(ROOT / args.config), [])
    learning_path = ROOT / args.learning
    ssl = {s["set"]: s for s in json.loads(learning_path.read_text())["summaries"]} if learning_path.exists() else {}
    grid = [(lr, c) for lr in args.lr for c in args.crop_min]
    records, summaries = [], []
    for name in args.sets:
        root = datasets.build(name, ROOT / args.cache)
        set_cfg, _ = apply_auto_crops(cfg, median_image_side(root / "train"))
        kw = dict(image_size=set_cfg.eval.image_size, resize_size=set_cfg.eval.resize_size)
        train, val = load_splits(root / "train", root / "val", **kw)
        settings = []
        for lr, crop_min in grid:
            runs = []
            for seed in args.seeds:
                rec = {"set": name, "seed": seed, "lr": lr, "crop_min": crop_min, **train_supervised(
                    set_cfg, train, val, epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                    crop_scale=(crop_min, 1.0), seed=seed, precision=args.precision)}
                print(f"{name} lr {lr:g} crop {crop_min:g}-1 seed {seed}: supervised top-1 {rec['top1']:.1f} "
                      f"(train {rec['train_top1']:.1f}), {rec['steps']} steps, {rec['seconds']:.0f} s", flush=True)
                runs.append(rec)
            records += runs
            top1 = [r["top1"] for r in runs]
            settings.append({"lr": lr, "crop_min": crop_min, "top1_mean": round(statistics.fmean(top1), 2),
                             "top1_std": round(statistics.stdev(top1), 2) if len(top1) > 1 else 0.0})
        best = max(settings, key=lambda t: t["top1_mean"])
        # the best setting is chosen on val: an optimistic ceiling, which is what a ceiling should be
        s: dict[str, Any] = {"set": name, "seeds": list(args.seeds), "settings": settings, "best": best,
                             "top1_best": best["top1_mean"]}
        if name in ssl:
            s["knn_random"] = ssl[name]["knn_random"]["mean"]
            s["knn_teacher"] = ssl[name]["knn_teacher"]["mean"]
            s["linear_teacher"] = ssl[name]["linear_teacher"]["mean"]
            s["best_minus_knn_random"] = round(best["top1_mean"] - s["knn_random"], 2)
        summaries.append(s)
        print(f"{name}: supervised, best of {len(grid)} settings on val (lr {best['lr']:g}, crop {best['crop_min']:g}-1): "
              f"{best['top1_mean']:.1f} +- {best['top1_std']:.1f}"
              + (f" | self-supervised k-NN random {s['knn_random']:.1f} -> trained {s['knn_teacher']:.1f}, "
                 f"supervised best - random {s['best_minus_knn_random']:+.1f}" if name in ssl else ""), flush=True)
    out = {"machine": machine_info(),
           "config": args.config, "epochs": args.epochs, "lrs": list(args.lr), "batch_size": args.batch_size,
           "crop_mins": list(args.crop_min), "precision": args.precision, "summaries": summaries, "runs": records}
    out_path = ROOT / args.out
    print(f"wrote {write_json(out_path, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

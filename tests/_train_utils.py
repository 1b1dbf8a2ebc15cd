"""Helpers for trainer tests: a tiny image folder and a tiny config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from dino_fast.config import TrainConfig, load_config


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 8, size: int = 48, seed: int = 0) -> Path:
    """Small labelled JPEG folder: class c draws c+3-gons of random colour on noise."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            draw = ImageDraw.Draw(img)
            cx, cy, r = rng.integers(14, size - 14), rng.integers(14, size - 14), rng.integers(6, 12)
            k = c + 3
            pts = [(cx + r * np.cos(2 * np.pi * j / k), cy + r * np.sin(2 * np.pi * j / k)) for j in range(k)]
            draw.polygon(pts, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            img.save(d / f"{i:03d}.jpg", quality=90)
    return root


def tiny_config(data_root: Path, out_dir: Path, *extra: str) -> TrainConfig:
    """A config that trains in a second or two on the CPU."""
    return load_config(None, [
        "model.arch=vit_tiny", "model.patch_size=8", "model.depth=1", "model.out_dim=64",
        "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "model.drop_path_rate=0.1",
        f"data.root={data_root}", "data.global_crops_size=32", "data.local_crops_size=16",
        "data.local_crops_number=2", "data.batch_size_per_gpu=4", "data.num_workers=0", "data.backend=folder",
        "optim.warmup_epochs=1", "optim.lr=0.001", "train.epochs=4", f"train.output_dir={out_dir}",
        "train.log_every=1", "train.progress=false", "train.saveckp_freq=0", "eval.knn_after_training=false",
        "train.precision=fp32",  # the same numerics on every CPU ("auto" picks bf16 on CPUs with native bf16)
        *extra,
    ])


def write_config(cfg: TrainConfig, path: Path) -> Path:
    """The config as a YAML file for ``--config`` (a subprocess cannot take a TrainConfig)."""
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def read_losses(out_dir: Path) -> dict[int, float]:
    """iteration -> loss from metrics.jsonl."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["iteration"]] = rec["loss"]
    return out

"""Weighted k-NN evaluation (the DINO paper's protocol) and the ``dino-fast knn`` command.

Features: the backbone's CLS output, L2-normalised. For each test feature the k most similar
train features (cosine similarity) vote for their class with weight exp(sim / T), T = 0.07.
Similarities are computed in test-batches against all train features, so memory stays
O(batch x n_train) whatever the set sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dino_fast.config import config_from_dict
from dino_fast.data import build_eval_loader
from dino_fast.data.builtin import ensure_builtin_dataset
from dino_fast.methods.base import build_backbone
from dino_fast.utils import checkpoint as ckpt_mod


@torch.no_grad()
def extract_features(model: nn.Module, loader: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` ((images float [B,3,S,S], labels int64 [B]) batches).

    Returns:
        (features fp32 [N, D] L2-normalised, labels int64 [N]) on the CPU.
    """
    model.eval()
    feats, labels = [], []
    for images, y in loader:
        out = model(images.to(device))
        feats.append(F.normalize(out.float(), dim=1).cpu())
        labels.append(y.cpu())
    if not feats:
        raise ValueError("the loader yielded no batches: is the image folder empty?")
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Weighted k-NN accuracy.

    Args:
        train_features: [N, D] float, L2-normalised rows.
        train_labels: [N] int64 in [0, num_classes).
        test_features: [M, D] float, L2-normalised rows.
        test_labels: [M] int64.
        k: neighbours (clamped to N).
        temperature: vote weight exp(sim / temperature).
        num_classes: number of classes (default: max label + 1 over both sets).
        batch_size: test rows per similarity block (memory O(batch_size x N)).

    Returns:
        ``{"top1": %, "top5": %}`` (top-5 equals top-1 coverage when there are < 5 classes).
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D]; got train {tuple(train_features.shape)}, "
                         f"test {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dims differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],) or test_labels.shape != (test_features.shape[0],):
        raise ValueError("labels must be 1-D with one label per feature row")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    n = train_features.shape[0]
    if n == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one train and one test feature")
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    k = min(k, n)
    train_t = train_features.t().contiguous()
    top1 = top5 = 0
    for start in range(0, test_features.shape[0], batch_size):
        feats = test_features[start:start + batch_size]
        targets = test_labels[start:start + batch_size]
        sim = feats @ train_t  # [b, N]
        dist, idx = sim.topk(k, dim=1, largest=True, sorted=True)
        neighbours = train_labels[idx]  # [b, k]
        weights = (dist / temperature).exp()
        votes = torch.zeros(feats.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, neighbours, weights)
        order = votes.argsort(dim=1, descending=True)
        correct = order.eq(targets[:, None])
        top1 += correct[:, :1].sum().item()
        top5 += correct[:, : min(5, num_classes)].sum().item()
    m = test_features.shape[0]
    return {"top1": 100.0 * top1 / m, "top5": 100.0 * top5 / m}


def eval_loaders(
    train_root: str | Path, val_root: str | Path, *, image_size: int, resize_size: Optional[int],
    batch_size: int, num_workers: int,
) -> tuple[list[Any], list[str]]:
    """The evaluation loaders of a train and a val image folder and their classes.

    Returns ``([train_loader, val_loader], classes)`` (``classes`` empty when the dataset does not
    name them).

    Raises:
        ValueError: the two folders name different classes.
    """
    loaders = [build_eval_loader(str(r), image_size=image_size, resize_size=resize_size,
                                 batch_size=batch_size, num_workers=num_workers)
               for r in (train_root, val_root)]
    train_classes = list(getattr(loaders[0].dataset, "classes", []))
    val_classes = list(getattr(loaders[1].dataset, "classes", []))
    if train_classes and val_classes and train_classes != val_classes:
        raise ValueError(f"train and val folders have different classes: {train_classes} vs {val_classes}")
    return loaders, train_classes


def knn_eval_backbone(
    backbone: nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    *,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    image_size: int = 224,
    resize_size: Optional[int] = None,
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """Features of ``backbone`` on two image folders, then weighted k-NN for every k in ``ks``.

    Returns ``{str(k): {"top1": %, "top5": %}}``.
    """

    device = torch.device(device)
    loaders, train_classes = eval_loaders(train_root, val_root, image_size=image_size, resize_size=resize_size,
                                          batch_size=batch_size, num_workers=num_workers)
    train_f, train_y = extract_features(backbone, loaders[0], device)
    val_f, val_y = extract_features(backbone, loaders[1], device)
    num_classes = len(train_classes) or None
    return {str(k): knn_classify(train_f, train_y, val_f, val_y, k=k, temperature=temperature,
                                 num_classes=num_classes) for k in ks}


def run_eval_roots(cfg: Any) -> Optional[tuple[Path, Path]]:
    """The (train, val) image folders for the k-NN of a run described by ``cfg`` (a TrainConfig).

    ``data.root`` empty: the built-in dataset's splits (generated if missing), or ``data.val_root``
    for val when it is set; ``data.root`` set: ``(data.root, data.val_root)``, or None when there
    is no ``data.val_root`` to evaluate on.
    """
    if cfg.data.root:
        return (Path(cfg.data.root), Path(cfg.data.val_root)) if cfg.data.val_root else None
    base = Path(ensure_builtin_dataset(cfg.data.builtin_dir))
    return base / "train", Path(cfg.data.val_root) if cfg.data.val_root else base / "val"


def eval_roots_for(cfg: Any, train: Optional[str], val: Optional[str]) -> tuple[Path, Path]:
    """The (train, val) folders of an evaluation command: the given ones, the missing ones taken
    from the run's config (:func:`run_eval_roots`).

    Raises:
        ValueError: one is missing and the run trained on a custom ``data.root`` without
            ``data.val_root``.
    """
    if train is not None and val is not None:
        return Path(train), Path(val)
    roots = run_eval_roots(cfg)
    if roots is None:
        raise ValueError("this run trained on a custom data.root without data.val_root: pass --train and --val")
    return Path(train or roots[0]), Path(val or roots[1])


def load_backbone_from_checkpoint(path: str | Path, which: str = "teacher") -> tuple[nn.Module, Any]:
    """Rebuild the backbone of a training checkpoint (``which`` = teacher or student) and return
    (backbone, TrainConfig). Also accepts an exported ``teacher_backbone.pth`` when a
    ``config.json`` lies next to it."""
    path = Path(path)
    if path.name == "teacher_backbone.pth":
        cfg_path = path.parent / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{path} needs the run's config.json beside it to rebuild the model")
        cfg = config_from_dict(json.loads(cfg_path.read_text()))
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        ck = ckpt_mod.load_checkpoint(path)
        cfg = config_from_dict(ck["config"])
        if which not in ("teacher", "student"):
            raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
        state = {k[len("backbone."):]: v for k, v in ck[which].items() if k.startswith("backbone.")}
    backbone = build_backbone(cfg, teacher=True)
    ckpt_mod.check_state_dict_compatible(backbone, state, f"{which} backbone")
    backbone.load_state_dict(state)
    return backbone, cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-fast knn --checkpoint CKPT [--train DIR --val DIR]``: prints top-1/top-5 per k."""
    p = argparse.ArgumentParser(prog="dino-fast knn", description="weighted k-NN evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth or teacher_backbone.pth")
    p.add_argument("--train", default=None, help="train image folder (default: the run's built-in train split)")
    p.add_argument("--val", default=None, help="val image folder (default: the run's built-in val split)")
    p.add_argument("--which", default="teacher", choices=["teacher", "student"])
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        backbone, cfg = load_backbone_from_checkpoint(a.checkpoint, a.which)
        train_root, val_root = eval_roots_for(cfg, a.train, a.val)
        size = a.image_size or cfg.eval.image_size
        res = knn_eval_backbone(backbone.to(a.device), train_root, val_root, ks=a.k, temperature=a.temperature,
                                image_size=size, resize_size=cfg.eval.resize_size if a.image_size is None else None,
                                batch_size=a.batch_size, device=a.device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dino-fast knn: {e}", file=sys.stderr)
        return 2
    for k, v in res.items():
        print(f"k={k:>4}: top-1 {v['top1']:6.2f}  top-5 {v['top5']:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0

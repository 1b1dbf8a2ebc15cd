"""Linear probe of the DINO paper (``eval_linear.py``) on cached features, and ``dino-fast linear``.

Features (official semantics): the CLS token after the final norm of each of the last
``n_last_blocks`` blocks, concatenated; with ``avgpool_patchtokens`` the mean of the last block's
normalised patch tokens too. The paper uses n = 4 without avgpool for ViT-S and n = 1 with
avgpool for ViT-B.

Classifier (official): one ``nn.Linear`` on the raw features (no standardisation, no BatchNorm),
weights ~ N(0, 0.01), bias 0, cross-entropy, SGD with momentum 0.9, weight decay 0 and a cosine
schedule (stepped once per epoch, to 0) over 100 epochs.

Differences from the official script, both for speed on small problems:

- the backbone runs once: features of the centre crop are cached and the classifier trains on
  them (the official script re-augments every epoch with random-resized crops and flips);
- the learning rate, unless given, is picked by a sweep over :data:`LR_GRID` on a stratified
  10 % held-out split of the train features (then refit on all of them); when that split would
  hold fewer than :data:`MIN_HOLDOUT` images, by stratified 10-fold cross-validation instead, so
  that every train image is held out once. DINOv2's linear evaluation likewise trains a grid of
  classifiers and keeps the best one; here the pick is made on held-out train features, so the
  val score is not selected on.

Why a sweep rather than the official default (0.001 x batch / 256): that lr is tuned for
ImageNet's ~5000 iterations per epoch. A small set gives a few iterations per epoch, and the
best lr then depends on the feature scale and on N / D: without weight decay a small lr acts as
early stopping (best when D is large against N), a large one is needed when few steps must
separate the classes. On 14 synthetic 10-class problems (Gaussian classes, LayerNorm-ed
features, N 100-1000, D 8-384) the sweep scored 1.8 points below the best lr of the grid on
average, the official 0.001 6.8 points below.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dino_fast.eval.knn import eval_loaders, eval_roots_for, load_backbone_from_checkpoint

__all__ = [
    "LR_GRID",
    "extract_probe_features",
    "linear_eval",
    "linear_eval_backbone",
    "linear_eval_features",
    "main",
    "probe_input",
    "select_lr",
    "train_linear",
]

# SGD learning rates tried when train_linear/linear_eval get lr=None (the actual step sizes,
# not scaled by the batch size). Raw ViT features have unit-scale coordinates; the range spans
# strong early stopping (1e-4) to a few hundred iterations on well-separated classes (1.0).
LR_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
HOLDOUT_FRAC = 0.1
# below this many held-out images the sweep pools 1 / HOLDOUT_FRAC stratified folds instead of one
# split: a held-out top-1 of n images has a binomial sd of 50 / sqrt(n) points at 50 % (3.5 at
# 200, 9 at 30), as large as the gaps between neighbouring lrs
MIN_HOLDOUT = 200


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------

def probe_input(tokens: Sequence[torch.Tensor], avgpool_patchtokens: bool = False) -> torch.Tensor:
    """The linear probe's input from the normalised tokens of the last n blocks.

    Args:
        tokens: n tensors ``[B, 1 + P, D]`` (CLS first), oldest block first, as returned by
            ``VisionTransformer.get_intermediate_layers(x, n)``.
        avgpool_patchtokens: also use the mean of the last block's P patch tokens.

    Returns:
        ``[B, n*D]`` (CLS tokens of the blocks, concatenated in block order), or with
        ``avgpool_patchtokens`` ``[B, n*D + D]``. For n = 1 the official layout is kept exactly:
        CLS and pooled features interleaved per coordinate, ``[cls_0, avg_0, cls_1, avg_1, ...]``,
        so the published ViT-B linear heads apply unchanged. For n > 1 (where the official
        script fails on a shape mismatch) the pooled features are appended after the CLS tokens.
    """
    if len(tokens) == 0:
        raise ValueError("probe_input needs the tokens of at least one block, got none")
    out = torch.cat([t[:, 0] for t in tokens], dim=-1)
    if avgpool_patchtokens:
        last = tokens[-1]
        if last.shape[1] < 2:
            raise ValueError(f"avgpool_patchtokens needs patch tokens; the last block has shape {tuple(last.shape)}")
        pooled = last[:, 1:].mean(dim=1)
        if len(tokens) == 1:
            out = torch.stack((out, pooled), dim=-1).reshape(out.shape[0], -1)
        else:
            out = torch.cat((out, pooled), dim=-1)
    return out


@torch.no_grad()
def extract_probe_features(
    backbone: nn.Module,
    loader: Any,
    device: torch.device | str,
    *,
    n_last_blocks: int = 1,
    avgpool_patchtokens: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen ``backbone`` (in eval mode) over ``loader`` and build the probe features.

    Args:
        backbone: a ViT with ``get_intermediate_layers(x, n)`` returning the normalised tokens of
            the last n blocks (:class:`dino_fast.models.VisionTransformer`, or the official one).
        loader: yields ``(images float [B, 3, S, S], labels int [B])``.
        device: where the backbone runs.
        n_last_blocks: 1 <= n <= the number of blocks.
        avgpool_patchtokens: see :func:`probe_input`.

    Returns:
        (features float32 ``[N, n*D (+ D)]``, labels int64 ``[N]``), on the CPU. Not normalised.
    """
    if isinstance(n_last_blocks, bool) or not isinstance(n_last_blocks, int) or n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be a positive int, got {n_last_blocks!r}")
    if not callable(getattr(backbone, "get_intermediate_layers", None)):
        raise TypeError(f"the backbone ({type(backbone).__name__}) has no get_intermediate_layers(x, n): "
                        "the linear probe needs a ViT's per-block tokens")
    blocks = getattr(backbone, "blocks", None)
    if blocks is not None and n_last_blocks > len(blocks):
        raise ValueError(f"n_last_blocks={n_last_blocks} but the backbone has only {len(blocks)} blocks")
    device = torch.device(device)
    backbone.eval()
    feats, labels = [], []
    for images, y in loader:
        tokens = backbone.get_intermediate_layers(images.to(device), n_last_blocks)
        feats.append(probe_input(tokens, avgpool_patchtokens).float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    if not feats:
        raise ValueError("the loader yielded no batches: is the image folder empty?")
    return torch.cat(feats), torch.cat(labels).long()


# --------------------------------------------------------------------------------------------
# training on cached features
# --------------------------------------------------------------------------------------------

def _check_features(name: str, feats: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(feats, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected tensors (features [N, D] float, labels [N] int64), got "
                        f"{type(feats).__name__} and {type(labels).__name__}")
    if feats.ndim != 2 or not feats.is_floating_point():
        raise ValueError(f"{name} features: expected a float tensor [N, D], got {feats.dtype} {tuple(feats.shape)}")
    if labels.shape != (feats.shape[0],):
        raise ValueError(f"{name} labels: expected shape ({feats.shape[0]},) (one per feature row), "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} labels: expected an integer tensor, got {labels.dtype}")
    if feats.shape[0] == 0:
        raise ValueError(f"{name}: no samples")


def _check_label_range(name: str, labels: torch.Tensor, num_classes: int) -> None:
    lo, hi = torch.stack([labels.min(), labels.max()]).tolist()
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def _check_hparams(num_classes: int, epochs: int, batch_size: int, weight_decay: float, momentum: float) -> None:
    for name, v in (("num_classes", num_classes), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if num_classes < 2:
        raise ValueError(f"a linear probe needs at least 2 classes, got num_classes={num_classes}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")


def _check_lr(lr: float) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite float > 0 (or None to sweep LR_GRID), got {lr!r}")
    return float(lr)


@torch.no_grad()
def _fit_sgd(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float], *, epochs: int,
    batch_size: int, weight_decay: float, momentum: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``len(lrs)`` independent linear classifiers at once, one per lr, on the same
    mini-batches (the same order for all, drawn from ``seed``).

    Each classifier follows ``torch.optim.SGD(momentum, weight_decay)`` (dampening 0, weight decay
    on weight and bias as in the official script) on the mean cross-entropy, with the lr of
    epoch e equal to ``lr * (1 + cos(pi * e / epochs)) / 2`` (CosineAnnealingLR, eta_min 0).

    Returns:
        (weights ``[G, C, D]``, biases ``[G, C]``) float32 on x's device.
    """
    g_count = len(lrs)
    n, d = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w0 = torch.randn(num_classes, d, generator=gen, dtype=torch.float32) * 0.01
    w = w0.to(x.device).expand(g_count, -1, -1).clone()
    b = torch.zeros(g_count, num_classes, device=x.device)
    buf_w = torch.zeros_like(w)
    buf_b = torch.zeros_like(b)
    base = torch.tensor(list(lrs), dtype=torch.float32, device=x.device)
    for epoch in range(epochs):
        lr_w = (base * (0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))).view(g_count, 1, 1)
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
            logits = torch.baddbmm(b.unsqueeze(1), xb.expand(g_count, -1, -1), w.transpose(1, 2))  # [G, B, C]
            grad = torch.softmax(logits, dim=-1)
            grad[:, torch.arange(len(idx), device=x.device), yb] -= 1.0
            grad /= len(idx)
            g_w = torch.bmm(grad.transpose(1, 2), xb.expand(g_count, -1, -1))  # [G, C, D]
            g_b = grad.sum(dim=1)
            if weight_decay:
                g_w.add_(w, alpha=weight_decay)
                g_b.add_(b, alpha=weight_decay)
            if momentum:
                buf_w.mul_(momentum).add_(g_w)
                buf_b.mul_(momentum).add_(g_b)
                g_w, g_b = buf_w, buf_b
            w.sub_(lr_w * g_w)
            b.sub_(lr_w[:, :, 0] * g_b)
    return w, b


@torch.no_grad()
def _scores(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Accuracy (%) and mean cross-entropy of each of the G classifiers on (x, y); NaN/inf
    weights give accuracy -1 and loss inf (never picked)."""
    logits = torch.baddbmm(b.unsqueeze(1), x.expand(w.shape[0], -1, -1), w.transpose(1, 2))
    acc = logits.argmax(dim=-1).eq(y).double().mean(dim=1) * 100.0
    loss = torch.stack([F.cross_entropy(lg, y) for lg in logits]).double()
    finite = torch.isfinite(w).flatten(1).all(dim=1) & torch.isfinite(b).all(dim=1) & torch.isfinite(loss)
    acc = torch.where(finite, acc, torch.full_like(acc, -1.0))
    loss = torch.where(finite, loss, torch.full_like(loss, math.inf))
    return acc.tolist(), loss.tolist()


def _stratified_folds(y: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold index (int64 ``[N]``, in ``[0, folds)``, or -1) of every sample: each class's samples
    in a random order (from ``seed``) dealt round-robin over the folds, starting at a random fold,
    so every fold holds ``floor`` or ``ceil`` of ``n_c / folds`` of class c; classes with one
    sample get -1 (never held out)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    y_cpu = y.cpu()
    fold = torch.full((len(y_cpu),), -1, dtype=torch.long)
    for c in torch.unique(y_cpu).tolist():
        idx = torch.nonzero(y_cpu == c).flatten()
        if len(idx) < 2:
            continue
        idx = idx[torch.randperm(len(idx), generator=gen)]
        start = int(torch.randint(folds, (1,), generator=gen))
        fold[idx] = (torch.arange(len(idx)) + start) % folds
    return fold


def _pooled_fold_scores(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float], fold: torch.Tensor, **fit_kw: Any,
) -> tuple[list[float], list[float]]:
    """:func:`_scores` pooled over cross-validation folds: for each fold index f of ``fold`` (int64
    ``[N]``; -1 is never held out) the classifiers of :func:`_fit_sgd` (``fit_kw``) train on the
    samples outside f and are scored on those in it; top-1 (%) and cross-entropy are averaged over
    every held-out sample. An lr that diverges on any fold gets -1 and inf."""
    n_held = 0
    acc_sum, loss_sum = [0.0] * len(lrs), [0.0] * len(lrs)
    diverged = [False] * len(lrs)
    for f in range(int(fold.max()) + 1):
        held = fold == f
        m = int(held.sum())
        if m == 0:
            continue
        w, b = _fit_sgd(x[~held], y[~held], num_classes, lrs, **fit_kw)
        a, lo = _scores(w, b, x[held], y[held])
        for i in range(len(lrs)):
            diverged[i] = diverged[i] or a[i] < 0.0
            acc_sum[i] += a[i] * m
            loss_sum[i] += lo[i] * m
        n_held += m
    acc = [-1.0 if diverged[i] else acc_sum[i] / n_held for i in range(len(lrs))]
    loss = [math.inf if diverged[i] else loss_sum[i] / n_held for i in range(len(lrs))]
    return acc, loss


def _stratified_split(y: torch.Tensor, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train idx, held-out idx): ``floor(frac * n_c)`` of each class, at least one from every
    class with >= 2 samples; classes with one sample stay in train."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    y_cpu = y.cpu()
    keep, held = [], []
    for c in torch.unique(y_cpu).tolist():
        idx = torch.nonzero(y_cpu == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = max(1, int(frac * len(idx))) if len(idx) >= 2 else 0
        held.append(idx[:k])
        keep.append(idx[k:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def select_lr(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    lrs: Sequence[float] = LR_GRID,
    holdout_frac: float = HOLDOUT_FRAC,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
    min_holdout: int = MIN_HOLDOUT,
) -> tuple[float, dict[str, float]]:
    """Pick the SGD learning rate of the probe by a sweep on held-out parts of the train set.

    A stratified ``holdout_frac`` of the train features (at least one sample of every class
    that has two) is held out; one classifier per lr in ``lrs`` trains on the rest (all at once,
    same init and batches) with the given schedule; the lr with the best held-out top-1 wins,
    ties broken by the lower held-out cross-entropy, then by the smaller lr. Diverged runs
    (non-finite weights) never win. When nothing can be held out (every class has one
    sample) the train loss decides.

    When that split would hold fewer than ``min_holdout`` samples, the sweep cross-validates
    instead: ``round(1 / holdout_frac)`` stratified folds (:func:`_stratified_folds`), each held
    out once while the classifiers train on the others, and the top-1 and cross-entropy pooled
    over every held-out sample (a run that diverges on any fold never wins). With ``min_holdout=0``
    the single split is always used.

    Returns:
        (best lr, ``{str(lr): held-out top-1 %}`` for every lr tried; -1 for a diverged run).
    """
    _check_features("train", train_feats, train_labels)
    _check_hparams(num_classes, epochs, batch_size, weight_decay, momentum)
    _check_label_range("train", train_labels, num_classes)
    lrs = [_check_lr(v) for v in lrs]
    if not lrs:
        raise ValueError("lrs: expected at least one learning rate to try")
    if not 0.0 < holdout_frac < 1.0:
        raise ValueError(f"holdout_frac must be in (0, 1), got {holdout_frac!r}")
    if isinstance(min_holdout, bool) or not isinstance(min_holdout, int) or min_holdout < 0:
        raise ValueError(f"min_holdout must be an int >= 0, got {min_holdout!r}")
    x = train_feats.float()
    y = train_labels.long().to(x.device)
    fit_kw = dict(epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, momentum=momentum, seed=seed)
    fit_idx, held_idx = _stratified_split(y, holdout_frac, seed)
    folds = max(2, round(1.0 / holdout_frac))
    if 0 < len(held_idx) < min_holdout:
        acc, loss = _pooled_fold_scores(x, y, num_classes, lrs, _stratified_folds(y, folds, seed).to(x.device),
                                        **fit_kw)
    else:
        if len(held_idx) == 0:
            fit_idx = held_idx = torch.arange(len(y))
        fit_idx, held_idx = fit_idx.to(x.device), held_idx.to(x.device)
        w, b = _fit_sgd(x[fit_idx], y[fit_idx], num_classes, lrs, **fit_kw)
        acc, loss = _scores(w, b, x[held_idx], y[held_idx])
    best = min(range(len(lrs)), key=lambda i: (-acc[i], loss[i], lrs[i]))
    return lrs[best], {f"{lr:g}": a for lr, a in zip(lrs, acc)}


def train_linear(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: Optional[float] = None,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
) -> nn.Linear:
    """Train the official linear probe on cached features.

    ``nn.Linear(D, num_classes)``, weights N(0, 0.01) and bias 0, on the raw features (the
    official choice: no standardisation, no BatchNorm; scale the features yourself if they are
    far from unit scale); cross-entropy, SGD with ``momentum`` and ``weight_decay``, the lr
    following a cosine from ``lr`` at epoch 0 towards 0 at ``epochs`` (stepped per epoch);
    mini-batches of ``batch_size`` in a fresh random order every epoch. Runs on the features'
    device; deterministic given ``seed`` (init and batch order come from it).

    Args:
        train_feats: ``[N, D]`` float. train_labels: ``[N]`` int in ``[0, num_classes)``.
        num_classes: C >= 2.
        lr: the SGD step size. None: :func:`select_lr` picks it from :data:`LR_GRID` on a 10 %
            held-out split of these features (10-fold cross-validation when that split would
            hold under :data:`MIN_HOLDOUT`), and the probe is then refit on all of them. (The
            official default, 0.001 x batch_size / 256, suits ImageNet's thousands of
            iterations per epoch; on small problems the best lr depends on the feature scale
            and on N / D, hence the sweep: see the module doc.)

    Returns:
        The trained ``nn.Linear`` (float32, on the features' device; ``requires_grad`` set).
    """
    _check_features("train", train_feats, train_labels)
    _check_hparams(num_classes, epochs, batch_size, weight_decay, momentum)
    _check_label_range("train", train_labels, num_classes)
    if lr is None:
        lr, _ = select_lr(train_feats, train_labels, num_classes, epochs=epochs, batch_size=batch_size,
                          weight_decay=weight_decay, momentum=momentum, seed=seed)
    lr = _check_lr(lr)
    x = train_feats.float()
    w, b = _fit_sgd(x, train_labels.long().to(x.device), num_classes, [lr], epochs=epochs,
                    batch_size=batch_size, weight_decay=weight_decay, momentum=momentum, seed=seed)
    linear = nn.Linear(x.shape[1], num_classes, device=x.device)
    with torch.no_grad():
        linear.weight.copy_(w[0])
        linear.bias.copy_(b[0])
    return linear


@torch.no_grad()
def _accuracy(linear: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    logits = linear(feats.float().to(linear.weight.device))
    order = logits.topk(min(5, num_classes), dim=1).indices
    correct = order.eq(labels.to(order.device)[:, None])
    top1, top5 = torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()]).tolist()
    n = labels.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


def linear_eval(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: Optional[int] = None,
    epochs: int = 100,
    lr: Optional[float] = None,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the probe on the train features (see :func:`train_linear`) and score it on val.

    Args:
        train_feats, val_feats: ``[N, D]`` and ``[M, D]`` float (same D).
        train_labels, val_labels: ``[N]`` and ``[M]`` int in ``[0, num_classes)``.
        num_classes: C (default: max label + 1 over both sets); at least 2.
        the rest: as :func:`train_linear`.

    Returns:
        ``{"top1": %, "top5": %, "lr": the lr used, "lr_sweep": {str(lr): held-out top-1 %} or
        None when ``lr`` was given, "epochs": epochs, "num_classes": C}``. A sample is top-5
        correct when its label is among the ``min(5, C)`` highest logits (so with C <= 5 classes
        top-5 is 100 %, as in :func:`dino_fast.eval.knn.knn_classify`).
    """
    _check_features("train", train_feats, train_labels)
    _check_features("val", val_feats, val_labels)
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"feature dims differ: train {train_feats.shape[1]}, val {val_feats.shape[1]}")
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), val_labels.max().item())) + 1
    _check_hparams(num_classes, epochs, batch_size, weight_decay, momentum)
    _check_label_range("train", train_labels, num_classes)
    _check_label_range("val", val_labels, num_classes)
    sweep: Optional[dict[str, float]] = None
    common = dict(epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, momentum=momentum, seed=seed)
    if lr is None:
        lr, sweep = select_lr(train_feats, train_labels, num_classes, **common)
    linear = train_linear(train_feats, train_labels, num_classes, lr=lr, **common)
    top1, top5 = _accuracy(linear, val_feats, val_labels, num_classes)
    return {"top1": top1, "top5": top5, "lr": float(lr), "lr_sweep": sweep, "epochs": epochs,
            "num_classes": num_classes}


def linear_eval_backbone(
    backbone: nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    *,
    image_size: int = 224,
    resize_size: Optional[int] = None,
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    n_last_blocks: int = 1,
    avgpool_patchtokens: bool = False,
    **train_kw: Any,
) -> dict[str, Any]:
    """Probe features of ``backbone`` on two image folders (the k-NN loaders: shorter side to
    ``resize_size``, centre ``image_size`` crop), then :func:`linear_eval` on ``device``.

    ``batch_size`` is the feature-extraction batch; ``train_kw`` go to :func:`linear_eval`
    (``epochs``, ``lr``, ``batch_size`` is spelled ``probe_batch_size`` there, ``weight_decay``,
    ``momentum``, ``seed``).

    Returns:
        :func:`linear_eval`'s dict plus ``"n_last_blocks"``, ``"avgpool_patchtokens"`` and
        ``"feature_dim"``.
    """
    probe_batch = train_kw.pop("probe_batch_size", 256)
    device = torch.device(device)
    loaders, train_classes = eval_loaders(train_root, val_root, image_size=image_size, resize_size=resize_size,
                                          batch_size=batch_size, num_workers=num_workers)
    if train_classes and len(train_classes) < 2:
        raise ValueError(f"a linear probe needs at least 2 classes; {train_root} has {len(train_classes)}: "
                         f"{train_classes}")
    kw = dict(n_last_blocks=n_last_blocks, avgpool_patchtokens=avgpool_patchtokens)
    train_f, train_y = extract_probe_features(backbone, loaders[0], device, **kw)
    val_f, val_y = extract_probe_features(backbone, loaders[1], device, **kw)
    return linear_eval_features(train_f, train_y, val_f, val_y, device=device, num_classes=len(train_classes) or None,
                                batch_size=probe_batch, **kw, **train_kw)


def linear_eval_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    n_last_blocks: int = 1,
    avgpool_patchtokens: bool = False,
    **train_kw: Any,
) -> dict[str, Any]:
    """:func:`linear_eval` on ``device`` of probe features extracted by
    :func:`extract_probe_features` with ``n_last_blocks`` and ``avgpool_patchtokens`` (features
    float ``[N, D]`` / ``[M, D]``, labels int64 ``[N]`` / ``[M]``, on any device); ``train_kw`` go
    to :func:`linear_eval` (``num_classes``, ``epochs``, ``lr``, ``batch_size``, ``weight_decay``,
    ``momentum``, ``seed``).

    Returns:
        :func:`linear_eval`'s dict plus ``"n_last_blocks"``, ``"avgpool_patchtokens"`` and
        ``"feature_dim"`` (D).
    """
    device = torch.device(device)
    res = linear_eval(train_feats.to(device), train_labels.to(device), val_feats.to(device), val_labels.to(device),
                      **train_kw)
    res.update(n_last_blocks=n_last_blocks, avgpool_patchtokens=avgpool_patchtokens,
               feature_dim=int(train_feats.shape[1]))
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-fast linear --checkpoint CKPT [--train DIR --val DIR]``: prints top-1/top-5."""
    p = argparse.ArgumentParser(prog="dino-fast linear",
                                description="linear-probe evaluation of a checkpoint (DINO eval_linear protocol)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth or teacher_backbone.pth")
    p.add_argument("--train", default=None, help="train image folder (default: the run's built-in train split)")
    p.add_argument("--val", default=None, help="val image folder (default: the run's built-in val split)")
    p.add_argument("--which", default="teacher", choices=["teacher", "student"])
    p.add_argument("--n-last-blocks", type=int, default=1,
                   help="concatenate the CLS tokens of the last N blocks (DINO: 4 for ViT-S, 1 for ViT-B)")
    p.add_argument("--avgpool", action="store_true",
                   help="append the mean of the last block's patch tokens (DINO: ViT-B)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=None, help=f"SGD lr (default: sweep {list(LR_GRID)})")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--probe-batch-size", type=int, default=256, help="mini-batch of the linear classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128, help="feature-extraction batch")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        if not Path(a.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {a.checkpoint!r} is not a file")
        for flag, root in (("--train", a.train), ("--val", a.val)):
            if root is not None and not Path(root).is_dir():
                raise FileNotFoundError(f"{flag} {root!r} is not a directory")
        backbone, cfg = load_backbone_from_checkpoint(a.checkpoint, a.which)
        train_root, val_root = eval_roots_for(cfg, a.train, a.val)
        size = a.image_size or cfg.eval.image_size
        res = linear_eval_backbone(
            backbone.to(a.device), train_root, val_root, image_size=size,
            resize_size=cfg.eval.resize_size if a.image_size is None else None, batch_size=a.batch_size,
            num_workers=a.num_workers, device=a.device, n_last_blocks=a.n_last_blocks,
            avgpool_patchtokens=a.avgpool, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
            probe_batch_size=a.probe_batch_size, seed=a.seed)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"dino-fast linear: {e}", file=sys.stderr)
        return 2
    print(f"linear probe (n_last_blocks={res['n_last_blocks']}, avgpool={res['avgpool_patchtokens']}, "
          f"D={res['feature_dim']}, lr={res['lr']:g}, {res['epochs']} epochs): "
          f"top-1 {res['top1']:6.2f}  top-5 {res['top5']:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0

"""Collapse diagnostics for self-distillation (DINO): entropies, feature spread, effective rank.

DINO can collapse in two ways (Caron et al. 2021, sec. 5.3): every teacher output becomes the
uniform distribution (too much centering / too little sharpening), or one output dimension takes
every sample (too much sharpening / too little centering). The backbone features can, in turn,
collapse to a point or to a low-dimensional subspace. The measures here tell these apart:

=========================  =====================================  ==========  ===========
measure                    definition                              collapsed   healthy
=========================  =====================================  ==========  ===========
``teacher_entropy``        mean_i H(p_i), p_i the teacher rows    ln K        well < ln K
                                                                   (uniform)
``prototype_entropy``      H(mean_i p_i), prototype usage         ~0 (one     near ln K
                                                                   prototype)
``feature_std``            mean_d std_i(x_id / ||x_i||)           0 (point)   ~1/sqrt(D)
``effective_rank``         RankMe: exp H(sigma / sum sigma)       ~1          >> 1
=========================  =====================================  ==========  ===========

All functions are pure: they read their tensors and return new values, on the tensors' device.
Reductions run in float64; each public function that returns Python floats synchronises with the
device once (:func:`collapse_stats` too, for all its numbers together).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CollapseStats",
    "batch_mean_entropy",
    "collapse_stats",
    "diagnose",
    "diagnose_gain",
    "diagnose_colour",
    "effective_rank",
    "entropy_from_logits",
    "feature_std",
    "format_stats",
    "grey_sample_stride",
    "mean_entropy",
    "GREY_SAMPLE_IMAGES",
]

# the most train + val images the random-init twin's grey reading (diagnose_colour) reads: a larger
# folder is read at an even stride, since the reading only has to tell two k-NN figures apart
GREY_SAMPLE_IMAGES = 6000

RANKME_EPS = 1e-7  # Garrido et al. 2023: p_k = sigma_k / ||sigma||_1 + eps
PROB_SUM_TOL = 1e-3  # how far a probability row may sum from 1 (fp16/bf16 softmax outputs pass)
# diagnose_gain: below this many labelled train images in a class, the end-of-run k-NN and probe
# understate the features (docs/NOTEBOOK.md, "A few hundred images")
FEW_LABELS_PER_CLASS = 50


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------

def _check_matrix(name: str, t: object, *, min_rows: int = 1) -> Tensor:
    """``t`` must be a floating-point ``[N, K]`` tensor with N >= min_rows and K >= 1."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [N, K], got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [N, K], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if t.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one column, got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} row{'s' if min_rows > 1 else ''}, "
                         f"got shape {tuple(t.shape)}")
    return t


def _check_temperature(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite temperature > 0, got {value!r}")
    return float(value)


def _check_center(center: Optional[Tensor], k: int, device: torch.device) -> Optional[Tensor]:
    """``center`` must be ``[K]`` or ``[1, K]`` float on ``device``; returns it as ``[1, K]``."""
    if center is None:
        return None
    if not isinstance(center, Tensor):
        raise TypeError(f"center: expected a torch.Tensor [1, {k}] or [{k}], got {type(center).__name__}")
    if not center.is_floating_point():
        raise TypeError(f"center: expected a floating-point tensor, got {center.dtype}")
    if center.numel() != k or center.dim() not in (1, 2) or (center.dim() == 2 and center.shape[0] != 1):
        raise ValueError(f"center: expected shape [1, {k}] or [{k}] (K = {k} from the logits), "
                         f"got {tuple(center.shape)}")
    if center.device != device:
        raise ValueError(f"center is on {center.device} but the logits are on {device}")
    return center.reshape(1, k)


# --------------------------------------------------------------------------------------------
# entropies (tensor-valued helpers; the public wrappers add the one host sync)
# --------------------------------------------------------------------------------------------

def _row_entropy(probs64: Tensor) -> Tensor:
    """``[N, K]`` float64 probabilities -> ``[N]`` float64 entropies in nats (0 log 0 = 0)."""
    return -torch.special.xlogy(probs64, probs64).sum(dim=1)


def _prob_row_error(probs64: Tensor) -> Tensor:
    """Largest violation of "a probability row": |row sum - 1|, or the most negative entry."""
    return torch.maximum((probs64.sum(dim=1) - 1.0).abs().max(), (-probs64).max().clamp_min(0.0))


def _checked_probs(name: str, probs: object) -> Tensor:
    return _check_matrix(name, probs).double()


def _raise_if_not_probs(name: str, err: float) -> None:
    # err is NaN for NaN inputs: "not err <= tol" catches it too
    if not err <= PROB_SUM_TOL:
        raise ValueError(f"{name}: expected rows of probabilities (entries >= 0, each row summing to 1 "
                         f"within {PROB_SUM_TOL:g}); the worst row is off by {err:.3g}. "
                         "Pass logits to entropy_from_logits instead")


def mean_entropy(probs: Tensor) -> float:
    """Mean over rows of the Shannon entropy ``H(p) = -sum_k p_k ln p_k`` (nats, ``0 ln 0 = 0``).

    Args:
        probs: ``[N, K]`` floating-point, N >= 1, each row a distribution (entries >= 0, rows
            summing to 1 within 1e-3; checked, ValueError otherwise).

    Returns:
        A float in ``[0, ln K]``: ``ln K`` for uniform rows, 0 for one-hot rows.
    """
    p = _checked_probs("probs", probs)
    h, err = torch.stack([_row_entropy(p).mean(), _prob_row_error(p)]).tolist()
    _raise_if_not_probs("probs", err)
    return h


def batch_mean_entropy(probs: Tensor) -> float:
    """Entropy of the batch-mean distribution ``H(mean_i p_i)`` (nats): prototype usage.

    Near ``ln K`` when the batch spreads over the K outputs, 0 when every row puts its mass on
    the same output (DINO's "one dimension dominates" collapse). With one-hot rows it is at most
    ``ln min(N, K)``: judge it with batches of many rows.

    Args:
        probs: ``[N, K]`` floating-point probability rows (as for :func:`mean_entropy`).

    Returns:
        A float in ``[0, ln K]``.
    """
    p = _checked_probs("probs", probs)
    h, err = torch.stack([_row_entropy(p.mean(dim=0, keepdim=True))[0], _prob_row_error(p)]).tolist()
    _raise_if_not_probs("probs", err)
    return h


def _log_softmax64(name: str, logits: Tensor, temperature: float, center: Optional[Tensor]) -> Tensor:
    _check_matrix(name, logits)
    temperature = _check_temperature(f"{name} temperature", temperature)
    c = _check_center(center, logits.shape[1], logits.device)
    z = logits.double()
    if c is not None:
        z = z - c.double()
    return F.log_softmax(z / temperature, dim=1)


def _entropy_from_log_probs(logp: Tensor) -> Tensor:
    """``[N, K]`` float64 log-probabilities -> ``[N]`` entropies; ``-inf`` entries count as 0."""
    terms = torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp.exp() * logp)
    return -terms.sum(dim=1)


def entropy_from_logits(logits: Tensor, temperature: float, center: Optional[Tensor] = None) -> Tensor:
    """Per-row entropy of ``softmax((logits - center) / temperature)`` (nats).

    Computed from ``log_softmax`` in float64, so very large or very sharp logits (a one-hot
    teacher at temperature 0.04) give 0 rather than NaN. ``-inf`` logits (masked outputs) count
    as probability 0. No host synchronisation.

    Args:
        logits: ``[N, K]`` floating-point (the head's outputs, before any temperature).
        temperature: > 0 (DINO: teacher 0.04-0.07, student 0.1).
        center: ``[1, K]`` or ``[K]`` floating-point (the DINO loss' center, subtracted from the
            teacher logits), on the logits' device; None for no centering (the student).

    Returns:
        ``[N]`` float64 on the logits' device, each in ``[0, ln K]``.
    """
    return _entropy_from_log_probs(_log_softmax64("logits", logits, temperature, center))


# --------------------------------------------------------------------------------------------
# feature spread
# --------------------------------------------------------------------------------------------

def _feature_std_t(x64: Tensor) -> Tensor:
    return F.normalize(x64, dim=1).std(dim=0, correction=1).mean()


def _effective_rank_t(x64: Tensor) -> Tensor:
    s = torch.linalg.svdvals(x64)
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + RANKME_EPS
    return torch.exp(-(p * p.log()).sum())


def feature_std(features: Tensor) -> float:
    """Mean over dimensions of the per-dimension std of the L2-normalised features.

    The collapse check of SimSiam (Chen & He 2021, sec. 4.1): rows are normalised to unit length,
    the std (Bessel-corrected) of each of the D coordinates is taken over the N rows and averaged.
    Every row the same direction -> 0; rows spread uniformly over the sphere -> about
    ``1 / sqrt(D)``. All-zero rows stay zero (they count as the origin).

    Args:
        features: ``[N, D]`` floating-point, N >= 2.

    Returns:
        A float in ``[0, 1]``.
    """
    x = _check_matrix("features", features, min_rows=2)
    return _feature_std_t(x.double()).item()


def effective_rank(features: Tensor) -> float:
    """RankMe effective rank (Garrido et al. 2023) of the feature matrix.

    ``exp(-sum_k p_k ln p_k)`` with ``p_k = sigma_k / sum_j sigma_j + 1e-7`` over the singular
    values ``sigma`` of the (uncentred) ``[N, D]`` matrix, computed in float64. Identical rows
    (or all-zero features) -> 1 (up to the 1e-7 smoothing: ``1 + O(min(N, D) * 1e-6)``);
    i.i.d. isotropic rows with N >> D -> close to ``min(N, D)``.

    Args:
        features: ``[N, D]`` floating-point, N >= 2.

    Returns:
        A float in ``[1, min(N, D)]`` (up to the smoothing).
    """
    x = _check_matrix("features", features, min_rows=2)
    return _effective_rank_t(x.double()).item()


# --------------------------------------------------------------------------------------------
# all together
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollapseStats:
    """Collapse measures of one batch (entropies in nats, see the module doc).

    Attributes:
        teacher_entropy: mean per-row entropy of the (centred, sharpened) teacher distribution.
        teacher_entropy_max: ``ln K``, the entropy of the uniform distribution over K outputs.
        prototype_entropy: entropy of the batch-mean teacher distribution (prototype usage).
        student_entropy: mean per-row entropy of the student distribution.
        feature_std: :func:`feature_std` of the backbone features (None when none were given).
        effective_rank: :func:`effective_rank` of the backbone features (None likewise).
        feature_dim: D of the features (None likewise); random unit vectors have std 1/sqrt(D).
        feature_rows: N of the features (None likewise); the rank is at most min(N, D).
        teacher_rows: rows of the teacher logits (prototype usage is at most ln of this for
            one-hot rows).
    """

    teacher_entropy: float
    teacher_entropy_max: float
    prototype_entropy: float
    student_entropy: float
    feature_std: Optional[float] = None
    effective_rank: Optional[float] = None
    feature_dim: Optional[int] = None
    feature_rows: Optional[int] = None
    teacher_rows: Optional[int] = None

    def as_dict(self) -> dict[str, Optional[float]]:
        """The fields as a flat dict (JSON-serialisable: floats, ints and None)."""
        return asdict(self)


def collapse_stats(
    teacher_logits: Tensor,
    student_logits: Tensor,
    center: Optional[Tensor],
    teacher_temp: float,
    student_temp: float,
    features: Optional[Tensor] = None,
) -> CollapseStats:
    """All collapse measures of one training batch, with one host synchronisation.

    Teacher probabilities are ``softmax((teacher_logits - center) / teacher_temp)`` and student
    ones ``softmax(student_logits / student_temp)``, as in the DINO loss.

    Args:
        teacher_logits: ``[N_t, K]`` floating-point head outputs of the teacher (global crops).
        student_logits: ``[N_s, K]`` floating-point head outputs of the student (any crops; N_s
            may differ from N_t), same K.
        center: the loss' center ``[1, K]`` or ``[K]``, or None (no centering).
        teacher_temp, student_temp: > 0.
        features: optional ``[N, D]`` floating-point backbone features (e.g. the teacher's CLS
            outputs), N >= 2, for :func:`feature_std` and :func:`effective_rank`.

    Returns:
        A :class:`CollapseStats`.
    """
    _check_matrix("teacher_logits", teacher_logits)
    _check_matrix("student_logits", student_logits)
    k = teacher_logits.shape[1]
    if student_logits.shape[1] != k:
        raise ValueError(f"teacher and student logits must have the same number of outputs K; got teacher "
                         f"{tuple(teacher_logits.shape)}, student {tuple(student_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"teacher logits are on {teacher_logits.device}, student logits on {student_logits.device}")
    t_logp = _log_softmax64("teacher_logits", teacher_logits, teacher_temp, center)
    s_logp = _log_softmax64("student_logits", student_logits, student_temp, None)
    scalars = [
        _entropy_from_log_probs(t_logp).mean(),
        _row_entropy(t_logp.exp().mean(dim=0, keepdim=True))[0],
        _entropy_from_log_probs(s_logp).mean(),
    ]
    if features is not None:
        x = _check_matrix("features", features, min_rows=2).double()
        scalars += [_feature_std_t(x).to(scalars[0].device), _effective_rank_t(x).to(scalars[0].device)]
    values = torch.stack(scalars).tolist()
    return CollapseStats(
        teacher_entropy=values[0],
        teacher_entropy_max=math.log(k),
        prototype_entropy=values[1],
        student_entropy=values[2],
        feature_std=values[3] if features is not None else None,
        effective_rank=values[4] if features is not None else None,
        feature_dim=int(features.shape[1]) if features is not None else None,
        feature_rows=int(features.shape[0]) if features is not None else None,
        teacher_rows=int(teacher_logits.shape[0]),
    )


def _check_frac(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1], got {value!r}")
    return float(value)


def _check_top1(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 100.0:
        raise ValueError(f"{name}: expected a top-1 accuracy in % in [0, 100], got {value!r}")


def diagnose(
    stats: CollapseStats,
    *,
    uniform_frac: float = 0.95,
    one_hot_frac: float = 0.05,
    point_std_frac: float = 0.1,
    low_rank_frac: float = 0.05,
) -> list[str]:
    """Human-readable warnings, one per collapse symptom found in ``stats``; ``[]`` when healthy.

    Thresholds (all relative, so they hold for any K and D):

    - teacher outputs uniform: ``teacher_entropy >= uniform_frac * ln K`` (default 95 %).
    - one prototype takes everything: ``prototype_entropy <= one_hot_frac * ln K`` (default 5 %).
      A sharp teacher with a spread-out prototype usage is the healthy DINO regime and is not
      flagged. Not checked with K = 1 (both entropies are 0 there).
    - features collapsed to a point: ``feature_std <= point_std_frac / sqrt(D)`` (default 10 % of
      the random-direction value).
    - dimensional collapse: ``effective_rank <= max(1.5, low_rank_frac * min(N, D))`` (default
      5 %) while the features are not collapsed to a point (that warning already covers a rank
      of 1). Skipped when the stats carry no features.

    Args:
        stats: from :func:`collapse_stats`.
        uniform_frac, one_hot_frac, point_std_frac, low_rank_frac: fractions in [0, 1].

    Returns:
        The warnings, each naming the symptom, the measured value against its threshold and
        what to try.
    """
    if not isinstance(stats, CollapseStats):
        raise TypeError(f"stats: expected a CollapseStats (from collapse_stats), got {type(stats).__name__}")
    uniform_frac = _check_frac("uniform_frac", uniform_frac)
    one_hot_frac = _check_frac("one_hot_frac", one_hot_frac)
    point_std_frac = _check_frac("point_std_frac", point_std_frac)
    low_rank_frac = _check_frac("low_rank_frac", low_rank_frac)
    out: list[str] = []
    h_max = stats.teacher_entropy_max
    if h_max > 0:
        if stats.teacher_entropy >= uniform_frac * h_max:
            out.append(
                f"teacher outputs uniform: mean teacher entropy {stats.teacher_entropy:.2f} of ln K = {h_max:.2f} "
                f"(>= {100 * uniform_frac:g} %); try a lower teacher temperature (loss.teacher_temp, "
                "loss.warmup_teacher_temp), a smaller lr (optim.lr), KoLeo (loss.koleo_weight) or "
                "Sinkhorn-Knopp centering (DINOv2)")
        if stats.prototype_entropy <= one_hot_frac * h_max:
            out.append(
                f"one prototype takes everything: prototype-usage entropy {stats.prototype_entropy:.2f} of "
                f"ln K = {h_max:.2f} (<= {100 * one_hot_frac:g} %); check that the teacher is centred and the "
                "center follows the batch (loss.center_momentum < 1, lower tracks faster), try a higher "
                "teacher temperature (less sharpening), KoLeo (loss.koleo_weight) or Sinkhorn-Knopp "
                "centering (DINOv2)")
    point = False
    if stats.feature_std is not None and stats.feature_dim:
        random_std = 1.0 / math.sqrt(stats.feature_dim)
        if stats.feature_std <= point_std_frac * random_std:
            point = True
            out.append(
                f"features collapsed to a point: feature std {stats.feature_std:.4f} (random: 1/sqrt(D) = "
                f"{random_std:.4f}, threshold {100 * point_std_frac:g} % of it); every image maps to about "
                "the same vector: try a smaller lr (optim.lr), a higher teacher EMA momentum "
                "(optim.momentum_teacher), KoLeo (loss.koleo_weight), and check the augmentations")
    if not point and stats.effective_rank is not None and stats.feature_dim and stats.feature_rows:
        full = min(stats.feature_rows, stats.feature_dim)
        limit = max(1.5, low_rank_frac * full)
        if stats.effective_rank <= limit:
            out.append(
                f"dimensional collapse: effective rank {stats.effective_rank:.2f} of min(N, D) = {full} "
                f"(<= {limit:.2f}); the features span few directions: try KoLeo (loss.koleo_weight), a "
                "larger head bottleneck (model.head_bottleneck_dim) or a smaller lr, and measure on "
                "a batch with N >> D")
    return out


def diagnose_gain(teacher_top1: float, random_top1: float, *, min_frac: float = 0.15,
                  labels_per_class: Optional[int] = None,
                  few_labels: int = FEW_LABELS_PER_CLASS) -> Optional[str]:
    """A warning when training gained little over random init on a labelled val split; else ``None``.

    The collapse measures above watch the head and the features during training; a run can pass
    them all (a sharp teacher, every prototype used, full-rank features) and still learn what the
    augmentations leave in common between two crops rather than what the labels measure, e.g. an
    image's colours when they say nothing about its class. This check reads the evaluation after
    training: it warns when the trained teacher closes less than ``min_frac`` of the gap between
    the random-init twin's top-1 and 100 %, i.e. when ``teacher - random < min_frac * (100 -
    random)`` (default 15 %). A random twin at 100 % leaves nothing to gain and is not flagged.

    Few labels compress the gain whatever the features hold: with tens of labelled train images
    per class, k-NN and a probe both sort the val split worse, the trained teacher's more than
    its twin's. When the evaluation's train split has fewer than ``few_labels`` images in its
    smallest class, the warning says so first and names the commands that read the same teacher
    against a larger labelled folder.

    Args:
        teacher_top1, random_top1: top-1 accuracies in % (floats in [0, 100]) of the trained
            teacher and of the random-init twin, from the same evaluation (k-NN or linear probe).
        min_frac: a fraction in [0, 1].
        labels_per_class: images in the smallest class of the evaluation's train split (an int
            >= 0), or ``None`` when unknown.
        few_labels: below this many (an int >= 1) the warning names the label count.

    Returns:
        The warning naming the symptom, the measured values against the threshold and what to
        try, or ``None``.

    Raises:
        ValueError: an accuracy outside [0, 100] or not finite, or ``min_frac`` outside [0, 1].
    """
    _check_top1("teacher_top1", teacher_top1)
    _check_top1("random_top1", random_top1)
    min_frac = _check_frac("min_frac", min_frac)
    if labels_per_class is not None and (isinstance(labels_per_class, bool) or not isinstance(labels_per_class, int)
                                         or labels_per_class < 0):
        raise ValueError(f"labels_per_class: expected an image count (int >= 0) or None, got {labels_per_class!r}")
    if isinstance(few_labels, bool) or not isinstance(few_labels, int) or few_labels < 1:
        raise ValueError(f"few_labels: expected an int >= 1, got {few_labels!r}")
    room = 100.0 - float(random_top1)
    gain = float(teacher_top1) - float(random_top1)
    if room <= 0.0 or gain >= min_frac * room:
        return None
    few = ""
    if labels_per_class is not None and labels_per_class < few_labels:
        few = (f"the evaluation's train split has only {labels_per_class} labelled image(s) in its smallest class "
               f"(under {few_labels}), which holds both figures down whatever the features learnt: read the teacher "
               "against a larger labelled folder first (dino-fast knn / dino-fast linear --checkpoint CKPT --train "
               "DIR --val DIR); ")
    return (
        f"features barely better than random init: top-1 {teacher_top1:.1f} against {random_top1:.1f} for the "
        f"random-init twin ({gain:+.1f} points, {100 * gain / room:.0f} % of the {room:.1f} left; threshold "
        f"{100 * min_frac:g} %); {few}unless a collapse warning above explains it, the run probably learnt a cue "
        "that two crops of one image share but the classes do not (colour is the usual one: if colours vary at "
        "random within a class, read the images in grey with model.grayscale_input=true; otherwise try stronger "
        "colour augmentation: data.grayscale_p, data.color_jitter, data.jitter_p), or the classes need more "
        "training (train.iterations) or a larger model")


def diagnose_colour(colour_top1: float, grey_top1: float, *, margin: float = 2.0) -> str:
    """Which way colour pulls on a labelled val split, from one random-init backbone read twice.

    When :func:`diagnose_gain` fires, the trainer evaluates its random-init twin once more with
    ``model.grayscale_input`` (the same weights: the flag adds no parameter), so that the two
    top-1 figures differ only by the colour the model is shown. A random network's features
    follow colour where there is colour; if they sort the classes better without it, colour is
    noise in this folder, and reading grey is the fix to try.

    Args:
        colour_top1, grey_top1: top-1 accuracies in % (floats in [0, 100]) of the same
            random-init backbone on colour and on grey inputs, same evaluation.
        margin: points (a float >= 0) by which one must beat the other to count.

    Returns:
        One line for the log: grey ahead by more than ``margin`` -> "colour looks like noise
        here" and the flag to set; colour ahead by more than ``margin`` -> "colour carries the
        classes here" (keep it); otherwise that colour barely matters to the twin.

    Raises:
        ValueError: an accuracy outside [0, 100] or not a number, or ``margin`` negative.
    """
    _check_top1("colour_top1", colour_top1)
    _check_top1("grey_top1", grey_top1)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0.0:
        raise ValueError(f"margin: expected points >= 0, got {margin!r}")
    figures = f"the random-init twin's top-1 is {grey_top1:.1f} in grey against {colour_top1:.1f} in colour"
    if grey_top1 > colour_top1 + margin:
        return (f"colour looks like noise here: {figures}; train with model.grayscale_input=true (the model then "
                "reads every image in grey, in training and in every evaluation)")
    if colour_top1 > grey_top1 + margin:
        return (f"colour carries the classes here: {figures}; keep it (model.grayscale_input would lose it) and look "
                "for the shortcut elsewhere")
    return f"colour barely matters to the classes here: {figures} (within {margin:g} points)"


def grey_sample_stride(n_images: int, *, cap: Optional[int] = None) -> int:
    """Every how many-th image of the train and val folders the twin's grey reading reads.

    The reading compares two k-NN top-1 figures of one random-init backbone (colour and grey,
    :func:`diagnose_colour`); on a folder of tens of thousands of images a few thousand tell them
    apart as well and cost a fraction of a pass. Both readings then use the same images: every
    ``stride``-th of each split, in folder order (which is class order, so every class keeps its
    share).

    Args:
        n_images: train + val images of the evaluation (an int >= 0).
        cap: the most images to read (an int >= 1; default :data:`GREY_SAMPLE_IMAGES`).

    Returns:
        1 up to ``cap`` images, else ``ceil(n_images / cap)`` (an int >= 1).

    Raises:
        ValueError: ``n_images`` negative or ``cap`` below 1, or either not an int.
    """
    cap = GREY_SAMPLE_IMAGES if cap is None else cap
    for name, value, least in (("n_images", n_images, 0), ("cap", cap, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")
    return max(1, math.ceil(n_images / cap))


def format_stats(stats: CollapseStats) -> str:
    """One line for logs, e.g. ``teacher H 2.31/11.09 (21 %) | usage H 10.80 (97 %) | student H
    4.12 | feat std 0.041 (1/sqrt(D) 0.051) | rank 212.4/384``."""
    if not isinstance(stats, CollapseStats):
        raise TypeError(f"stats: expected a CollapseStats, got {type(stats).__name__}")
    h_max = stats.teacher_entropy_max

    def pct(h: float) -> str:
        return f" ({100 * h / h_max:.0f} %)" if h_max > 0 else ""

    parts = [
        f"teacher H {stats.teacher_entropy:.2f}/{h_max:.2f}{pct(stats.teacher_entropy)}",
        f"usage H {stats.prototype_entropy:.2f}{pct(stats.prototype_entropy)}",
        f"student H {stats.student_entropy:.2f}",
    ]
    if stats.feature_std is not None:
        ref = f" (1/sqrt(D) {1 / math.sqrt(stats.feature_dim):.3f})" if stats.feature_dim else ""
        parts.append(f"feat std {stats.feature_std:.3f}{ref}")
    if stats.effective_rank is not None:
        full = (f"/{min(stats.feature_rows, stats.feature_dim)}"
                if stats.feature_rows and stats.feature_dim else "")
        parts.append(f"rank {stats.effective_rank:.1f}{full}")
    return " | ".join(parts)

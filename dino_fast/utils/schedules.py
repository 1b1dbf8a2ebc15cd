"""Training schedules of the official DINO recipe, in one place.

- :func:`cosine_scheduler`: per-iteration cosine with linear warm-up (official ``utils.cosine_scheduler``);
  used for the learning rate, the weight decay and the teacher momentum.
- :func:`momentum_schedule`: the teacher EMA momentum, cosine from ``base`` (0.996) to ``final`` (1.0).
- :func:`teacher_temp_schedule`: the teacher temperature per epoch (official ``DINOLoss``): linear
  warm-up then constant.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

__all__ = ["cosine_scheduler", "momentum_schedule", "teacher_temp_schedule"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """Per-iteration cosine schedule with a linear warm-up (the official DINO formula exactly).

    ``warmup_iters = warmup_epochs * niter_per_ep`` values go linearly (``np.linspace``, both ends
    included) from ``start_warmup_value`` to ``base_value``; the remaining
    ``T = epochs * niter_per_ep - warmup_iters`` values are
    ``final + 0.5 * (base - final) * (1 + cos(pi * i / T))`` for ``i = 0 .. T-1``.

    Args:
        base_value: value after warm-up (at the start of the cosine).
        final_value: value the cosine approaches at the end (reached at ``i = T``, one past the end).
        epochs: number of epochs (>= 1).
        niter_per_ep: iterations per epoch (>= 1).
        warmup_epochs: epochs of linear warm-up, 0 <= warmup_epochs <= epochs.
        start_warmup_value: first warm-up value.

    Returns:
        float64 array of shape ``(epochs * niter_per_ep,)``.

    Raises:
        TypeError / ValueError: on non-integer or out-of-range counts, or non-finite values.
    """
    base_value = _check_real("base_value", base_value)
    final_value = _check_real("final_value", final_value)
    start_warmup_value = _check_real("start_warmup_value", start_warmup_value)
    epochs = _check_int("epochs", epochs, 1)
    niter_per_ep = _check_int("niter_per_ep", niter_per_ep, 1)
    warmup_epochs = _check_int("warmup_epochs", warmup_epochs, 0)
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs must be <= epochs ({epochs}), got {warmup_epochs}")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine)).astype(np.float64)
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def momentum_schedule(
    base: float = 0.996,
    final: float = 1.0,
    *,
    epochs: int,
    iters_per_epoch: int,
) -> np.ndarray:
    """Teacher EMA momentum per iteration: cosine from ``base`` to ``final``, no warm-up.

    Same as the official ``cosine_scheduler(momentum_teacher, 1, epochs, len(data_loader))``.

    Args:
        base: momentum at iteration 0, in [0, 1] (official default 0.996).
        final: momentum the cosine approaches at the end, in [0, 1] (official 1.0).
        epochs: number of epochs (>= 1).
        iters_per_epoch: iterations per epoch (>= 1).

    Returns:
        float64 array of shape ``(epochs * iters_per_epoch,)``, values in [min(base, final), max(base, final)].

    Raises:
        TypeError / ValueError: on bad counts or momenta outside [0, 1].
    """
    for name, v in (("base", base), ("final", final)):
        v = _check_real(name, v)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} momentum must be in [0, 1], got {v}")
    return cosine_scheduler(base, final, epochs, iters_per_epoch)


def teacher_temp_schedule(
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: int,
    nepochs: int,
) -> np.ndarray:
    """Teacher temperature per epoch, as the official ``DINOLoss``: linear warm-up then constant.

    ``np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)`` (both ends
    included) followed by ``teacher_temp`` for the remaining ``nepochs - warmup_teacher_temp_epochs``
    epochs (paper: 0.04 -> 0.07 over 30 epochs).

    Args:
        warmup_teacher_temp: temperature at epoch 0 (> 0).
        teacher_temp: temperature after warm-up (> 0).
        warmup_teacher_temp_epochs: warm-up length in epochs, 0 <= it <= nepochs.
        nepochs: total epochs (>= 1).

    Returns:
        float64 array of shape ``(nepochs,)``.

    Raises:
        TypeError / ValueError: on bad counts or non-positive temperatures.
    """
    for name, v in (("warmup_teacher_temp", warmup_teacher_temp), ("teacher_temp", teacher_temp)):
        if _check_real(name, v) <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    nepochs = _check_int("nepochs", nepochs, 1)
    warm = _check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0)
    if warm > nepochs:
        raise ValueError(f"warmup_teacher_temp_epochs must be <= nepochs ({nepochs}), got {warm}")
    return np.concatenate((
        np.linspace(float(warmup_teacher_temp), float(teacher_temp), warm),
        np.ones(nepochs - warm) * float(teacher_temp),
    )).astype(np.float64)

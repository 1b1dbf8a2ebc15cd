"""Schedules: the official DINO formulas, checked element by element against scalar math."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dino_fast.utils.schedules import cosine_scheduler, momentum_schedule, teacher_temp_schedule


def _scalar_cosine(base: float, final: float, epochs: int, niter: int, warm_ep: int, start: float) -> list[float]:
    """The official definition, one value at a time with math.cos."""
    w = warm_ep * niter
    total = epochs * niter
    out = []
    for it in range(total):
        if it < w:
            out.append(start + (base - start) * it / (w - 1) if w > 1 else start)
        else:
            i, t = it - w, total - w
            out.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / t)))
    return out


def _random_case() -> tuple[float, float, int, int, int, float]:
    rng = np.random.default_rng()
    epochs = int(rng.integers(1, 12))
    niter = int(rng.integers(1, 40))
    warm = int(rng.integers(0, epochs + 1))
    return float(rng.uniform(0, 1)), float(rng.uniform(0, 1)), epochs, niter, warm, float(rng.uniform(0, 1))


@pytest.mark.parametrize("case", [(5e-4, 1e-6, 100, 7, 10, 0.0), (0.04, 0.4, 3, 5, 0, 0.0), (1.0, 0.0, 2, 1, 1, 0.5)]
                         + [_random_case() for _ in range(5)])
def test_cosine_scheduler_matches_scalar_formula(case: tuple) -> None:
    base, final, epochs, niter, warm, start = case
    got = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warm, start_warmup_value=start)
    want = _scalar_cosine(base, final, epochs, niter, warm, start)
    assert got.shape == (epochs * niter,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    if warm == 0:
        assert got[0] == pytest.approx(base, rel=1e-15, abs=1e-16)
    elif warm * niter > 1:
        assert got[0] == start and got[warm * niter - 1] == pytest.approx(base, rel=1e-15)


def test_warmup_is_linspace_with_both_ends() -> None:
    s = cosine_scheduler(1.0, 0.0, epochs=3, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.0)
    np.testing.assert_allclose(s[:4], [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-15)
    # the cosine restarts at base right after the warm-up (the official behaviour)
    assert s[4] == 1.0
    assert s[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)), rel=1e-15)


def test_momentum_schedule_official_defaults() -> None:
    epochs, n = 100, 13
    m = momentum_schedule(epochs=epochs, iters_per_epoch=n)
    assert m.shape == (epochs * n,)
    assert m[0] == 0.996
    assert np.all(np.diff(m) >= 0) and m[-1] < 1.0
    T = epochs * n
    assert m[-1] == pytest.approx(1.0 - 0.5 * 0.004 * (1 + math.cos(math.pi * (T - 1) / T)), rel=1e-15)
    np.testing.assert_array_equal(m, cosine_scheduler(0.996, 1.0, epochs, n))
    m2 = momentum_schedule(0.99, 0.999, epochs=2, iters_per_epoch=3)
    np.testing.assert_allclose(m2, _scalar_cosine(0.99, 0.999, 2, 3, 0, 0.0), rtol=1e-14)


def test_teacher_temp_schedule_official() -> None:
    s = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert s.shape == (100,)
    np.testing.assert_allclose(s[:30], [0.04 + 0.03 * i / 29 for i in range(30)], rtol=1e-13)
    assert np.all(s[30:] == 0.07) and s[29] == pytest.approx(0.07, rel=1e-15)
    np.testing.assert_array_equal(teacher_temp_schedule(0.04, 0.07, 0, 5), np.full(5, 0.07))
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.07, 4, 4), np.linspace(0.04, 0.07, 4))


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1.0, 0.0, 3, 10, warmup_epochs=4)
    with pytest.raises(ValueError, match="epochs"):
        cosine_scheduler(1.0, 0.0, 0, 10)
    with pytest.raises(TypeError, match="niter_per_ep"):
        cosine_scheduler(1.0, 0.0, 3, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base_value"):
        cosine_scheduler(float("nan"), 0.0, 3, 2)
    with pytest.raises(TypeError, match="final_value"):
        cosine_scheduler(1.0, "0", 3, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base momentum"):
        momentum_schedule(1.2, epochs=3, iters_per_epoch=2)
    with pytest.raises(TypeError):
        momentum_schedule(0.996, 1.0, 3, 2)  # type: ignore[misc]  (keyword-only counts)
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        teacher_temp_schedule(0.04, 0.07, 30, 10)
    with pytest.raises(ValueError, match="teacher_temp"):
        teacher_temp_schedule(0.04, 0.0, 3, 10)


def test_public_api_exports() -> None:
    import dino_fast

    assert dino_fast.momentum_schedule is momentum_schedule
    assert dino_fast.cosine_scheduler is cosine_scheduler

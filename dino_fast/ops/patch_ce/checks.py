"""Input validation of the row-aligned soft-target cross-entropy op (shapes, dtypes, weights).

Every check raises TypeError/ValueError naming the argument, what was expected and what came.
"""
from __future__ import annotations

from torch import Tensor

from dino_fast.ops.soft_ce.checks import check_center, check_float_tensors, check_temp, math_dtype

__all__ = ["check_patch_inputs", "math_dtype"]


def check_patch_inputs(student: Tensor, teacher: Tensor, center: Tensor, weights: Tensor,
                       student_temp: float, teacher_temp: float) -> tuple[int, int, float, float]:
    """Validate the op's inputs; return ``(rows, K, tau_s, tau_t)``.

    Expected: ``student`` and ``teacher`` (rows, K) float tensors (fp32/bf16/fp16/fp64) of one
    shape, ``center`` (K,) or (1, K) float, ``weights`` (rows,) float, all on one device,
    positive finite temperatures. ``rows`` may be 0 (the loss is then 0); K must be >= 1.
    """
    tau_s = check_temp("student_temp", student_temp)
    tau_t = check_temp("teacher_temp", teacher_temp)
    check_float_tensors(("student", student), ("teacher", teacher), ("center", center), ("weights", weights))
    if student.dim() != 2:
        raise ValueError(f"student: expected a 2-D (rows, K) tensor, got shape {tuple(student.shape)}")
    rows, K = student.shape
    if K == 0:
        raise ValueError(f"student: expected K >= 1 columns, got shape {tuple(student.shape)}")
    if tuple(teacher.shape) != (rows, K):
        raise ValueError(f"teacher: expected shape {(rows, K)} (row r pairs with student row r), "
                         f"got {tuple(teacher.shape)}")
    check_center(center, K)
    if weights.dim() != 1 or weights.shape[0] != rows:
        raise ValueError(f"weights: expected shape ({rows},) (one weight per row), got {tuple(weights.shape)}")
    if not (student.device == teacher.device == center.device == weights.device):
        raise ValueError(f"student, teacher, center and weights must be on one device, got {student.device}, "
                         f"{teacher.device}, {center.device}, {weights.device}")
    return rows, K, tau_s, tau_t

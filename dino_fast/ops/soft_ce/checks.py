"""Input validation of the centered soft-target cross-entropy ops (shapes, dtypes, temperatures).

Every check raises TypeError/ValueError naming the argument, what was expected and what came.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["TensorOrCrops", "FLOAT_DTYPES", "as_2d", "check_temp", "check_int", "check_inputs", "math_dtype",
           "check_crop_weights", "check_float_tensors", "check_center", "check_launch_logits",
           "check_launch_vector", "check_launch_temps"]

TensorOrCrops = Union[Tensor, Sequence[Tensor]]
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def as_2d(x: TensorOrCrops, name: str) -> Tensor:
    """A (rows, K) tensor from a tensor or a list/tuple of per-crop (B, K) tensors (concatenated)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name}: expected a tensor or a non-empty list of per-crop tensors, got an empty {type(x).__name__}")
        for i, t in enumerate(x):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2:
                raise ValueError(f"{name}[{i}]: expected a 2-D (B, K) crop, got shape {tuple(t.shape)}")
        shapes = {tuple(t.shape) for t in x}
        if len(shapes) != 1:
            raise ValueError(f"{name}: every crop must have the same (B, K) shape, got {sorted(shapes)}")
        return torch.cat(list(x), dim=0)
    raise TypeError(f"{name}: expected a torch.Tensor or a list of per-crop tensors, got {type(x).__name__}")


def check_temp(name: str, value: float) -> float:
    """``value`` as a float when it is a positive finite number (bool refused); TypeError /
    ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return value


def check_int(name: str, value: int, minimum: int) -> int:
    """``value`` as an int when it is an integer (Python or numpy, bool refused) ``>= minimum``;
    TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_inputs(
    student: Tensor, teacher: Tensor, center: Tensor, ncrops: int, n_teacher: int,
    student_temp: float, teacher_temp: float,
) -> tuple[int, int, float, float]:
    """Validate the loss inputs; return (B, K, tau_s, tau_t). Raises TypeError / ValueError."""
    ncrops = check_int("ncrops", ncrops, 2)
    n_teacher = check_int("n_teacher", n_teacher, 1)
    if n_teacher > ncrops:
        raise ValueError(f"n_teacher must be <= ncrops (the teacher crops are the first student crops), "
                         f"got n_teacher={n_teacher}, ncrops={ncrops}")
    tau_s = check_temp("student_temp", student_temp)
    tau_t = check_temp("teacher_temp", teacher_temp)
    check_float_tensors(("student", student), ("teacher", teacher), ("center", center))
    if student.dim() != 2:
        raise ValueError(f"student: expected a 2-D (ncrops*B, K) tensor, got shape {tuple(student.shape)}")
    if teacher.dim() != 2:
        raise ValueError(f"teacher: expected a 2-D (n_teacher*B, K) tensor, got shape {tuple(teacher.shape)}")
    rows, K = student.shape
    if K == 0 or rows == 0:
        raise ValueError(f"student: expected a non-empty (ncrops*B, K) tensor, got shape {tuple(student.shape)}")
    if rows % ncrops != 0:
        raise ValueError(f"student: rows ({rows}) must be divisible by ncrops ({ncrops}), got shape {tuple(student.shape)}")
    B = rows // ncrops
    if teacher.shape[0] != n_teacher * B:
        raise ValueError(f"teacher: expected n_teacher*B = {n_teacher}*{B} = {n_teacher * B} rows "
                         f"(B = {rows}/{ncrops} from student), got shape {tuple(teacher.shape)}")
    if teacher.shape[1] != K:
        raise ValueError(f"teacher: expected K = {K} columns (as student), got shape {tuple(teacher.shape)}")
    check_center(center, K)
    if not (student.device == teacher.device == center.device):
        raise ValueError(f"student, teacher and center must be on one device, got {student.device}, "
                         f"{teacher.device}, {center.device}")
    return B, K, tau_s, tau_t


def check_float_tensors(*named: tuple[str, object]) -> None:
    """Each ``(name, value)`` must be a float tensor (fp32/bf16/fp16/fp64); TypeError naming it otherwise."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a float32/bfloat16/float16/float64 tensor, got dtype {t.dtype}")


def check_center(center: Tensor, K: int) -> None:
    """``center`` must hold K values as ``(K,)`` or ``(1, K)``; ValueError otherwise."""
    if center.numel() != K or center.dim() not in (1, 2) or (center.dim() == 2 and center.shape[0] != 1):
        raise ValueError(f"center: expected shape (1, {K}) or ({K},), got {tuple(center.shape)}")


def check_launch_logits(*named: tuple[str, object], supported: Sequence[torch.dtype]) -> None:
    """Kernel-launcher check of logit matrices: each ``(name, value)`` a 2-D tensor of a
    ``supported`` dtype with unit stride along K (the kernels' only layout)."""
    for name, x in named:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in supported:
            names = [str(d).replace("torch.", "") for d in supported]
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            raise TypeError(f"{name}: expected {listed}, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(x.shape)}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: expected unit stride along K, got strides {x.stride()}")


def check_launch_vector(name: str, v: Tensor, n: int) -> None:
    """Kernel-launcher check of a per-column or per-row vector: contiguous float32 ``(n,)``."""
    if v.dtype != torch.float32 or v.dim() != 1 or v.numel() != n or v.stride(0) != 1:
        raise ValueError(f"{name}: expected a contiguous float32 ({n},) tensor, got {v.dtype} {tuple(v.shape)}")


def check_launch_temps(student_temp: float, teacher_temp: float) -> None:
    """Kernel-launcher check: both temperatures > 0."""
    if not (student_temp > 0 and teacher_temp > 0):
        raise ValueError(f"temperatures must be > 0, got student_temp={student_temp}, teacher_temp={teacher_temp}")


def math_dtype(*ts: Tensor) -> torch.dtype:
    """The dtype the ops compute in for inputs ``ts``: float64 when any is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def check_crop_weights(crop_weights: object, ncrops: int) -> Optional[tuple[float, ...]]:
    """Validate per-student-crop pair weights; return them as a tuple of floats (None stays None).

    ``crop_weights[v]`` is the weight of every pair (teacher crop i, student crop v != i): the loss
    is ``sum_v w_v * sum_{i != v} mean_b H(q_ib, p_vb)``. ``None`` means the official uniform
    ``1 / n_terms``. Expected: a sequence (or 1-D tensor) of ``ncrops`` finite floats >= 0, not all 0.
    """
    if crop_weights is None:
        return None
    if isinstance(crop_weights, Tensor):
        if crop_weights.dim() != 1:
            raise ValueError(f"crop_weights: expected a 1-D tensor of {ncrops} weights, got shape "
                             f"{tuple(crop_weights.shape)}")
        crop_weights = crop_weights.detach().cpu().double().tolist()
    if isinstance(crop_weights, (str, bytes)) or not isinstance(crop_weights, Sequence):
        raise TypeError(f"crop_weights: expected a sequence of {ncrops} floats or None, got "
                        f"{type(crop_weights).__name__}")
    if len(crop_weights) != ncrops:
        raise ValueError(f"crop_weights: expected {ncrops} weights (one per student crop), got {len(crop_weights)}")
    out = []
    for v, w in enumerate(crop_weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
            raise TypeError(f"crop_weights[{v}]: expected a float, got {type(w).__name__} {w!r}")
        w = float(w)
        if not (math.isfinite(w) and w >= 0.0):
            raise ValueError(f"crop_weights[{v}]: expected a finite float >= 0, got {w!r}")
        out.append(w)
    if not any(w > 0 for w in out):
        raise ValueError(f"crop_weights: expected at least one weight > 0, got {out}")
    return tuple(out)

"""Teacher EMA over one flat buffer: one Triton launch per update.

Math (DINO, Caron et al. 2021, teacher update after the optimizer step)::

    theta_t <- m * theta_t + (1 - m) * theta_s          m in [0, 1] (momentum, "lambda")

computed as a linear interpolation ``theta_t + w * (theta_s - theta_t)`` with ``w = 1 - m`` in
fp32, the same formula as ``torch.lerp`` (for ``w < 0.5``, which holds for every DINO momentum;
for ``w >= 0.5`` ``torch.lerp`` uses the mirrored form ``theta_s - (theta_s - theta_t) * m``,
and so does this kernel, so the two agree bit for bit up to FMA contraction). ``m = 1`` leaves
the teacher bit-identical; ``m = 0`` copies the student.

Layout: every teacher parameter is a view into one contiguous fp32 buffer, and every student
parameter a view into another buffer with the same element order (see ``dino_fast.ops.ema.teacher``), so
the update is one elementwise pass over ``n`` elements, whatever the number of parameter
tensors (about 170 for a ViT-S/16 with its DINO head).

Bytes model (the floor for this update): read theta_t (4 B), read theta_s (4 B), write theta_t
(4 B) = 12 bytes per fp32 parameter. The official loop
``param_k.data.mul_(m).add_((1 - m) * param_q)`` launches three kernels per tensor and moves
4+4 (mul_) + 4+4 (the temporary (1-m)*theta_s) + 4+4+4 (add_) = 28 bytes per parameter.

Grid: ``cdiv(n, BLOCK)`` programs of ``BLOCK`` elements; offsets are computed in int64 so that
buffers of more than 2**31 elements are addressed correctly.
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK = 4096
DEFAULT_NUM_WARPS = 8
SUPPORTED_DTYPES = (torch.float32,)

__all__ = ["ema_flat_", "DEFAULT_BLOCK", "DEFAULT_NUM_WARPS", "SUPPORTED_DTYPES"]


@triton.jit
def _ema_kernel(
    teacher_ptr,  # *fp32, (n,) updated in place
    student_ptr,  # *fp32, (n,) read only
    n,  # number of elements
    weight,  # fp32 scalar, w = 1 - m
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(teacher_ptr + offs, mask=mask, other=0.0)
    s = tl.load(student_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
    d = s - t
    # torch.lerp's two-sided formula: exact at both ends (w = 0 keeps t, w = 1 gives s).
    if weight < 0.5:
        out = t + weight * d
    else:
        out = s - d * (1.0 - weight)
    tl.store(teacher_ptr + offs, out, mask=mask)


def _check_flat(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D flat buffer, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got stride {x.stride()}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must have dtype in {SUPPORTED_DTYPES} (the teacher stays fp32), got {x.dtype}")
    return x


def ema_flat_(
    teacher: torch.Tensor,
    student: torch.Tensor,
    momentum: float,
    *,
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> torch.Tensor:
    """In place ``teacher <- momentum * teacher + (1 - momentum) * student`` in one launch.

    Args:
        teacher: (n,) contiguous float32 buffer, updated in place.
        student: (n,) contiguous float32 buffer on the same device, read only.
        momentum: Python number in [0, 1].
        block: elements per program (a power of two, at least 128).
        num_warps: warps per program.

    Returns:
        ``teacher`` (the same tensor, updated).

    Raises:
        TypeError: when an argument has the wrong type.
        ValueError: when shapes, dtypes, devices, layout or ``momentum`` are invalid.
    """
    _check_flat("teacher", teacher)
    _check_flat("student", student)
    if teacher.shape != student.shape:
        raise ValueError(f"teacher and student buffers must have the same shape, got {tuple(teacher.shape)} "
                         f"and {tuple(student.shape)}")
    if teacher.dtype != student.dtype:
        raise ValueError(f"teacher and student buffers must have the same dtype, got {teacher.dtype} "
                         f"and {student.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher and student buffers must be on the same device, got {teacher.device} "
                         f"and {student.device}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a Python float, got {type(momentum).__name__}")
    momentum = float(momentum)
    if not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a finite number in [0, 1], got {momentum}")
    if not isinstance(block, int) or block < 128 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 128, got {block!r}")
    if not isinstance(num_warps, int) or num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps!r}")
    n = teacher.numel()
    if n == 0:
        return teacher
    if teacher.data_ptr() == student.data_ptr():
        raise ValueError("teacher and student buffers are the same memory")
    grid = (triton.cdiv(n, block),)
    # Looked up at call time so tests can wrap the kernel to count launches.
    _ema_kernel[grid](teacher, student, n, 1.0 - momentum, BLOCK=block, num_warps=num_warps)
    return teacher

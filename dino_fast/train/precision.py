"""Mixed precision of a training run: ``train.precision`` resolved for a device, autocast, speed flags."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from dino_fast.config import ConfigError

__all__ = ["EVAL_BF16_MIN_IMAGES", "autocast_context", "cpu_has_native_bf16", "resolve_eval_precision",
           "resolve_precision", "set_speed_flags"]

# eval.precision=auto reads folders of at least this many train + val images in the training's
# precision (bf16 where it trains in bf16): one fp32 pass over 25 000 images took 49.5 s on 2
# cores, 26.6 s in bf16, top-1 unchanged within 0.02 there (docs/NOTEBOOK.md)
EVAL_BF16_MIN_IMAGES = 20_000


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` (``bf16``/``fp16``) on ``device``; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when the CPU has bf16 dot-product instructions (the ``avx512_bf16`` or ``amx_bf16``
    flag in Linux's ``/proc/cpuinfo``); False elsewhere or when the file cannot be read. Without
    them bf16 matmuls are emulated and slower than fp32."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[-1].split()))
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA (fp16 on GPUs without bf16); on CPU bf16 where the CPU has native
    bf16 instructions (:func:`cpu_has_native_bf16`: a training step 1.6-1.7x faster than fp32 on
    an AVX512-BF16 machine), fp32 otherwise."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_eval_precision(precision: str, n_images: int, train_precision: str) -> str:
    """``eval.precision`` for an evaluation that reads ``n_images`` train + val images (an int >= 0)
    after training in ``train_precision`` (resolved: bf16 | fp16 | fp32): ``fp32`` and ``bf16``
    stay; ``auto`` is ``bf16`` when the training ran in bf16 and ``n_images`` is at least
    :data:`EVAL_BF16_MIN_IMAGES`, else ``fp32`` (small folders keep the exact fp32 figures; on
    large ones the passes dominate the evaluation's cost and bf16 halves them).

    Raises:
        ValueError: ``precision`` is not auto | bf16 | fp32, or ``n_images`` is not an int >= 0.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"eval.precision must be auto, bf16 or fp32, got {precision!r}")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
        raise ValueError(f"n_images must be an int >= 0, got {n_images!r}")
    if precision != "auto":
        return precision
    return "bf16" if train_precision == "bf16" and n_images >= EVAL_BF16_MIN_IMAGES else "fp32"


def set_speed_flags(device: torch.device) -> None:
    """cudnn benchmark and TF32 matmuls on CUDA (the official settings); nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

"""Backend selection shared by every fast path (loss, EMA).

Backends:
- ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``"torch"`` (alias ``"cpu"``): the eager fast path (any device);
- ``"reference"``: the op-by-op reference implementation (tests and benchmarks);
- ``"auto"``: ``triton`` for CUDA tensors, ``torch`` otherwise.

The environment variable ``DINO_FAST_BACKEND`` overrides ``"auto"`` (never an explicit choice).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch", "cpu", "reference")
ENV_VAR = "DINO_FAST_BACKEND"


def check_backend(backend: str) -> str:
    """Validate a backend name and return its canonical form (``"cpu"`` -> ``"torch"``).

    Raises:
        ValueError: when ``backend`` is not one of :data:`BACKENDS`.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "torch" if backend == "cpu" else backend


def triton_interpreter_active() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set, so Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when Triton can be imported."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a core dependency
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` for tensors on ``device`` to one of ``triton``, ``torch``, ``reference``.

    ``"auto"`` picks Triton on CUDA and the eager fast path elsewhere (the environment variable
    ``DINO_FAST_BACKEND`` can force another choice). An explicit ``"triton"`` on CPU tensors is
    honoured only under ``TRITON_INTERPRET=1``; otherwise it raises ``ValueError`` saying why.
    """
    backend = check_backend(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            backend = check_backend(env)
            if backend == "auto":
                backend = "triton" if device.type == "cuda" else "torch"
        else:
            backend = "triton" if device.type == "cuda" else "torch"
        if backend == "triton" and device.type != "cuda" and not triton_interpreter_active():
            backend = "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' requested but Triton cannot be imported")
        if device.type != "cuda" and not triton_interpreter_active():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on CPU tensors, or use backend='torch'"
            )
    return backend

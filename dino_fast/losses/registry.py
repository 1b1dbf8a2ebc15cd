"""The loss registry: every loss of :mod:`dino_fast.losses`, with its float64 definition and an
example input, so that one contract test (tests/losses/test_contract.py) checks each of them and
any loss registered later: value and gradient against the float64 reference on fresh random
inputs in every supported dtype, inputs left unchanged, a finite result.

A loss is registered as a :class:`LossSpec`: ``fast(*inputs)`` is the library's loss as a pure
function of tensors returning a 0-dim tensor (a module loss is wrapped with its fixed
arguments), ``reference(*inputs)`` the float64 definition from :mod:`dino_fast.reference`, and
``example(generator, dtype)`` fresh inputs (the first one is the differentiable one).
See docs/DESIGN.md, "Adding a loss".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dino_fast.losses.koleo import koleo_loss
from dino_fast.ops.patch_ce.function import patch_ce_loss
from dino_fast.ops.soft_ce.function import dino_loss
from dino_fast.reference.ibot import patch_ce_reference
from dino_fast.reference.loss import dino_loss_reference, koleo_loss_reference

__all__ = ["LossSpec", "LOSSES", "register_loss"]


@dataclass(frozen=True)
class LossSpec:
    """One registered loss (see the module doc).

    Attributes:
        name: registry key.
        fast: ``fast(*inputs) -> 0-dim Tensor``, differentiable in ``inputs[0]``.
        reference: the float64 definition, same arguments.
        example: ``example(generator, dtype) -> tuple of tensors`` on the CPU.
        dtypes: input dtypes ``fast`` supports.
        rtol: tolerance of the value against the float64 reference, per dtype name.
    """

    name: str
    fast: Callable[..., Tensor]
    reference: Callable[..., Tensor]
    example: Callable[[torch.Generator, torch.dtype], tuple[Tensor, ...]]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    rtol: tuple[tuple[str, float], ...] = (("float32", 1e-5), ("bfloat16", 1e-5), ("float16", 1e-5))


LOSSES: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec) -> LossSpec:
    """Add ``spec`` to :data:`LOSSES`; raises ValueError when its name is taken."""
    if spec.name in LOSSES and LOSSES[spec.name] is not spec:
        raise ValueError(f"loss {spec.name!r} is already registered")
    LOSSES[spec.name] = spec
    return spec


_NCROPS, _B, _K = 6, 3, 300


def _dino_example(g: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, ...]:
    S = (3 * torch.randn(_NCROPS * _B, _K, generator=g)).to(dtype)
    T = (3 * torch.randn(2 * _B, _K, generator=g)).to(dtype)
    c = 0.3 * torch.randn(1, _K, generator=g)
    return S, T, c


def _dino_fast(S: Tensor, T: Tensor, c: Tensor) -> Tensor:
    return dino_loss(S, T, c, ncrops=_NCROPS, student_temp=0.1, teacher_temp=0.04, backend="torch")


def _dino_reference(S: Tensor, T: Tensor, c: Tensor) -> Tensor:
    return dino_loss_reference(S, T, c, ncrops=_NCROPS, student_temp=0.1, teacher_temp=0.04)


register_loss(LossSpec("dino", _dino_fast, _dino_reference, _dino_example))
register_loss(LossSpec(
    "koleo", koleo_loss, koleo_loss_reference,
    lambda g, dtype: (torch.randn(16, 24, generator=g).to(dtype),),
))


_IBOT_ROWS = 40


def _ibot_example(g: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, ...]:
    S = (3 * torch.randn(_IBOT_ROWS, _K, generator=g)).to(dtype)
    T = (3 * torch.randn(_IBOT_ROWS, _K, generator=g)).to(dtype)
    c = 0.3 * torch.randn(_K, generator=g)
    w = torch.rand(_IBOT_ROWS, generator=g) / _IBOT_ROWS
    return S, T, c, w


register_loss(LossSpec(
    "ibot_patch",
    lambda S, T, c, w: patch_ce_loss(S, T, c, w, student_temp=0.1, teacher_temp=0.04, backend="torch"),
    lambda S, T, c, w: patch_ce_reference(S, T, c, w, student_temp=0.1, teacher_temp=0.04),
    _ibot_example,
))

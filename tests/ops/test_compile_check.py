"""compile_for under the interpreter: a kernel that calls a device function (@triton.jit from
@triton.jit) leaves triton.language patched for the rest of the process in triton 3.x, so
compile_for must compile in a clean child process, with nothing taken from the Triton cache."""
from __future__ import annotations

import pytest
import torch

from dino_fast.ops import compile_check


def _run_kernel_with_device_function() -> None:
    """The DINO backward kernel calls _grad_row (a device function) from inside the kernel."""
    from dino_fast.ops.soft_ce.function import dino_loss

    S = torch.randn(2 * 3, 40, requires_grad=True)
    T = torch.randn(2 * 3, 40)
    dino_loss(S, T, torch.zeros(40), ncrops=2, student_temp=0.1, teacher_temp=0.04, backend="triton").backward()
    assert S.grad is not None and torch.isfinite(S.grad).all()


def test_interpreter_detected() -> None:
    assert compile_check.interpreter_active()  # conftest sets TRITON_INTERPRET=1


@pytest.mark.parametrize("arch", [80, 90])
def test_compile_after_interpreted_device_function(arch: int, tmp_path, monkeypatch) -> None:
    from dino_fast.ops.ema import kernels as kema

    _run_kernel_with_device_function()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a real compile, not a cache hit
    res = compile_check.compile_for(
        kema._ema_kernel,
        {"teacher_ptr": "*fp32", "student_ptr": "*fp32", "n": "i32", "weight": "fp32", "BLOCK": "constexpr"},
        {"BLOCK": kema.DEFAULT_BLOCK}, arch=arch, num_warps=kema.DEFAULT_NUM_WARPS,
    )
    assert res.name == "_ema_kernel" and res.arch == arch and not res.spills and 0 < res.registers <= 255
    assert any(tmp_path.iterdir()), "the child process compiled into the given cache dir"


def test_child_compile_error_is_reported(tmp_path, monkeypatch) -> None:
    from dino_fast.ops.ema import kernels as kema

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="_ema_kernel for sm_80 failed in a child process"):
        compile_check.compile_for(kema._ema_kernel, {"teacher_ptr": "*fp32"}, {"BLOCK": 4096}, arch=80)


def test_nested_function_refused() -> None:
    def local_kernel():  # not importable by name from a child process
        pass

    with pytest.raises(ValueError, match="module-level kernel"):
        compile_check.compile_for(local_kernel, {}, {}, arch=80)

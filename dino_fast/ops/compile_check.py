"""Compile Triton kernels for CUDA targets without a GPU and report their resource usage.

``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (TTIR -> TTGIR ->
LLVM IR -> PTX -> cubin through the ``ptxas`` that ships with Triton) on a machine with no GPU.
The registers, stack and local memory (spills) are then read from the cubin with the
``cuobjdump`` that ships with Triton.

A process that runs kernels under ``TRITON_INTERPRET=1`` cannot be trusted to compile: the
interpreter replaces ``triton.language`` builtins while it runs a kernel, and the patches it
applies for a call of one ``@triton.jit`` function from another (a device function) are never
undone (``InterpretedFunction.__call__`` in triton 3.x), so a later compile in the same process
sees interpreter builtins and fails (``'value' object has no attribute 'dtype'``). Compilation
then runs in a fresh child process with the interpreter off (:func:`compile_for` decides).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class KernelResources:
    """Resource usage of one compiled kernel.

    Attributes:
        name: kernel function name.
        arch: compute capability, e.g. 80 or 90.
        num_warps: warps per program.
        registers: registers per thread.
        stack: stack bytes per thread (Triton kernels use none unless they spill).
        local: local-memory bytes per thread (register spills land here).
        shared: static shared-memory bytes per program.
        spill_stores / spill_loads: bytes, as reported by ``ptxas -v`` (0 when none).
    """

    name: str
    arch: int
    num_warps: int
    registers: int
    stack: int
    local: int
    shared: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        """True when the kernel spills registers to local memory."""
        return self.local > 0 or self.stack > 0 or self.spill_stores > 0 or self.spill_loads > 0


def _nvidia_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found at {path}: this Triton wheel has no NVIDIA backend")
    return path


def interpreter_active() -> bool:
    """True when this process runs Triton kernels under the interpreter (``TRITON_INTERPRET``
    set to a true value) or ``triton.language`` still holds interpreter builtins."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off"):
        return True
    tl = sys.modules.get("triton.language")
    return tl is not None and getattr(tl.program_id, "__name__", "") == "<lambda>"


def _python_function(fn: Any) -> Any:
    """The Python function behind a JITFunction / InterpretedFunction (or ``fn`` itself)."""
    return getattr(fn, "fn", fn)


def compile_for(
    fn: Any,
    signature: Mapping[str, str],
    constexprs: Mapping[str, Any],
    *,
    arch: int,
    num_warps: int = 4,
    num_stages: int = 3,
) -> KernelResources:
    """Compile ``fn`` (an ``@triton.jit`` function) for ``sm_{arch}`` and return its resources.

    Args:
        fn: the JIT function.
        signature: argument name -> Triton type (``"*fp32"``, ``"i32"``, ``"fp32"``,
            ``"constexpr"``), for every argument of ``fn`` in order.
        constexprs: values of the ``constexpr`` arguments.
        arch: compute capability (80 for A100, 90 for H100).
        num_warps / num_stages: launch options as the launcher uses them.

    Returns:
        the :class:`KernelResources` of the cubin.

    Raises:
        FileNotFoundError: the Triton wheel has no NVIDIA backend (no ``ptxas``/``cuobjdump``).
        RuntimeError: compilation failed (the compiler's message is included).

    When :func:`interpreter_active`, ``fn`` must be a module-level function (it is looked up by
    module and name) and the compile runs in a child process with the interpreter off.
    """
    if interpreter_active():
        return _compile_in_child(fn, signature, constexprs, arch=arch, num_warps=num_warps,
                                 num_stages=num_stages)
    return _compile_here(fn, signature, constexprs, arch=arch, num_warps=num_warps, num_stages=num_stages)


def _compile_in_child(
    fn: Any, signature: Mapping[str, str], constexprs: Mapping[str, Any], *, arch: int, num_warps: int,
    num_stages: int,
) -> KernelResources:
    py = _python_function(fn)
    module, name = py.__module__, py.__qualname__
    if "<" in name or "." in name:
        raise ValueError(f"compile_for under the interpreter needs a module-level kernel, got {module}.{name}")
    request = {"module": module, "name": name, "signature": dict(signature), "constexprs": dict(constexprs),
               "arch": arch, "num_warps": num_warps, "num_stages": num_stages}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "dino_fast.ops.compile_check"], input=json.dumps(request),
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {module}.{name} for sm_{arch} failed in a child process:\n"
                           f"{proc.stderr[-4000:]}")
    return KernelResources(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _compile_here(
    fn: Any, signature: Mapping[str, str], constexprs: Mapping[str, Any], *, arch: int, num_warps: int,
    num_stages: int,
) -> KernelResources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        # Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction: compile the
        # Python function it wraps.
        fn = JITFunction(getattr(fn, "fn", fn))
    src = ASTSource(fn, signature=dict(signature), constexprs=dict(constexprs))
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    cubin = compiled.asm["cubin"]
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run(
            [_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin_path],
            capture_output=True, text=True, check=True,
        ).stdout
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        ptxas = subprocess.run(
            [_nvidia_bin("ptxas"), "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", ptx_path,
             "-o", os.path.join(tmp, "k2.cubin")],
            capture_output=True, text=True,
        )
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{usage}")
    reg, stack, shared, local = (int(g) for g in m.groups())
    sm = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas.stdout + ptxas.stderr)
    spill_st, spill_ld = (int(sm.group(1)), int(sm.group(2))) if sm else (0, 0)
    return KernelResources(
        name=fn.__name__, arch=arch, num_warps=num_warps, registers=reg, stack=stack, local=local,
        shared=shared, spill_stores=spill_st, spill_loads=spill_ld,
    )


def _main() -> int:
    """Child side of :func:`compile_for`: a JSON request on stdin, KernelResources JSON on stdout."""
    req = json.loads(sys.stdin.read())
    fn = getattr(importlib.import_module(req["module"]), req["name"])
    res = _compile_here(fn, req["signature"], req["constexprs"], arch=int(req["arch"]),
                        num_warps=int(req["num_warps"]), num_stages=int(req["num_stages"]))
    print(json.dumps(dataclasses.asdict(res)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())

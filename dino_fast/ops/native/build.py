"""Build, cache and load the native CPU kernels (``soft_ce_cpu.cpp``) through ctypes.

The C++ source has no torch headers (its threads are the OpenMP pool torch itself uses: see
``FLAGS``): it compiles in about a second with the system's C++
compiler (``$CXX``, else ``g++``, else ``c++``) into a shared library cached under
``$DINO_FAST_CACHE/native`` (default ``~/.cache/dino_fast/native``), keyed by a hash of the
source, the compiler's version, the flags and the CPU's feature flags (the build uses
``-march=native``; a cache shared by machines of different CPUs keeps one library per CPU).
The build writes to a temporary file and renames it, so concurrent first uses (test workers,
ranks) are safe.

Where no compiler is found or the build fails, :func:`native_status` says why and the callers
use the eager torch path (same math, slower); ``DINO_FAST_NATIVE=0`` turns the native kernels
off (``=1`` makes a failed build an error instead of a fallback).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["NATIVE_ENV", "ABI_VERSION", "load_native", "native_status", "cache_dir", "set_native_enabled",
           "native_enabled"]

log = logging.getLogger(__name__)

NATIVE_ENV = "DINO_FAST_NATIVE"
ABI_VERSION = 2
SOURCE = Path(__file__).with_name("soft_ce_cpu.cpp")
# -fopenmp links libgomp.so.1: the soname of the libgomp torch bundles and loads first, so the
# kernels run on torch's own OpenMP pool (no second set of threads competing for the cores)
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         "-ffp-contract=fast", "-fvisibility=hidden"]


def cache_dir() -> Path:
    """Where built libraries are kept: ``$DINO_FAST_CACHE/native`` or ``~/.cache/dino_fast/native``."""
    root = os.environ.get("DINO_FAST_CACHE", "").strip()
    return (Path(root) if root else Path.home() / ".cache" / "dino_fast") / "native"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX", "").strip(), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return ""


def _build(cxx: str, out: Path) -> str:
    """Compile SOURCE into ``out``; "" on success, else the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in (["-march=native"], []):  # a compiler that does not know this CPU: generic x86-64
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cxx, *FLAGS, *arch, str(SOURCE), "-o", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            res = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if res is not None and res.returncode == 0:
            os.replace(tmp, out)
            return ""
        if res is not None:
            errors.append(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()[-800:]}")
        Path(tmp).unlink(missing_ok=True)
    return "; ".join(errors)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Optional[ctypes.CDLL], str]:
    env = os.environ.get(NATIVE_ENV, "").strip()
    if env == "0":
        return None, f"{NATIVE_ENV}=0"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found ($CXX, g++ or c++ on PATH)"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{cxx} --version failed: {e}"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_flags(),
                                    str(ABI_VERSION)]).encode()).hexdigest()[:20]
    lib_path = cache_dir() / key / "soft_ce_cpu.so"
    if not lib_path.exists():
        err = _build(cxx, lib_path)
        if err:
            return None, f"building {SOURCE.name} failed: {err}"
        log.info("built the native CPU kernels into %s", lib_path)
    try:
        lib = ctypes.CDLL(str(lib_path))
        abi = lib.dfn_abi_version()
    except (OSError, AttributeError) as e:
        return None, f"loading {lib_path} failed: {e}"
    if abi != ABI_VERSION:
        return None, f"{lib_path} has ABI {abi}, expected {ABI_VERSION}"
    i64, i32, f32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.dfn_soft_ce_fwd.argtypes = [vp, i64, i32, vp, i64, i32, vp, i64, i64, i32, i32, f32, f32,
                                    vp, vp, vp, i64, i32, vp, vp, vp, i32]
    lib.dfn_soft_ce_fwd.restype = i32
    lib.dfn_patch_ce_fwd.argtypes = [vp, i64, i32, vp, i64, i32, vp, vp, i64, i64, f32, f32,
                                     vp, i64, i32, vp, vp, vp, i32]
    lib.dfn_patch_ce_fwd.restype = i32
    lib.dfn_sk_col_max.argtypes = [vp, i64, i32, i64, i64, f32, vp, vp, i32]
    lib.dfn_sk_col_sumexp.argtypes = [vp, i64, i32, i64, i64, f32, vp, vp, vp, i32]
    lib.dfn_sk_rows.argtypes = [vp, i64, i32, i64, i64, f32, vp, vp, f32, vp, i64, i32]
    for fn in (lib.dfn_sk_col_max, lib.dfn_sk_col_sumexp, lib.dfn_sk_rows):
        fn.restype = i32
    return lib, ""


_ENABLED = [True]


def set_native_enabled(enabled: bool) -> bool:
    """Turn the native kernels on or off for this process (the callers then take the eager torch
    path: benchmarks compare both in one run); returns the previous setting."""
    previous = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    return previous


def native_enabled() -> bool:
    """The setting of :func:`set_native_enabled` (True unless turned off)."""
    return _ENABLED[0]


def load_native() -> Optional[ctypes.CDLL]:
    """The loaded native library, or None when it cannot be built or is turned off (see
    :func:`native_status` for why; :func:`set_native_enabled`). Raises ``RuntimeError`` instead
    of returning None when ``DINO_FAST_NATIVE=1`` asks for it explicitly."""
    if not _ENABLED[0]:
        return None
    lib, reason = _load()
    if lib is None and os.environ.get(NATIVE_ENV, "").strip() == "1":
        raise RuntimeError(f"{NATIVE_ENV}=1 but the native CPU kernels are unavailable: {reason}")
    return lib


def native_status() -> tuple[bool, str]:
    """``(True, "")`` when the native CPU kernels load, else ``(False, why not)``."""
    if not _ENABLED[0]:
        return False, "turned off by set_native_enabled(False)"
    lib, reason = _load()
    return lib is not None, reason

"""Shared measurement tools for the benchmarks of bench/.

- :func:`time_cpu`: medians over repeats with ``torch.utils.benchmark`` (one process, side by side).
- :func:`count_aten_bytes`: bytes an eager implementation moves, counted per aten op (inputs plus
  outputs) with a ``TorchDispatchMode``: the memory traffic an eager GPU run would do, since each
  aten op is one or more kernels that read their inputs and write their outputs.
- :func:`count_triton_traffic`: bytes that Triton kernels actually load and store, counted from the
  masked loads/stores they execute under ``TRITON_INTERPRET=1``, plus the number of launches.
- :func:`peak_cpu_memory`: peak extra bytes allocated by torch's CPU allocator during a call.
- :func:`projected_seconds`: bytes / 3.0 TB/s, an H100's measured copy bandwidth. Always
  labelled *projected* where printed.
- :func:`write_result`: bench/results/NAME.json with machine and version information.
- :func:`suite_main`: the ``python -m bench.NAME [--quick] [--threads N]`` entry point of a suite.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

RESULTS_DIR = Path(__file__).resolve().parent / "results"
H100_BW = 3.0e12  # bytes/s: measured device-to-device copy bandwidth of an H100 SXM


def projected_seconds(nbytes: float, bandwidth: float = H100_BW) -> float:
    """Projected time (s) to move ``nbytes`` at ``bandwidth`` bytes/s (a bandwidth-bound floor)."""
    return float(nbytes) / bandwidth


def time_cpu(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Time ``fn()`` on the CPU: ``warmup`` untimed calls, then ``repeats`` timed calls.

    Returns a dict with ``median_s``, ``min_s``, ``max_s``, ``repeats`` (seconds per call).
    Uses ``torch.utils.benchmark.Timer`` so thread settings match torch's own benchmarks.
    """
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = [timer.timeit(1).median for _ in range(max(repeats, 1))]
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor) and not t.is_meta:
        return t.numel() * t.element_size()
    return 0


class _ByteCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops: dict[str, int] = {}
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        # Metadata-only ops move no data.
        if name in _NO_DATA_OPS:
            return out
        flat_in, _ = tree_flatten((args, kwargs))
        flat_out, _ = tree_flatten(out)
        seen: set[int] = set()
        nb = 0
        for t in flat_in + flat_out:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                nb += _nbytes(t)
        self.bytes += nb
        self.ops[name] = self.ops.get(name, 0) + 1
        self.launches += 1
        return out


_NO_DATA_OPS = {
    "view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze",
    "select", "slice", "as_strided", "alias", "detach", "split", "split_with_sizes", "chunk",
    "unbind", "narrow", "empty", "empty_like", "empty_strided", "lift_fresh", "_to_copy_meta",
    "unflatten", "flatten", "_reshape_alias", "view_as", "expand_as", "is_same_size", "sym_size",
    "sym_stride", "sym_numel", "_local_scalar_dense", "set_", "resize_",
}


def count_aten_bytes(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn()`` and count the bytes its aten ops read and write (inputs + outputs per op).

    Returns ``{"bytes": int, "launches": int (aten ops that move data), "ops": {name: count}}``.
    View and allocation ops (no data movement) are not counted.
    """
    counter = _ByteCounter()
    with counter:
        fn()
    return {"bytes": counter.bytes, "launches": counter.launches, "ops": dict(counter.ops)}


@contextlib.contextmanager
def _patched_interpreter(stats: dict[str, int]) -> Iterator[None]:
    from triton.runtime import interpreter as interp

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("count_triton_traffic needs TRITON_INTERPRET=1 set before triton is imported")
    builder_cls = interp.InterpreterBuilder
    orig_load, orig_store = builder_cls.create_masked_load, builder_cls.create_masked_store
    orig_call = interp.GridExecutor.__call__

    # (ptrs, mask, other, <cache/eviction policies: two arguments up to triton 3.8, one from 3.9>,
    # is_volatile) and (ptrs, value, mask, <policies>): only the leading arguments are read here
    def load(self, ptrs, mask, *args):
        ret = orig_load(self, ptrs, mask, *args)
        stats["bytes_loaded"] += int(mask.data.sum()) * ret.data.dtype.itemsize
        return ret

    def store(self, ptrs, value, mask, *args):
        stats["bytes_stored"] += int(mask.data.sum()) * value.data.dtype.itemsize
        return orig_store(self, ptrs, value, mask, *args)

    def call(self, *args, **kwargs):
        stats["launches"] += 1
        return orig_call(self, *args, **kwargs)

    builder_cls.create_masked_load, builder_cls.create_masked_store = load, store
    interp.GridExecutor.__call__ = call
    try:
        yield
    finally:
        builder_cls.create_masked_load, builder_cls.create_masked_store = orig_load, orig_store
        interp.GridExecutor.__call__ = orig_call


def count_triton_traffic(fn: Callable[[], Any]) -> dict[str, int]:
    """Run ``fn()`` under the Triton interpreter and count what its kernels load and store.

    Every masked load/store the kernels execute is counted (active lanes x element size), so the
    figure is the kernels' real traffic to global memory assuming no cache reuse.
    Returns ``{"bytes_loaded", "bytes_stored", "bytes", "launches"}``.
    """
    stats = {"bytes_loaded": 0, "bytes_stored": 0, "launches": 0}
    with _patched_interpreter(stats):
        fn()
    stats["bytes"] = stats["bytes_loaded"] + stats["bytes_stored"]
    return stats


def peak_cpu_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated (and not yet freed) by torch on the CPU while ``fn()`` runs.

    Read from the profiler's memory timeline (every allocation and free of a tensor storage, in
    order), so it counts exactly the temporaries and outputs created during the call, not the
    tensors that existed before it (its inputs). A gradient accumulated into ``.grad`` during the
    call counts; subtract it where a figure is meant to exclude it.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        name = getattr(action, "name", str(action))
        if name == "CREATE":
            live += size
        elif name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return int(peak)


def machine_info() -> dict[str, Any]:
    """CPU, thread count, library versions and whether a GPU is present."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus machine info and a timestamp to bench/results/NAME.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **payload,
    }
    return write_json(RESULTS_DIR / f"{name}.json", doc)


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` to ``path`` as indented JSON, atomically (a temporary file, then a rename);
    creates the parent folder. Returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def fmt_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Format ``rows`` (dicts) as a fixed-width text table over ``columns``."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    return "\n".join(out)


def suite_main(
    argv: Optional[Sequence[str]],
    *,
    name: str,
    description: str,
    run: Callable[..., Any],
    quick_help: str,
    threads: bool = False,
) -> int:
    """Entry point of ``python -m bench.NAME``: parse ``[--quick]`` (and ``[--threads N]`` when
    ``threads``), call ``run(quick=..., [threads=...])``, return 0.

    Args:
        argv: the arguments (``None``: ``sys.argv[1:]``).
        name: the suite's module name (``loss``, ``ema``...), for the program name.
        description, quick_help: help texts.
        run: the suite's ``run`` function.
        threads: whether the suite takes a ``threads`` argument.
    """
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    if threads:
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's setting)")
    a = p.parse_args(list(argv) if argv is not None else None)
    if threads:
        run(quick=a.quick, threads=a.threads)
    else:
        run(quick=a.quick)
    return 0

"""``dino-fast bench [loss|ema|attention|loader|step|reliability|mugs|all|gpu] [--quick]`` (also ``python -m bench``).

Runs the benchmark scripts of bench/, each of which prints its table and writes
bench/results/NAME.json. ``all`` runs the seven suites (any machine); ``gpu`` the CUDA rows of every
suite in one run (CUDA only, bench/gpu.py).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Optional, Sequence

SUITES = ("loss", "ema", "attention", "loader", "step", "reliability", "mugs")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the named benchmark(s); returns 0 when all ran, 1 when one failed."""
    p = argparse.ArgumentParser(prog="dino-fast bench", description=__doc__.split("\n")[0])
    p.add_argument("which", nargs="?", default="all", choices=SUITES + ("all", "gpu"))
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    a = p.parse_args(list(argv) if argv is not None else None)
    # Triton kernels are benchmarked for bytes under the interpreter when there is no GPU.
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    names = SUITES if a.which == "all" else (a.which,)
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"\n=== bench {name}{' (quick)' if a.quick else ''} ===", flush=True)
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            print(f"bench {name}: not available ({e})")
            failed.append(name)
            continue
        try:
            mod.run(quick=a.quick)
        except Exception as e:  # report and go on with the other suites
            import traceback

            traceback.print_exc()
            print(f"bench {name} failed: {type(e).__name__}: {e}")
            failed.append(name)
        print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    if a.which == "all":
        # plots and the README performance section, from whatever the suites just wrote
        from bench import report

        print("\n=== report ===", flush=True)
        report.run(quick=a.quick)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

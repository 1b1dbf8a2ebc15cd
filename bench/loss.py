"""DINO loss benchmark: the official op-by-op loss vs dino-fast's fused loss.

``python -m bench.loss [--quick]`` from the repository root (also ``dino-fast bench loss``).

Reports:
- CPU forward+backward time (medians over repeats, ``torch.utils.benchmark``, side by side in one
  process): ``DINOLossReference`` (the official algorithm: a loop over crop pairs with a
  log_softmax per pair) vs ``DINOLoss(backend="torch")`` (the CPU fast path: the native kernel,
  :mod:`dino_fast.ops.soft_ce.native`, where it builds), at B = 32 and 64,
  K = 65536, 2+8 and 2+10 crops, fp32 and bf16 (``--quick``: B = 32, 2+8, fp32 and bf16).
  Bar: >= 4x at B=32, K=65536, 2+8, fp32.
- Peak extra CPU memory of forward+backward beyond the inputs and the gradient (profiler memory
  timeline, gradient bytes subtracted). Bar: ours <= 10% of the reference's.
- Bytes moved at B=64, K=65536, 2+10 crops: the reference counted per aten op (inputs + outputs,
  TorchDispatchMode); the Triton kernels counted from the loads and stores they execute under
  TRITON_INTERPRET=1 at B=8 and scaled by 64/8 (exact: every term of the kernels' traffic,
  including the per-8-image-group center reads and column-sum writes, is proportional to B when
  B is a multiple of 8); the floor (read S, read T, write dS). Bars: Triton <= 1.7x the floor
  and >= 15x fewer bytes than the reference. Projected H100 times (bytes / 3.0 TB/s) are
  labelled *projected*.
- Against what a user gets for free (``compiled_rows``): per-call forward+backward times, all
  formulations interleaved call by call in one process, at B = 32, K = 65536, 2+8 crops, fp32
  and bf16: dino-fast (native kernel), dino-fast's torch composition (the eager path the native
  kernel replaced, for the record), the official pair loop (eager and under ``torch.compile``), DINOv2's
  composition (one log-softmax per student crop; eager and compiled). Bars: dino-fast's median
  >= 1.5x the best compiled peer's median, and <= 1.3x its own best call.
- Sweeps for the plots: time and peak memory vs K (B=8) and vs B (K=65536), 2+8 crops, fp32.
- On a CUDA machine: ``triton.testing.do_bench`` of the Triton path and of the reference.
"""
from __future__ import annotations

import os
import statistics
import sys
from typing import Any, Callable, Optional, Sequence

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # count the kernels' traffic on CPU tensors

from bench import common  # noqa: E402
from dino_fast.losses.dino import DINOLoss  # noqa: E402
from dino_fast.ops.native import set_native_enabled  # noqa: E402
from dino_fast.ops.soft_ce.function import dino_loss  # noqa: E402
from dino_fast.reference.loss import (  # noqa: E402
    DINOLossReference,
    dino_loss_dinov2_composition,
    dino_loss_reference,
)

K = 65536
TAU_S, TAU_T = 0.1, 0.04
BAR_SPEEDUP = 4.0
BAR_VS_COMPILED = 1.5
BAR_MEDIAN_OVER_BEST = 1.3
BAR_MEMORY = 0.10
BAR_FLOOR = 1.7
BAR_VS_REF = 15.0
COUNT_B = 8  # batch at which the Triton kernels' traffic is counted under the interpreter


def _inputs(B: int, ncrops: int, dtype: torch.dtype, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    S = torch.randn(ncrops * B, K, generator=g).to(dtype)
    T = (torch.randn(2 * B, K, generator=g) + 0.3 * torch.randn(1, K, generator=g)).to(dtype)
    c = 0.1 * torch.randn(1, K, generator=g)
    return S.to(device), T.to(device), c.to(device)


def _step(crit: torch.nn.Module, S: torch.Tensor, T: torch.Tensor) -> Callable[[], None]:
    """One forward+backward through ``crit`` on a fresh leaf; the gradient is dropped after."""
    def fn() -> None:
        s = S.detach().requires_grad_()
        crit(s, T, 0).backward()
        s.grad = None
    return fn


def _criteria(ncrops: int, device: str = "cpu", backend: str = "torch"):
    ref = DINOLossReference(K, ncrops, TAU_T, TAU_T, 0, 10).to(device)
    ours = DINOLoss(K, ncrops, TAU_T, TAU_T, 0, 10, backend=backend).to(device)
    return ref, ours


def cpu_time_rows(quick: bool) -> list[dict[str, Any]]:
    """Forward+backward CPU time, reference vs eager fast path."""
    configs = [(32, 10, torch.float32), (32, 10, torch.bfloat16)]
    if not quick:
        configs += [(64, 10, torch.float32), (64, 10, torch.bfloat16), (32, 12, torch.float32),
                    (32, 12, torch.bfloat16), (64, 12, torch.float32), (64, 12, torch.bfloat16)]
    repeats = 5 if quick else 10
    rows = []
    for B, ncrops, dtype in configs:
        S, T, _ = _inputs(B, ncrops, dtype)
        ref, ours = _criteria(ncrops)
        f_ref, f_ours = _step(ref, S, T), _step(ours, S, T)
        # interleave the two so that machine noise hits both alike
        t_ref, t_ours = [], []
        for _ in range(2):
            t_ref.append(common.time_cpu(f_ref, repeats=repeats // 2, warmup=1))
            t_ours.append(common.time_cpu(f_ours, repeats=repeats // 2, warmup=1))
        med_ref = sum(x["median_s"] for x in t_ref) / len(t_ref)  # mean of the two rounds' medians
        med_ours = sum(x["median_s"] for x in t_ours) / len(t_ours)
        min_ref = min(x["min_s"] for x in t_ref)
        min_ours = min(x["min_s"] for x in t_ours)
        rows.append(dict(
            B=B, crops=f"2+{ncrops - 2}", dtype=str(dtype).replace("torch.", ""),
            ref_ms=1e3 * med_ref, ours_ms=1e3 * med_ours, speedup=med_ref / med_ours,
            ref_min_ms=1e3 * min_ref, ours_min_ms=1e3 * min_ours, speedup_min=min_ref / min_ours,
        ))
        del S, T
    return rows


def compiled_rows(quick: bool) -> list[dict[str, Any]]:
    """Per-call forward+backward ms of dino-fast and of the peers a user would pick (the official
    loop and DINOv2's composition, eager and under ``torch.compile`` default mode), interleaved
    call by call (order rotated every round) on the same inputs; one row per (formulation, dtype)."""
    import time

    B, ncrops = 32, 10
    rounds, warmup = (8, 2) if quick else (15, 3)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        S, T, c = _inputs(B, ncrops, dtype)
        ref, ours = _criteria(ncrops)
        temp = float(ref.teacher_temp_schedule[0])

        def official(s: torch.Tensor) -> torch.Tensor:
            return dino_loss_reference(s, T, c, ncrops=ncrops, student_temp=TAU_S, teacher_temp=temp)

        def dinov2(s: torch.Tensor) -> torch.Tensor:
            return dino_loss_dinov2_composition(s, T, c, ncrops=ncrops, student_temp=TAU_S, teacher_temp=temp)

        def composition(s: torch.Tensor) -> torch.Tensor:  # the eager torch path, native kernel off
            previous = set_native_enabled(False)
            try:
                return ours(s, T, 0)
            finally:
                set_native_enabled(previous)

        forms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "dino-fast": lambda s: ours(s, T, 0),
            "dino-fast torch composition": composition,
            "official eager": official,
            "official compiled": torch.compile(official),
            "DINOv2 composition eager": dinov2,
            "DINOv2 composition compiled": torch.compile(dinov2),
        }
        names = list(forms)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(warmup + rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                s = S.detach().requires_grad_()
                t0 = time.perf_counter()
                forms[n](s).backward()
                dt = time.perf_counter() - t0
                del s
                if r >= warmup:
                    times[n].append(dt * 1e3)
        for n in names:
            rows.append(dict(B=B, crops=f"2+{ncrops - 2}", dtype=str(dtype).replace("torch.", ""), formulation=n,
                             median_ms=statistics.median(times[n]), min_ms=min(times[n]),
                             median_over_min=statistics.median(times[n]) / min(times[n]), rounds=rounds))
        ours_med = statistics.median(times["dino-fast"])
        for row in rows[-len(names):]:
            row["dino_fast_speedup"] = row["median_ms"] / ours_med
    return rows


def _compiled_bars(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    bars = {}
    for dtype in ("float32", "bfloat16"):
        mine = [r for r in rows if r["dtype"] == dtype]
        ours = next(r for r in mine if r["formulation"] == "dino-fast")
        best = min((r for r in mine if "compiled" in r["formulation"]), key=lambda r: r["median_ms"])
        value = best["median_ms"] / ours["median_ms"]
        bars[f"vs_best_compiled_peer_B32_2+8_{dtype}"] = {
            "value": value, "bar": BAR_VS_COMPILED, "met": value >= BAR_VS_COMPILED,
            "note": f"best compiled peer: {best['formulation']} {best['median_ms']:.1f} ms median, "
                    f"dino-fast {ours['median_ms']:.1f} ms"}
        bars[f"median_over_best_B32_2+8_{dtype}"] = {
            "value": ours["median_over_min"], "bar": BAR_MEDIAN_OVER_BEST,
            "met": ours["median_over_min"] <= BAR_MEDIAN_OVER_BEST}
    f32 = next(r for r in rows if r["dtype"] == "float32" and r["formulation"] == "dino-fast")
    b16 = next(r for r in rows if r["dtype"] == "bfloat16" and r["formulation"] == "dino-fast")
    bars["bf16_over_fp32_median_B32_2+8"] = {
        "value": b16["median_ms"] / f32["median_ms"], "bar": 1.0, "met": b16["median_ms"] <= f32["median_ms"],
        "note": "bf16 inputs at least as fast as fp32 (the bar is <= 1.0)"}
    return bars


def memory_rows(quick: bool) -> list[dict[str, Any]]:
    """Peak extra memory of forward+backward beyond inputs and the gradient."""
    configs = [(32, 10, torch.float32)] + ([] if quick else [(32, 10, torch.bfloat16), (64, 12, torch.float32)])
    rows = []
    for B, ncrops, dtype in configs:
        S, T, _ = _inputs(B, ncrops, dtype)
        ref, ours = _criteria(ncrops)
        grad_bytes = S.numel() * S.element_size()
        out = {}
        for name, crit in (("ref", ref), ("ours", ours)):
            s = S.detach().requires_grad_()

            def fn(crit=crit, s=s) -> None:
                crit(s, T, 0).backward()

            # no warm-up: a fresh DINOLoss allocates its gradient and chunk buffers inside the
            # measured call, so the gradient is counted (and subtracted) for both alike
            out[name] = common.peak_cpu_memory(fn) - grad_bytes
        rows.append(dict(B=B, crops=f"2+{ncrops - 2}", dtype=str(dtype).replace("torch.", ""),
                         ref_MiB=out["ref"] / 2**20, ours_MiB=out["ours"] / 2**20,
                         ratio=out["ours"] / out["ref"]))
    return rows


def bytes_rows(quick: bool) -> list[dict[str, Any]]:
    """Bytes moved: reference (aten ops), Triton (interpreter, scaled), floor; projected H100 times."""
    B, ncrops = 64, 12
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    rows = []
    for dtype in dtypes:
        S, T, c = _inputs(B, ncrops, dtype)
        esize = S.element_size()
        floor = (S.numel() + T.numel() + S.numel()) * esize

        def ref_fn() -> None:
            s = S.detach().requires_grad_()  # noqa: F821 (deleted after use)
            dino_loss_reference(s, T, c, ncrops=ncrops, student_temp=TAU_S, teacher_temp=TAU_T).backward()  # noqa: F821

        ref_bytes = common.count_aten_bytes(ref_fn)["bytes"]
        del S, T
        triton_bytes: Optional[float] = None
        launches = None
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            Sb, Tb, cb = _inputs(COUNT_B, ncrops, dtype)

            def tri_fn() -> None:
                s = Sb.detach().requires_grad_()
                dino_loss(s, Tb, cb, ncrops=ncrops, student_temp=TAU_S, teacher_temp=TAU_T, backend="triton").backward()

            traffic = common.count_triton_traffic(tri_fn)
            triton_bytes = traffic["bytes"] * (B / COUNT_B)
            launches = traffic["launches"]
        row = dict(B=B, crops=f"2+{ncrops - 2}", dtype=str(dtype).replace("torch.", ""),
                   floor_MB=floor / 1e6, ref_MB=ref_bytes / 1e6,
                   ref_x_floor=ref_bytes / floor,
                   projected_h100_ref_ms=1e3 * common.projected_seconds(ref_bytes))
        if triton_bytes is not None:
            row.update(triton_MB=triton_bytes / 1e6, triton_x_floor=triton_bytes / floor,
                       ref_over_triton=ref_bytes / triton_bytes, triton_launches=launches,
                       counted_at_B=COUNT_B,
                       projected_h100_triton_ms=1e3 * common.projected_seconds(triton_bytes),
                       projected_h100_floor_ms=1e3 * common.projected_seconds(floor))
        rows.append(row)
    return rows


def sweep_rows(quick: bool) -> list[dict[str, Any]]:
    """Forward+backward CPU time and peak extra memory vs K (at B=8) and vs B (at K=65536), 2+8
    crops, fp32: the data of the loss plots (bench/report.py). Rows: ``axis`` ("K" or "B"), B, K,
    ref_ms, ours_ms, speedup, ref_MiB, ours_MiB; the point B=8, K=65536 is measured once (axis "K")."""
    ncrops = 10
    ks = [4096, 16384, 65536] if quick else [4096, 8192, 16384, 32768, 65536, 131072]
    bs = [4, 16] if quick else [4, 16, 32, 64]  # B = 8 at K = 65536 is the K sweep's last-but-one point
    configs = [("K", 8, k) for k in ks] + [("B", b, K) for b in bs]
    repeats = 5 if quick else 9
    rows = []
    for axis, B, k in configs:
        g = torch.Generator().manual_seed(1)
        S = torch.randn(ncrops * B, k, generator=g)
        T = torch.randn(2 * B, k, generator=g)
        ref = DINOLossReference(k, ncrops, TAU_T, TAU_T, 0, 10)
        ours = DINOLoss(k, ncrops, TAU_T, TAU_T, 0, 10, backend="torch")
        f_ref, f_ours = _step(ref, S, T), _step(ours, S, T)
        # interleaved, one call at a time, so a burst of load from other processes hits both sides
        tr, to = [], []
        for _ in range(repeats):
            tr.append(common.time_cpu(f_ref, repeats=1, warmup=1 if not tr else 0)["median_s"])
            to.append(common.time_cpu(f_ours, repeats=1, warmup=1 if not to else 0)["median_s"])
        t_ref, t_ours = statistics.median(tr), statistics.median(to)
        grad_bytes = S.numel() * S.element_size()
        mem = {}
        for name, crit in (("ref", DINOLossReference(k, ncrops, TAU_T, TAU_T, 0, 10)),
                           ("ours", DINOLoss(k, ncrops, TAU_T, TAU_T, 0, 10, backend="torch"))):
            s = S.detach().requires_grad_()

            def fn(crit=crit, s=s) -> None:
                crit(s, T, 0).backward()  # noqa: F821 (deleted after use)

            mem[name] = common.peak_cpu_memory(fn) - grad_bytes
        rows.append(dict(axis=axis, B=B, K=k, crops="2+8", dtype="float32", ref_ms=1e3 * t_ref,
                         ours_ms=1e3 * t_ours, speedup=t_ref / t_ours, ref_best_ms=1e3 * min(tr),
                         ours_best_ms=1e3 * min(to), repeats=repeats, ref_MiB=mem["ref"] / 2**20,
                         ours_MiB=mem["ours"] / 2**20))
        del S, T
    return rows


def cuda_rows(quick: bool) -> list[dict[str, Any]]:
    """On CUDA: triton.testing.do_bench of the Triton path and the reference (forward+backward)."""
    if not torch.cuda.is_available():
        return []
    import triton.testing

    rows = []
    configs = [(64, 12, torch.bfloat16)] if quick else [(32, 10, torch.float32), (64, 12, torch.float32),
                                                         (64, 12, torch.bfloat16)]
    for B, ncrops, dtype in configs:
        S, T, _ = _inputs(B, ncrops, dtype, device="cuda")
        ref, ours = _criteria(ncrops, device="cuda", backend="triton")
        ms_ref = triton.testing.do_bench(_step(ref, S, T))
        ms_ours = triton.testing.do_bench(_step(ours, S, T))
        floor = (2 * S.numel() + T.numel()) * S.element_size()
        row = dict(B=B, crops=f"2+{ncrops - 2}", dtype=str(dtype).replace("torch.", ""),
                   ref_ms=ms_ref, triton_ms=ms_ours, speedup=ms_ref / ms_ours,
                   triton_GBps_vs_floor=floor / (ms_ours * 1e-3) / 1e9)
        if (B, ncrops, dtype) == (64, 12, torch.bfloat16):  # issue 20's GPU bar: against the compiled peers
            row["compiled_ms"] = _cuda_compiled_peers(S, T, ncrops, float(ref.teacher_temp_schedule[0]))
            best = min(row["compiled_ms"].values())
            row["vs_best_compiled_peer"] = best / ms_ours
        rows.append(row)
    return rows


def _cuda_compiled_peers(S: torch.Tensor, T: torch.Tensor, ncrops: int, temp: float) -> dict[str, float]:
    """GPU forward+backward ms (``do_bench`` medians) of the official loop and DINOv2's
    composition under ``torch.compile``, default mode and max-autotune."""
    import triton.testing

    c = torch.zeros(1, S.shape[1], device=S.device)

    def official(s: torch.Tensor) -> torch.Tensor:
        return dino_loss_reference(s, T, c, ncrops=ncrops, student_temp=TAU_S, teacher_temp=temp)

    def dinov2(s: torch.Tensor) -> torch.Tensor:
        return dino_loss_dinov2_composition(s, T, c, ncrops=ncrops, student_temp=TAU_S, teacher_temp=temp)

    out = {}
    for name, fn in (("official", official), ("DINOv2 composition", dinov2)):
        for mode in ("default", "max-autotune"):
            compiled = torch.compile(fn, mode=None if mode == "default" else mode)

            def call(compiled=compiled) -> None:
                s = S.detach().requires_grad_()
                compiled(s).backward()

            out[f"{name} compiled ({mode})"] = triton.testing.do_bench(call)
    return out


def _report(res: dict[str, Any]) -> None:
    print(f"CPU forward+backward, K={K} ({torch.get_num_threads()} threads; ms are means of two interleaved "
          "rounds' medians; *_min: best single call)")
    print(common.fmt_table(res["cpu_time"], ["B", "crops", "dtype", "ref_ms", "ours_ms", "speedup",
                                             "ref_min_ms", "ours_min_ms", "speedup_min"]))
    print("\nAgainst torch.compile (per-call forward+backward ms, every formulation interleaved call by call; "
          "speedup = formulation median / dino-fast median)")
    print(common.fmt_table(res["compiled"], ["dtype", "formulation", "median_ms", "min_ms", "median_over_min",
                                             "dino_fast_speedup"]))
    print("\nPeak extra CPU memory of forward+backward beyond inputs and gradient")
    print(common.fmt_table(res["memory"], ["B", "crops", "dtype", "ref_MiB", "ours_MiB", "ratio"]))
    print(f"\nBytes moved per forward+backward (Triton counted under the interpreter at B={COUNT_B}, "
          f"scaled to B; H100 times are PROJECTED = bytes / 3.0 TB/s, not measured)")
    print(common.fmt_table(res["bytes"], ["B", "crops", "dtype", "floor_MB", "ref_MB", "triton_MB",
                                          "triton_x_floor", "ref_over_triton", "projected_h100_ref_ms",
                                          "projected_h100_triton_ms", "projected_h100_floor_ms"]))
    print("\nSweep vs K (B=8) and vs B (K=65536), 2+8 crops, fp32: forward+backward median ms, "
          "peak extra MiB beyond inputs and gradient")
    print(common.fmt_table(res["sweep"], ["axis", "B", "K", "ref_ms", "ours_ms", "speedup", "ref_best_ms",
                                          "ours_best_ms", "ref_MiB", "ours_MiB"]))
    if res["cuda"]:
        print("\nCUDA (triton.testing.do_bench, forward+backward)")
        print(common.fmt_table(res["cuda"], ["B", "crops", "dtype", "ref_ms", "triton_ms", "speedup",
                                             "triton_GBps_vs_floor"]))
    print("\nBars")
    for name, b in res["bars"].items():
        print(f"  {name}: {b['value']:.4g} (bar {b['bar']}) {'MET' if b['met'] else 'NOT MET'}")
    lb, la = res["loadavg_before_1_5_15"], res["loadavg_1_5_15"]
    print(f"load average before / after the run (1 min): {lb[0]:.2f} / {la[0]:.2f} on {os.cpu_count()} CPUs"
          f"{'  (UNRELIABLE timings: machine loaded by other processes)' if max(lb[0], la[0]) > 1.5 * (os.cpu_count() or 1) else ''}")


def run(quick: bool = False) -> dict[str, Any]:
    """Run every part, print the tables, write bench/results/loss.json; returns the payload."""
    load_before = os.getloadavg()
    payload: dict[str, Any] = {"quick": quick, "K": K, "student_temp": TAU_S, "teacher_temp": TAU_T}
    payload["cpu_time"] = cpu_time_rows(quick)
    payload["compiled"] = compiled_rows(quick)
    payload["memory"] = memory_rows(quick)
    payload["bytes"] = bytes_rows(quick)
    payload["sweep"] = sweep_rows(quick)
    payload["cuda"] = cuda_rows(quick)
    payload["loadavg_before_1_5_15"] = list(load_before)
    payload["loadavg_1_5_15"] = list(os.getloadavg())
    head = payload["cpu_time"][0]
    mem = payload["memory"][0]
    byt = payload["bytes"][0]
    payload["bars"] = {
        "cpu_speedup_B32_2+8_fp32": {"value": head["speedup"], "bar": BAR_SPEEDUP, "met": head["speedup"] >= BAR_SPEEDUP},
        "memory_ratio_B32_2+8_fp32": {"value": mem["ratio"], "bar": BAR_MEMORY, "met": mem["ratio"] <= BAR_MEMORY},
        **_compiled_bars(payload["compiled"]),
    }
    gpu = next((r for r in payload["cuda"] if "vs_best_compiled_peer" in r), None)
    if gpu is not None:
        payload["bars"]["cuda_vs_best_compiled_peer_B64_2+10_bf16"] = {
            "value": gpu["vs_best_compiled_peer"], "bar": 2.0, "met": gpu["vs_best_compiled_peer"] >= 2.0}
    if "triton_x_floor" in byt:
        payload["bars"]["triton_bytes_x_floor_B64_2+10_fp32"] = {
            "value": byt["triton_x_floor"], "bar": BAR_FLOOR, "met": byt["triton_x_floor"] <= BAR_FLOOR}
        payload["bars"]["ref_over_triton_bytes_B64_2+10_fp32"] = {
            "value": byt["ref_over_triton"], "bar": BAR_VS_REF, "met": byt["ref_over_triton"] >= BAR_VS_REF}
    _report(payload)
    path = common.write_result("loss", payload)
    print(f"\nwritten {path}")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.loss [--quick]``: prints the tables, writes bench/results/loss.json."""
    return common.suite_main(argv, name="loss", description=__doc__.split("\n")[0], run=run,
                             quick_help="fewer shapes and repeats")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

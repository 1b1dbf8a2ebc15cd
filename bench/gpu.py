"""The GPU rows of every suite in one short run: ``python -m bench.gpu [--quick]`` (CUDA only).

Everything is timed on the GPU with ``triton.testing.do_bench`` (medians, ms) or CUDA events,
with TF32 off for fp32 matmuls so fp32 means fp32:

- copy bandwidth: ``y.copy_(x)`` of 1 GiB, counting bytes read and written (the roofline the
  memory-bound kernels are held against);
- device time: for the loss and the EMA also the GPU time alone (the kernels' summed durations,
  ``torch.profiler``), which tells the kernels' efficiency apart from host-side overhead;
- loss: forward+backward of ``DINOLossReference`` (the official loop over crop pairs) vs
  ``DINOLoss(backend="triton")`` at K = 65536 (bench/loss.py's ``cuda_rows``), with the floor time
  (read S, read T, write dS at the measured copy bandwidth) and ours over that floor;
- ema: one teacher update of ViT-S/16 + head and ViT-B/16 + head: the official per-parameter
  loop, ``torch._foreach_lerp_``, apex when installed, ours (one Triton launch), with the floor
  time (12 bytes per parameter at the copy bandwidth);
- attention: a 12-block ViT-S/16 forward+backward over a DINO multi-crop batch per backend
  (explicit softmax, SDPA, xformers and xformers block-diagonal when installed; bench/attention.py);
- augmentation: ``MultiCropAugment`` on a uint8 batch on the GPU (2 x 224 + 8 x 96 per image),
  images per second (the design runs it on the training device, after the loader);
- step: the end-to-end DINO step of bench/step.py (the official step eager and under
  ``torch.compile``, dino-fast phase by phase, the Trainer's own step; bf16 autocast on every
  side), ViT-S/16, 2 x 224 + 10 x 96, with FLOPs per step and achieved / measured peak; and the
  Trainer's step with each lever of :data:`TRAINER_LEVERS` on (``torch.compile`` of the blocks,
  the same with CUDA graphs, packed multi-crop attention), each against the step without it.

Writes bench/results/gpu.json (the README's GPU table is generated from it by bench/report.py).
Not part of ``bench all``, which runs on any machine; without CUDA it exits with a message.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

from bench import common

COPY_BYTES = 1 << 30


def _do_bench(fn: Callable[[], Any], **kw: Any) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, **kw))


def device_ms(fn: Callable[[], Any], iters: int = 20) -> float:
    """GPU time per call (ms): the summed durations of the kernels (and copies) ``fn`` launches,
    from ``torch.profiler``; host-side overhead (Python, launches, allocations) is excluded,
    which is the difference to the ``do_bench`` figure when a call is bound by the host."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for evt in prof.key_averages():
        v = getattr(evt, "self_device_time_total", None)
        if v is None:
            v = getattr(evt, "self_cuda_time_total", 0.0)
        total_us += float(v)
    return total_us / iters / 1e3


def copy_bandwidth() -> dict[str, float]:
    """GB/s of a device-to-device ``copy_`` of 1 GiB (bytes read + written)."""
    x = torch.empty(COPY_BYTES // 4, device="cuda")
    y = torch.empty_like(x)
    ms = _do_bench(lambda: y.copy_(x))
    return {"bytes": COPY_BYTES, "ms": ms, "GBps": 2 * COPY_BYTES / (ms * 1e-3) / 1e9}


def loss_rows(quick: bool, bw: float) -> list[dict[str, Any]]:
    """bench.loss.cuda_rows plus the floor time at the measured copy bandwidth."""
    from bench import loss as loss_suite

    rows = loss_suite.cuda_rows(quick)
    for r in rows:
        ncrops = 2 + int(r["crops"].split("+")[1])
        dtype = getattr(torch, r["dtype"])
        el = 4 if dtype == torch.float32 else 2
        floor = (2 * ncrops * r["B"] + 2 * r["B"]) * loss_suite.K * el
        r["floor_MB"] = floor / 1e6
        r["floor_ms_at_copy_bw"] = floor / (bw * 1e9) * 1e3
        r["triton_x_floor_time"] = r["triton_ms"] / r["floor_ms_at_copy_bw"]
        try:  # GPU time alone (kernels), without the host overhead do_bench includes
            S, T, _ = loss_suite._inputs(r["B"], ncrops, dtype, device="cuda")
            ref, ours = loss_suite._criteria(ncrops, device="cuda", backend="triton")
            r["ref_device_ms"] = device_ms(loss_suite._step(ref, S, T))
            r["triton_device_ms"] = device_ms(loss_suite._step(ours, S, T))
            r["triton_device_x_floor"] = r["triton_device_ms"] / r["floor_ms_at_copy_bw"]
            del S, T
        except Exception as e:  # noqa: BLE001 - the timing above stands without it
            r["device_ms_error"] = f"{type(e).__name__}: {e}"
    return rows


def ema_rows(bw: float) -> list[dict[str, Any]]:
    """bench.ema's CUDA timings for ViT-S/16 + head and ViT-B/16 + head."""
    from bench import ema as ema_suite

    rows = []
    for name, d in (("vit_small/16 + head", 384), ("vit_base/16 + head", 768)):
        teacher, student, _ = ema_suite._pair(d)
        n = sum(p.numel() for p in student.parameters())
        r = ema_suite._cuda_timings(teacher, student, 0.996)
        try:
            from dino_fast.ops.ema.teacher import TeacherEMA

            ema = TeacherEMA(teacher, student, backend="triton")
            tpd = [t.detach() for t in teacher.parameters()]
            spd = [p.detach() for p in student.parameters()]
            r["ours_device_ms"] = device_ms(lambda: ema.update(0.996))
            r["foreach_lerp_device_ms"] = device_ms(lambda: torch._foreach_lerp_(tpd, spd, 0.004))
        except Exception as e:  # noqa: BLE001
            r["device_ms_error"] = f"{type(e).__name__}: {e}"
        r.update(model=name, params=n, tensors=sum(1 for _ in student.parameters()),
                 floor_ms_at_copy_bw=12 * n / (bw * 1e9) * 1e3)
        r["speedup_vs_reference"] = r["reference_ms"] / r["ours_triton_ms"]
        r["speedup_vs_foreach_lerp"] = r["foreach_lerp_ms"] / r["ours_triton_ms"]
        r["ours_x_floor_time"] = r["ours_triton_ms"] / r["floor_ms_at_copy_bw"]
        rows.append(r)
        del teacher, student
        torch.cuda.empty_cache()
    return rows


def attention_rows(quick: bool) -> list[dict[str, Any]]:
    """bench.attention's CUDA rows: 12 blocks of ViT-S/16, forward+backward, per backend."""
    from bench import attention as attention_suite

    return attention_suite._cuda_rows(12, 8 if quick else 32)


def augment_rows(quick: bool) -> list[dict[str, Any]]:
    """MultiCropAugment on the GPU: images/s for B images of 2 x 224 + 8 x 96 uint8 crops."""
    from dino_fast.data import MultiCropAugment

    B = 32 if quick else 128
    aug = MultiCropAugment(local_crops_number=8)
    g = torch.randint(0, 256, (B, 2, 3, 224, 224), dtype=torch.uint8, device="cuda")
    loc = torch.randint(0, 256, (B, 8, 3, 96, 96), dtype=torch.uint8, device="cuda")
    ids = torch.arange(B)
    epoch = [0]

    def fn() -> None:
        epoch[0] += 1
        aug(g, loc, sample_ids=ids, seed=0, epoch=epoch[0])

    ms = _do_bench(fn, warmup=5, rep=100)
    return [{"batch": B, "crops": "2x224+8x96", "ms_per_batch": ms, "images_per_s": B / (ms * 1e-3),
             "us_per_image": ms * 1e3 / B}]


def step_rows(quick: bool) -> list[dict[str, Any]]:
    """bench.step's end-to-end step on CUDA (bf16 autocast on every side), ViT-S/16 with issue 19's
    crops (2 x 224 + 10 x 96): the official step eager and under ``torch.compile``, dino-fast's
    step and the Trainer's own step, with FLOPs per step and achieved / peak (the bf16 and fp32
    matmul peaks measured first, in this run)."""
    from bench import step as step_suite

    batch, rounds, warmup = (32, 4, 2) if quick else (64, 10, 3)
    peaks = step_suite.peak_matmul_flops("cuda")
    print("  dense matmul peak: " + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in peaks.items()), flush=True)
    setup = step_suite.StepSetup(arch="vit_small", batch=batch, n_local=10, device="cuda", autocast="bf16")
    print(f"  measuring {setup.label()} ({rounds} rounds; levers: {', '.join(n for n, _ in TRAINER_LEVERS)})...",
          flush=True)
    levers = [(n, o) for n, o in TRAINER_LEVERS if n != "trainer_packed_attention" or _xformers_ok()]
    return [step_suite.bench_setup(setup, rounds=rounds, warmup=warmup, optimizer_repeats=3, peaks=peaks,
                                   compiled_reference=True, trainer_variants=levers)]


# the Trainer's step with one lever on, each against the same step with it off (issue 19)
TRAINER_LEVERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("trainer_compile", ("model.compile=true",)),  # torch.compile of every block (inductor)
    ("trainer_cudagraphs", ("model.compile=true", "model.compile_mode=reduce-overhead")),  # + CUDA graphs
    ("trainer_packed_attention", ("model.fused_multicrop_attention=true",)),  # one xformers call, all crops
)


def _xformers_ok() -> bool:
    from dino_fast.models.attention import xformers_status

    ok, reason = xformers_status()
    if not ok:
        print(f"  trainer_packed_attention skipped: {reason}", flush=True)
    return ok


def run(quick: bool = False) -> dict[str, Any]:
    """Run every GPU part, print the tables, write bench/results/gpu.json; returns the payload.

    Raises:
        RuntimeError: when no CUDA device is present.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench gpu needs a CUDA device (torch.cuda.is_available() is False); the CPU "
                           "suites are `python -m bench all`")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("bench gpu times the compiled kernels: unset TRITON_INTERPRET")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    payload: dict[str, Any] = {"quick": quick}
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("copy", copy_bandwidth),
        ("loss", lambda: loss_rows(quick, payload["copy"]["GBps"])),
        ("ema", lambda: ema_rows(payload["copy"]["GBps"])),
        ("attention", lambda: attention_rows(quick)),
        ("augment", lambda: augment_rows(quick)),
        ("step", lambda: step_rows(quick)),
    ]
    errors: dict[str, str] = {}
    for name, fn in parts:
        t = time.perf_counter()
        print(f"--- gpu {name}", flush=True)
        try:
            payload[name] = fn()
        except Exception as e:  # report, keep the other parts
            import traceback

            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}"
            payload[name] = None
        print(f"    {time.perf_counter() - t:.1f} s", flush=True)
    payload["errors"] = errors
    payload["elapsed_s"] = time.perf_counter() - t0
    _report(payload)
    path = common.write_result("gpu", payload)
    print(f"\nwritten {path}")
    return payload


def _report(p: dict[str, Any]) -> None:
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if p.get("copy"):
        print(f"copy_ bandwidth: {p['copy']['GBps']:.0f} GB/s (read + write)")
    if p.get("loss"):
        print("\nDINO loss forward+backward, K=65536 (ms)")
        print(common.fmt_table(p["loss"], ["B", "crops", "dtype", "ref_ms", "triton_ms", "speedup",
                                           "floor_ms_at_copy_bw", "triton_x_floor_time", "ref_device_ms",
                                           "triton_device_ms", "triton_device_x_floor"]))
    if p.get("ema"):
        print("\nTeacher EMA update (ms)")
        print(common.fmt_table(p["ema"], ["model", "params", "tensors", "reference_ms", "foreach_lerp_ms",
                                          "ours_triton_ms", "speedup_vs_reference", "floor_ms_at_copy_bw",
                                          "ours_x_floor_time", "ours_device_ms", "foreach_lerp_device_ms"]))
    if p.get("attention"):
        print("\nAttention, 12 blocks of ViT-S/16, forward+backward")
        print(common.fmt_table(p["attention"], ["backend", "median_s", "time_vs_math", "peak_MiB", "peak_vs_math",
                                                "grad_rel_diff_vs_math"]))
    if p.get("augment"):
        print("\nMultiCropAugment on the GPU")
        print(common.fmt_table(p["augment"], ["batch", "crops", "ms_per_batch", "images_per_s", "us_per_image"]))
    if p.get("step"):
        from bench.step import _print_rows

        print("\nEnd-to-end step (bf16 autocast both sides)")
        _print_rows(p["step"])
        for r in p["step"]:
            print(f"host syncs in one Trainer step ({r['setup']}): {r.get('host_syncs_per_step_trainer')}")
    if p.get("errors"):
        print(f"\nparts that failed: {p['errors']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.gpu [--quick]``."""
    if not torch.cuda.is_available():
        print("bench gpu needs a CUDA device; none here (the CPU suites: python -m bench all)", file=sys.stderr)
        return 2
    return common.suite_main(argv, name="gpu", description=__doc__.split("\n")[0], run=run,
                             quick_help="smaller batches and fewer rounds")


if __name__ == "__main__":
    raise SystemExit(main())

"""What the trainer's reliability checks cost (``train.check_finite``, on by default).

``python -m bench.reliability [--quick]`` from the repository root. Per iteration the trainer
checks the student and teacher outputs for NaN/inf (before the loss) and the
student's flat parameter buffer (before the teacher EMA). Reported:

- the checks are ``dino_fast.loss.all_finite`` (one ``aminmax`` read per tensor); each figure is
  also given for the obvious ``isfinite(x).all()`` (5 eager kernels and temporaries of x's size);
- bytes the checks move, counted per aten op (inputs + outputs, ``bench.common.count_aten_bytes``),
  at the paper's shapes (B = 64 images per GPU, 2 + 10 crops, K = 65536, bf16 outputs; ViT-S/16 +
  DINO head parameters), against the fused loss's byte floor (read S, read T, write dS) and the
  EMA's floor (12 bytes per parameter); projected H100 time = bytes / 3.0 TB/s, *projected*;
- CPU time of the output check next to the CPU loss forward + backward, and of the weight check
  next to ``TeacherEMA.update`` (medians, ``torch.utils.benchmark``, side by side in one process);
- CPU time of one whole tiny training step with the checks on and off, interleaved.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from bench import common

K = 65536
NCROPS = 12


def _output_check(S: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """The trainer's output check (train_step): one bool per call, no host sync."""
    from dino_fast.utils.finite import all_finite

    return ~all_finite(S, T)


def _isfinite_all(*ts: torch.Tensor) -> torch.Tensor:
    """The obvious check, for comparison: ``isfinite(x).all()`` per tensor."""
    out = torch.isfinite(ts[0]).all()
    for t in ts[1:]:
        out = out & torch.isfinite(t).all()
    return out


def bytes_model(dtype: torch.dtype, batch: int) -> dict[str, Any]:
    """Counted bytes of the checks (ours: all_finite; the obvious isfinite().all()) vs the floors
    of the work they guard."""
    from bench.ema import build_model
    from dino_fast.utils.finite import all_finite

    S = torch.randn(NCROPS * batch, K, dtype=dtype)
    T = torch.randn(2 * batch, K, dtype=dtype)
    out = common.count_aten_bytes(lambda: _output_check(S, T))
    out_ref = common.count_aten_bytes(lambda: _isfinite_all(S, T))
    loss_floor = 2 * S.numel() * S.element_size() + T.numel() * T.element_size()
    student, source = build_model(384)
    flat = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
    w = common.count_aten_bytes(lambda: all_finite(flat))
    w_ref = common.count_aten_bytes(lambda: _isfinite_all(flat))
    ema_floor = 12 * flat.numel()
    return {
        "shape": f"S {tuple(S.shape)} T {tuple(T.shape)} {str(dtype).replace('torch.', '')}",
        "output_check_bytes": out["bytes"], "output_check_launches": out["launches"],
        "output_isfinite_all_bytes": out_ref["bytes"], "output_isfinite_all_launches": out_ref["launches"],
        "loss_floor_bytes": loss_floor, "output_check_vs_loss_floor": out["bytes"] / loss_floor,
        "params": flat.numel(), "model_source": source,
        "weight_check_bytes": w["bytes"], "weight_check_launches": w["launches"],
        "weight_isfinite_all_bytes": w_ref["bytes"],
        "ema_floor_bytes": ema_floor, "weight_check_vs_ema_floor": w["bytes"] / ema_floor,
        "projected_h100_output_check_us": common.projected_seconds(out["bytes"]) * 1e6,
        "projected_h100_output_isfinite_all_us": common.projected_seconds(out_ref["bytes"]) * 1e6,
        "projected_h100_weight_check_us": common.projected_seconds(w["bytes"]) * 1e6,
    }


def cpu_times(batch: int, repeats: int) -> dict[str, Any]:
    """CPU medians: output check vs loss fwd+bwd; weight check vs TeacherEMA.update; both checks
    also as the obvious isfinite().all()."""
    from bench.ema import _pair
    from dino_fast.losses.dino import DINOLoss
    from dino_fast.ops.ema.teacher import TeacherEMA
    from dino_fast.utils.finite import all_finite

    S = torch.randn(NCROPS * batch, K, requires_grad=True)
    T = torch.randn(2 * batch, K)
    loss = DINOLoss(K, NCROPS, 0.04, 0.04, 0, 10, backend="torch")

    def loss_step() -> None:
        loss(S, T, 0).backward()
        S.grad = None

    def med(fn: Any) -> float:
        return common.time_cpu(fn, repeats=repeats, warmup=1)["median_s"]

    Sd = S.detach()
    res: dict[str, Any] = {"batch": batch}
    res["loss_fwd_bwd_s"] = med(loss_step)
    res["output_check_s"] = med(lambda: bool(_output_check(Sd, T)))
    res["output_isfinite_all_s"] = med(lambda: bool(_isfinite_all(Sd, T)))
    teacher, student, _ = _pair(384)
    ema = TeacherEMA(teacher, student, backend="torch")
    flat = ema.student_buffer
    res["ema_update_s"] = med(lambda: ema.update(0.996))
    res["weight_check_s"] = med(lambda: bool(all_finite(flat)))
    res["weight_isfinite_all_s"] = med(lambda: bool(_isfinite_all(flat)))
    res["output_check_vs_loss"] = res["output_check_s"] / res["loss_fwd_bwd_s"]
    res["weight_check_vs_ema"] = res["weight_check_s"] / res["ema_update_s"]
    return res


def tiny_step_times(repeats: int) -> dict[str, Any]:
    """One tiny CPU training step (tests' tiny config, batch 8), checks on vs off, interleaved."""
    import statistics
    import time

    from dino_fast.train.loop import Trainer
    from tests._train_utils import make_image_folder, tiny_config

    tmp = Path(tempfile.mkdtemp(prefix="bench_reliability_"))
    root = make_image_folder(tmp / "imgs")
    trainers = {flag: Trainer(tiny_config(root, tmp / f"out_{flag}", "data.batch_size_per_gpu=8",
                                          f"train.check_finite={str(flag).lower()}"))
                for flag in (True, False)}
    g, l, _ = next(iter(trainers[True].loader))
    ids = trainers[True].loader.batch_indices()[0]
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats + 2):
        for flag, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_step(g, l, 1, 10, sample_ids=ids)
            if r >= 2:  # warm-up
                times[flag].append(time.perf_counter() - t0)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"step_checks_on_s": on, "step_checks_off_s": off, "ratio_on_off": on / off, "repeats": repeats}


def run(quick: bool) -> dict[str, Any]:
    """Measure, print the tables, write bench/results/reliability.json; returns the payload."""
    torch.manual_seed(0)
    bytes_rows = [bytes_model(torch.bfloat16, 64), bytes_model(torch.float32, 64)]
    cpu = cpu_times(batch=8 if quick else 32, repeats=3 if quick else 7)
    step = tiny_step_times(repeats=5 if quick else 15)
    print("Bytes moved by the checks per iteration (counted per aten op) vs the work they guard:")
    print(common.fmt_table(bytes_rows, ["shape", "output_check_bytes", "output_isfinite_all_bytes", "loss_floor_bytes",
                                        "output_check_vs_loss_floor", "projected_h100_output_check_us",
                                        "projected_h100_output_isfinite_all_us"]))
    print(common.fmt_table(bytes_rows[:1], ["params", "weight_check_bytes", "weight_isfinite_all_bytes",
                                            "ema_floor_bytes", "weight_check_vs_ema_floor",
                                            "projected_h100_weight_check_us"]))
    print("(projected = bytes / 3.0 TB/s, an H100's copy bandwidth; not measured on a GPU)")
    print(f"\nCPU medians ({torch.get_num_threads()} threads), B={cpu['batch']}, K={K}, {NCROPS} crops, fp32:")
    print(common.fmt_table([cpu], ["loss_fwd_bwd_s", "output_check_s", "output_isfinite_all_s",
                                   "output_check_vs_loss", "ema_update_s", "weight_check_s", "weight_isfinite_all_s",
                                   "weight_check_vs_ema"]))
    print("\nTiny CPU training step (tests' tiny config, batch 8), interleaved:")
    print(common.fmt_table([step], ["step_checks_on_s", "step_checks_off_s", "ratio_on_off", "repeats"]))
    payload = {"quick": quick, "bytes": bytes_rows, "cpu": cpu, "tiny_step": step}
    path = common.write_result("reliability", payload)
    print(f"\nwrote {path}")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.reliability [--quick]``; returns 0."""
    return common.suite_main(argv, name="reliability", description=__doc__.split("\n")[0], run=run,
                             quick_help="smaller CPU shapes, fewer repeats")


if __name__ == "__main__":
    raise SystemExit(main())

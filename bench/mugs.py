"""Mugs loss-step benchmark: dino-fast's three Mugs losses against the official formulation.

``python -m bench.mugs [--quick]`` from the repository root (also ``dino-fast bench mugs``).

One "loss step" = the instance and local-group queue InfoNCE losses, the group loss (centered,
sharpened soft cross-entropy with the Mugs pair weights), their gated total, the backward to the
student outputs, the center update and the enqueue of this step's teacher keys into both queues,
on random head outputs of the official shapes per rank (2 teacher + 2 + 10 student crops, unit
256-d instance / local-group rows, K prototypes, queues of Kq keys; B and K, Kq reduced to CPU
sizes). Formulations, timed call by call, interleaved, order rotated every round, on the same
inputs in one process:

- ``dino-fast``: :class:`~dino_fast.losses.infonce.QueueInfoNCE` x 2 (one negatives matmul and
  log-sum-exp per student crop, gradient in the forward) and :class:`~dino_fast.losses.DINOLoss`
  with ``crop_weights`` (the fused op's CPU path);
- ``reference eager``: the official pair loops of :mod:`dino_fast.reference.mugs` (one negatives
  matmul per pair, a log-softmax per pair) with the reference center update and ring enqueue;
- ``reference compiled``: the same loss function under ``torch.compile`` (default mode).

Reports median / min ms per step and dino-fast's speedup over each. The machine load before and
after is recorded; timings on a loaded machine are marked UNRELIABLE. No GPU rows (none here).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from bench import common
from dino_fast.losses.dino import DINOLoss
from dino_fast.losses.infonce import QueueInfoNCE
from dino_fast.losses.mugs import mugs_crop_weights, mugs_total
from dino_fast.reference.loss import update_center_reference
from dino_fast.reference.mugs import (
    group_loss_reference,
    infonce_queue_loss_reference,
    mugs_total_reference,
    ring_enqueue_reference,
)

TAU_S, TAU_T, TAU = 0.1, 0.04, 0.2
NCROPS, NT, D = 12, 2, 256


def _inputs(B: int, K: int) -> dict[str, torch.Tensor]:
    unit = lambda n: F.normalize(torch.randn(n, D), dim=-1)  # noqa: E731
    return {"s_inst": unit(NCROPS * B), "t_inst": unit(NT * B), "s_lg": unit(NCROPS * B), "t_lg": unit(NT * B),
            "s_grp": torch.randn(NCROPS * B, K), "t_grp": torch.randn(NT * B, K)}


def step_rows(quick: bool) -> list[dict[str, Any]]:
    """One row per formulation: median / min ms of a loss step and dino-fast's speedup."""
    B, K = (8, 8192) if quick else (16, 16384)
    Kq = K
    rounds, warmup = (4, 1) if quick else (8, 2)
    x = _inputs(B, K)
    w = mugs_crop_weights(NCROPS)
    inst, lg = (QueueInfoNCE(D, Kq, temperature=TAU, ncrops=NCROPS, crop_weights=w) for _ in range(2))
    grp = DINOLoss(K, NCROPS, TAU_T, TAU_T, 0, 1, student_temp=TAU_S, backend="torch", crop_weights=w)
    ref_state = {"q_inst": inst.queue.clone(), "q_lg": lg.queue.clone(), "p_inst": 0, "p_lg": 0,
                 "center": torch.zeros(1, K)}

    def ours(si: torch.Tensor, sl: torch.Tensor, sg: torch.Tensor) -> None:
        total = mugs_total([inst(si, x["t_inst"]), lg(sl, x["t_lg"]), grp(sg, x["t_grp"], 0)], [1, 1, 1])
        inst.enqueue(x["t_inst"])
        lg.enqueue(x["t_lg"])
        total.backward()

    def ref_loss(si, sl, sg, q_inst, q_lg, center):
        return mugs_total_reference([
            infonce_queue_loss_reference(si, x["t_inst"], q_inst, ncrops=NCROPS, temperature=TAU),
            infonce_queue_loss_reference(sl, x["t_lg"], q_lg, ncrops=NCROPS, temperature=TAU),
            group_loss_reference(sg, x["t_grp"], center, ncrops=NCROPS, student_temp=TAU_S, teacher_temp=TAU_T),
        ], [1, 1, 1])

    compiled = torch.compile(ref_loss)

    def reference(fn: Callable[..., torch.Tensor]) -> Callable[..., None]:
        def run(si: torch.Tensor, sl: torch.Tensor, sg: torch.Tensor) -> None:
            st = ref_state
            total = fn(si, sl, sg, st["q_inst"], st["q_lg"], st["center"])
            st["center"] = update_center_reference(st["center"], x["t_grp"], 0.9)
            st["q_inst"], st["p_inst"] = ring_enqueue_reference(st["q_inst"], st["p_inst"], x["t_inst"])
            st["q_lg"], st["p_lg"] = ring_enqueue_reference(st["q_lg"], st["p_lg"], x["t_lg"])
            total.backward()
        return run

    forms = {"dino-fast": ours, "reference eager": reference(ref_loss), "reference compiled": reference(compiled)}
    names = list(forms)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            args = [x[k].detach().clone().requires_grad_() for k in ("s_inst", "s_lg", "s_grp")]
            t0 = time.perf_counter()
            forms[n](*args)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt * 1e3)
    ours_med = statistics.median(times["dino-fast"])
    return [dict(B=B, K=K, Kq=Kq, crops="2+2+10", formulation=n, median_ms=statistics.median(times[n]),
                 min_ms=min(times[n]), dino_fast_speedup=statistics.median(times[n]) / ours_med, rounds=rounds)
            for n in names]


def run(quick: bool = False) -> dict[str, Any]:
    """Time the formulations, print the table, write bench/results/mugs.json; returns the payload."""
    load_before = os.getloadavg()
    payload: dict[str, Any] = {"quick": quick, "student_temp": TAU_S, "teacher_temp": TAU_T, "temperature": TAU}
    payload["step"] = step_rows(quick)
    payload["loadavg_before_1_5_15"] = list(load_before)
    payload["loadavg_1_5_15"] = list(os.getloadavg())
    loaded = max(load_before[0], payload["loadavg_1_5_15"][0]) > 1.5 * (os.cpu_count() or 1)
    payload["unreliable_load"] = loaded
    print(common.fmt_table(payload["step"], ["B", "K", "Kq", "crops", "formulation", "median_ms", "min_ms",
                                             "dino_fast_speedup"]))
    if loaded:
        print("UNRELIABLE timings: machine loaded by other processes "
              f"(load {load_before[0]:.1f} -> {payload['loadavg_1_5_15'][0]:.1f} on {os.cpu_count()} cores)")
    path = common.write_result("mugs", payload)
    print(f"\nwritten {path}")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.mugs [--quick]``: prints the table, writes bench/results/mugs.json."""
    return common.suite_main(argv, name="mugs", description=__doc__.split("\n")[0], run=run,
                             quick_help="smaller shapes, fewer rounds")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

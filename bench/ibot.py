"""iBOT patch loss and Sinkhorn-Knopp benchmark: dino-fast's fused ops vs DINOv2's eager
formulation and its ``torch.compile``.

``python -m bench.ibot [--quick]`` from the repository root.

Inputs: the masked tokens of one GPU's batch, as DINOv2 draws them (masks from
:func:`dino_fast.data.masking.global_crop_masks`: half of the 2B global crops masked, stratified
ratios in [0.1, 0.5], 16 x 16 patch grid), student and teacher patch logits of those rows,
K = 65536 and 131072, fp32.

Scale: DINOv2's per-GPU size is B = 64 (about 4.6k masked rows). At that size one (rows, K)
fp32 tensor is 1.2 GB (K = 65536) or 2.4 GB (K = 131072), and DINOv2's eager formulation holds
about four of them at once; the machine this was written on has 2 CPU cores shared with other
jobs and 23 GB of RAM, so the default run uses B = 16 per GPU (about 1.15k masked rows; every
formulation's work is linear in the rows, so the ratios carry over), and ``--full`` runs B = 64.

Reports (per-call medians, every formulation interleaved call by call in one process):
- iBOT loss forward+backward (with the center statistic: the teacher column sum / mean):
  dino-fast (``patch_ce_loss_with_colsum``, CPU path: the native kernel where it builds; its torch
  composition as a row beside it) vs DINOv2's ``forward_masked``
  composition (softmax of the centered teacher, log_softmax of the student, weighted sum; plus
  the teacher mean for the center) eager and under ``torch.compile``;
- Sinkhorn-Knopp targets (3 iterations, no gradient): dino-fast's log-domain CPU path vs
  DINOv2's ``sinkhorn_knopp_teacher`` eager and compiled;
- peak extra CPU memory of the iBOT forward+backward beyond inputs and gradient;
- bytes the Triton kernels move, counted under ``TRITON_INTERPRET=1`` at 64 rows and scaled to
  the rows (every term is linear in rows at a multiple of 32 rows), against the floor (read S,
  read T, write dS); projected H100 times (bytes / 3.0 TB/s) are labelled projected.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # count the kernels' traffic on CPU tensors

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common  # noqa: E402
from dino_fast.data.masking import global_crop_masks  # noqa: E402
from dino_fast.losses.ibot import masks_weight  # noqa: E402
from dino_fast.losses.sinkhorn import sinkhorn_knopp_log_targets  # noqa: E402
from dino_fast.ops.native import set_native_enabled  # noqa: E402
from dino_fast.ops.patch_ce.function import patch_ce_loss_with_colsum  # noqa: E402
from dino_fast.ops.soft_ce.eager import Workspace  # noqa: E402

TAU_S, TAU_T = 0.1, 0.04
COUNT_ROWS = 64


def _masks(B: int) -> torch.Tensor:
    return torch.from_numpy(global_crop_masks(seed=0, epoch=0, batch=0, sample_ids=np.arange(B), grid=(16, 16)))


def _inputs(B: int, K: int, dtype: torch.dtype = torch.float32):
    masks = _masks(B)
    R = int(masks.sum())
    g = torch.Generator().manual_seed(0)
    S = torch.randn(R, K, generator=g).to(dtype)
    T = (torch.randn(R, K, generator=g) + 0.3 * torch.randn(1, K, generator=g)).to(dtype)
    c = 0.1 * torch.randn(1, K, generator=g)
    return masks, S, T, c


def dinov2_ibot(s: torch.Tensor, T: torch.Tensor, c: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2's iBOT step as it composes it: softmax_center_teacher, forward_masked (the
    torch fallback of ``lossfunc``), and the teacher mean that its center update reduces."""
    t = F.softmax((T - c) / TAU_T, dim=-1)
    loss = torch.sum(t * F.log_softmax(s / TAU_S, dim=-1), dim=-1)
    w = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return -(loss * w).sum() / masks.shape[0], T.mean(0)


def dinov2_sinkhorn(T: torch.Tensor) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher`` (single process), 3 iterations."""
    Q = torch.exp(T.float() / TAU_T).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q = Q / torch.sum(Q)
    for _ in range(3):
        Q = Q / torch.sum(Q, dim=1, keepdim=True)
        Q = Q / K
        Q = Q / torch.sum(Q, dim=0, keepdim=True)
        Q = Q / B
    return (Q * B).t()


def _interleaved(forms: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list[float]]:
    names = list(forms)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            forms[n]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt * 1e3)
    return times


def ibot_rows(B: int, Ks: Sequence[int], rounds: int, warmup: int) -> list[dict[str, Any]]:
    """Per-call iBOT forward+backward ms for each formulation (see the module doc)."""
    rows = []
    for K in Ks:
        masks, S, T, c = _inputs(B, K)
        w = masks_weight(masks) / masks.shape[0]
        ws = Workspace()
        compiled = torch.compile(dinov2_ibot)

        def ours() -> None:
            s = S.detach().requires_grad_()
            loss, _ = patch_ce_loss_with_colsum(s, T, c, w, student_temp=TAU_S, teacher_temp=TAU_T, backend="torch",
                                                workspace=ws)
            loss.backward()

        def eager() -> None:
            s = S.detach().requires_grad_()
            dinov2_ibot(s, T, c, masks)[0].backward()

        def comp() -> None:
            s = S.detach().requires_grad_()
            compiled(s, T, c, masks)[0].backward()

        def composition() -> None:  # dino-fast's torch composition (the path before the native kernel)
            previous = set_native_enabled(False)
            try:
                ours()
            finally:
                set_native_enabled(previous)

        times = _interleaved({"dino-fast": ours, "dino-fast torch composition": composition, "DINOv2 eager": eager,
                              "DINOv2 compiled": comp}, rounds, warmup)
        med = statistics.median(times["dino-fast"])
        for n, ts in times.items():
            rows.append(dict(B=B, rows=S.shape[0], K=K, formulation=n, median_ms=statistics.median(ts),
                             min_ms=min(ts), dino_fast_speedup=statistics.median(ts) / med, rounds=rounds))
    return rows


def sinkhorn_rows(B: int, Ks: Sequence[int], rounds: int, warmup: int) -> list[dict[str, Any]]:
    """Per-call Sinkhorn-Knopp ms (teacher rows of the masked tokens)."""
    rows = []
    for K in Ks:
        _, _, T, _ = _inputs(B, K)
        compiled = torch.compile(dinov2_sinkhorn)
        forms = {"dino-fast": lambda: sinkhorn_knopp_log_targets(T, TAU_T), "DINOv2 eager": lambda: dinov2_sinkhorn(T),
                 "DINOv2 compiled": lambda: compiled(T)}
        times = _interleaved(forms, rounds, warmup)
        med = statistics.median(times["dino-fast"])
        for n, ts in times.items():
            rows.append(dict(B=B, rows=T.shape[0], K=K, formulation=n, median_ms=statistics.median(ts),
                             min_ms=min(ts), dino_fast_speedup=statistics.median(ts) / med, rounds=rounds))
    return rows


def memory_rows(B: int, Ks: Sequence[int]) -> list[dict[str, Any]]:
    """Peak extra memory of the iBOT forward+backward beyond inputs and the gradient."""
    rows = []
    for K in Ks:
        masks, S, T, c = _inputs(B, K)
        w = masks_weight(masks) / masks.shape[0]
        grad = S.numel() * S.element_size()

        def ours() -> None:
            s = S.detach().requires_grad_()
            patch_ce_loss_with_colsum(s, T, c, w, student_temp=TAU_S, teacher_temp=TAU_T, backend="torch")[0].backward()

        def eager() -> None:
            s = S.detach().requires_grad_()
            dinov2_ibot(s, T, c, masks)[0].backward()

        o, e = common.peak_cpu_memory(ours) - grad, common.peak_cpu_memory(eager) - grad
        rows.append(dict(B=B, rows=S.shape[0], K=K, dinov2_eager_MiB=e / 2**20, dino_fast_MiB=o / 2**20,
                         ratio=o / e, rows_x_K_fp32_MiB=S.numel() * 4 / 2**20))
    return rows


def bytes_rows(B: int, Ks: Sequence[int]) -> list[dict[str, Any]]:
    """Triton traffic counted under the interpreter at COUNT_ROWS rows, scaled to the batch's rows."""
    from dino_fast.ops.patch_ce.kernels import patch_ce_backward_triton, patch_ce_forward_triton

    R = int(_masks(B).sum())
    rows = []
    for K in Ks:
        g = torch.Generator().manual_seed(1)
        S, T = torch.randn(COUNT_ROWS, K, generator=g), torch.randn(COUNT_ROWS, K, generator=g)
        c, w = torch.zeros(K), torch.rand(COUNT_ROWS, generator=g)
        res: dict[str, Any] = {}
        f = common.count_triton_traffic(lambda: res.setdefault("f", patch_ce_forward_triton(
            S, T, c, w, student_temp=TAU_S, teacher_temp=TAU_T)))
        _, lse, tm, tz, _ = res["f"]
        b = common.count_triton_traffic(lambda: patch_ce_backward_triton(
            torch.tensor(1.0), S, T, c, w, lse, tm, tz, student_temp=TAU_S, teacher_temp=TAU_T))
        total = (f["bytes"] + b["bytes"]) * R / COUNT_ROWS
        floor = 3 * R * K * 4
        rows.append(dict(B=B, rows=R, K=K, triton_MB=total / 1e6, floor_MB=floor / 1e6, triton_x_floor=total / floor,
                         projected_h100_triton_ms=common.projected_seconds(total) * 1e3,
                         projected_h100_floor_ms=common.projected_seconds(floor) * 1e3))
    return rows


def run(quick: bool = False, full: bool = False) -> dict[str, Any]:
    """Run every part, print the tables, write bench/results/ibot.json; returns the payload."""
    B = 64 if full else (8 if quick else 16)
    Ks = (65536,) if quick else (65536, 131072)
    rounds, warmup = (5, 2) if quick else (9, 2)
    load_before = os.getloadavg()
    payload: dict[str, Any] = {"quick": quick, "full": full, "B_per_gpu": B, "grid": [16, 16], "Ks": list(Ks),
                               "student_temp": TAU_S, "teacher_temp": TAU_T, "threads": torch.get_num_threads()}
    payload["ibot"] = ibot_rows(B, Ks, rounds, warmup)
    payload["sinkhorn"] = sinkhorn_rows(B, Ks, rounds, warmup)
    payload["memory"] = memory_rows(B, Ks)
    payload["bytes"] = bytes_rows(B, Ks)
    payload["loadavg_before_1_5_15"] = list(load_before)
    payload["loadavg_1_5_15"] = list(os.getloadavg())
    bars = {}
    for part in ("ibot", "sinkhorn"):
        for K in Ks:
            mine = [r for r in payload[part] if r["K"] == K]
            for peer in ("DINOv2 eager", "DINOv2 compiled"):
                v = next(r for r in mine if r["formulation"] == peer)["dino_fast_speedup"]
                bars[f"{part}_vs_{peer.split()[1]}_K{K}"] = {"value": v, "bar": 1.0, "met": v > 1.0}
    payload["bars"] = bars
    cols = ["B", "rows", "K", "formulation", "median_ms", "min_ms", "dino_fast_speedup"]
    print(f"iBOT loss forward+backward, fp32, {torch.get_num_threads()} threads (speedup = peer median / dino-fast median)")
    print(common.fmt_table(payload["ibot"], cols))
    print("\nSinkhorn-Knopp targets, 3 iterations, fp32")
    print(common.fmt_table(payload["sinkhorn"], cols))
    print("\nPeak extra CPU memory of the iBOT forward+backward beyond inputs and gradient")
    print(common.fmt_table(payload["memory"], ["B", "rows", "K", "dinov2_eager_MiB", "dino_fast_MiB", "ratio",
                                               "rows_x_K_fp32_MiB"]))
    print(f"\nTriton bytes per forward+backward (counted under the interpreter at {COUNT_ROWS} rows, scaled; "
          "H100 times PROJECTED = bytes / 3.0 TB/s)")
    print(common.fmt_table(payload["bytes"], ["B", "rows", "K", "triton_MB", "floor_MB", "triton_x_floor",
                                              "projected_h100_triton_ms", "projected_h100_floor_ms"]))
    print("\nBars (dino-fast faster than the peer: value > 1)")
    for name, b in bars.items():
        print(f"  {name}: {b['value']:.3g} {'MET' if b['met'] else 'NOT MET'}")
    lb, la = payload["loadavg_before_1_5_15"], payload["loadavg_1_5_15"]
    loaded = max(lb[0], la[0]) > 1.5 * (os.cpu_count() or 1)
    payload["unreliable"] = loaded
    print(f"load average before / after (1 min): {lb[0]:.2f} / {la[0]:.2f} on {os.cpu_count()} CPUs"
          f"{'  (UNRELIABLE timings: machine loaded by other processes)' if loaded else ''}")
    path = common.write_result("ibot", payload)
    print(f"\nwritten {path}")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.ibot [--quick | --full]``: prints the tables, writes bench/results/ibot.json."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.ibot", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="B=8, K=65536 only, fewer rounds")
    p.add_argument("--full", action="store_true", help="DINOv2's B=64 per GPU (about 4.6k rows; needs ~12 GB)")
    a = p.parse_args(list(argv) if argv is not None else None)
    run(quick=a.quick, full=a.full)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

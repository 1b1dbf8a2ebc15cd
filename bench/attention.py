"""Attention backends in a ViT-S/16 block stack, forward + backward on DINO multi-crop input.

``python -m bench.attention [--quick]`` from the repository root.

Workload: B images, each with 2 global crops (224 px, 197 tokens) and 8 local crops (96 px,
37 tokens), i.e. the student side of a DINO step. The tokens of each resolution go through a
stack of ViT-S/16 blocks (dim 384, 6 heads, MLP 1536; ``dino_fast.models.vit_small`` blocks),
one pass per resolution as ``MultiCropWrapper`` does, then a backward pass from a random
projection of all output tokens. Only the attention backend changes between rows.

CPU rows (side by side in one process, interleaved rounds, medians over repeats with
``torch.utils.benchmark`` via ``bench.common.time_cpu``):

- ``math``: the official explicit softmax (``q k^T`` materialised, ``[B, H, N, N]`` kept for backward);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (fused flash kernel on CPU).

Peak memory is the peak of extra bytes torch allocates during one forward + backward
(``bench.common.peak_cpu_memory``; the input tokens and parameters exist before the call).

On CUDA, the same stack is also timed (``triton.testing.do_bench``) with ``xformers`` (one call per
resolution) and ``xformers-packed`` (all crops of both resolutions in one call per block through a
``BlockDiagonalMask``), with ``torch.cuda.max_memory_allocated`` for the peak.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Optional, Sequence

import torch

from bench import common
from dino_fast.models import vit_small, xformers_status

GLOBAL_PX, LOCAL_PX, N_GLOBAL, N_LOCAL = 224, 96, 2, 8


def _workload(depth: int, batch: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Blocks, per-resolution input tokens and output weights for the stack."""
    g = torch.Generator().manual_seed(seed)
    model = vit_small(16, depth=depth, attn_backend="sdpa").to(device)
    D = model.embed_dim
    n_g = 1 + (GLOBAL_PX // 16) ** 2
    n_l = 1 + (LOCAL_PX // 16) ** 2
    tokens = [torch.randn(N_GLOBAL * batch, n_g, D, generator=g).to(device),
              torch.randn(N_LOCAL * batch, n_l, D, generator=g).to(device)]
    weights = [torch.randn(t.shape, generator=g).to(device) for t in tokens]
    return {"model": model, "tokens": tokens, "weights": weights}


def _step_fn(work: dict[str, Any], backend: str, autocast: Optional[torch.dtype] = None) -> Callable[[], None]:
    """One forward + backward of the block stack with ``backend`` (parameter grads set to None),
    under ``torch.autocast(dtype=autocast)`` when given (the trainer's bf16 precision)."""
    model, tokens, weights = work["model"], work["tokens"], work["weights"]
    blocks = model.blocks
    device = tokens[0].device.type

    def step() -> None:
        if autocast is None:
            body()
        else:
            with torch.autocast(device, dtype=autocast):
                body()

    def body() -> None:
        for p in model.parameters():
            p.grad = None
        loss = 0.0
        if backend == "xformers-packed":
            x = torch.cat([t.reshape(1, -1, t.shape[-1]) for t in tokens], dim=1)  # [1, T, D]
            seqlens = [t.shape[1] for t in tokens for _ in range(t.shape[0])]
            for blk in blocks:
                x = blk.forward_packed(x, seqlens, "xformers")
            w = torch.cat([w.reshape(1, -1, w.shape[-1]) for w in weights], dim=1)
            loss = (x * w).sum()
        else:
            for t, w in zip(tokens, weights):
                x = t
                for blk in blocks:
                    x = blk(x, backend)
                loss = loss + (x * w).sum()
        loss.backward()

    return step


def _check_agreement(work: dict[str, Any], backends: Sequence[str], autocast: Optional[torch.dtype] = None) -> float:
    """Max abs difference of the parameter gradients of each backend against the first one,
    relative to the largest gradient (a guard that every timed row computes the same thing)."""
    grads = []
    for b in backends:
        _step_fn(work, b, autocast)()
        grads.append(torch.cat([p.grad.flatten() for p in work["model"].blocks.parameters()]))
    scale = float(grads[0].abs().max())
    return max(float((g - grads[0]).abs().max()) for g in grads) / scale


def _cpu_rows(depth: int, batch: int, rounds: int, repeats: int,
              autocast: Optional[torch.dtype] = None) -> list[dict[str, Any]]:
    work = _workload(depth, batch, "cpu")
    backends = ["math", "sdpa"]
    fns = {b: _step_fn(work, b, autocast) for b in backends}
    for fn in fns.values():  # warm-up
        fn()
    medians: dict[str, list[float]] = {b: [] for b in backends}
    mins: dict[str, float] = {b: float("inf") for b in backends}
    for _ in range(rounds):  # interleaved, so that load from other processes hits both rows alike
        for b in backends:
            t = common.time_cpu(fns[b], repeats=repeats, warmup=0)
            medians[b].append(t["median_s"])
            mins[b] = min(mins[b], t["min_s"])
    peaks = {b: common.peak_cpu_memory(fns[b]) for b in backends}
    max_diff = _check_agreement(work, backends, autocast)
    rows = []
    for b in backends:
        med = statistics.median(medians[b])
        rows.append({
            "device": "cpu", "backend": b, "dtype": "fp32" if autocast is None else f"{autocast} autocast".replace("torch.", ""),
            "median_s": med, "min_s": mins[b],
            "time_vs_math": med / statistics.median(medians["math"]),
            "peak_MiB": peaks[b] / 2**20, "peak_vs_math": peaks[b] / peaks["math"],
            "grad_rel_diff_vs_math": max_diff if b != "math" else 0.0,
        })
    return rows


def _core_rows(batch: int, rounds: int, repeats: int) -> list[dict[str, Any]]:
    """The attention op alone (no projections, norms or MLP), forward + backward, for the same
    crops: ``q, k, v [crops * B, 6, N, 64]`` per resolution. Shows the attention's own cost, which
    the block stack dilutes with its matmuls."""
    import torch.nn.functional as F

    from dino_fast.models.attention import math_attention

    g = torch.Generator().manual_seed(1)
    shapes = [(N_GLOBAL * batch, 6, 197, 64), (N_LOCAL * batch, 6, 37, 64)]
    qkv = [[torch.randn(s, generator=g).requires_grad_(True) for _ in range(3)] for s in shapes]
    outw = [torch.randn(s, generator=g) for s in shapes]

    def make(backend: str) -> Callable[[], None]:
        def step() -> None:
            loss = 0.0
            for (q, k, v), w in zip(qkv, outw):
                q.grad = k.grad = v.grad = None
                if backend == "sdpa":
                    o = F.scaled_dot_product_attention(q, k, v)
                else:
                    o, _ = math_attention(q, k, v, 64**-0.5)
                loss = loss + (o * w).sum()
            loss.backward()
        return step

    backends = ["math", "sdpa"]
    fns = {b: make(b) for b in backends}
    for fn in fns.values():
        fn()
    medians: dict[str, list[float]] = {b: [] for b in backends}
    mins = {b: float("inf") for b in backends}
    for _ in range(rounds):
        for b in backends:
            t = common.time_cpu(fns[b], repeats=repeats, warmup=0)
            medians[b].append(t["median_s"])
            mins[b] = min(mins[b], t["min_s"])
    peaks = {b: common.peak_cpu_memory(fns[b]) for b in backends}
    rows = []
    for b in backends:
        med = statistics.median(medians[b])
        rows.append({"device": "cpu", "backend": b + " (attention op only)", "dtype": "fp32", "median_s": med, "min_s": mins[b],
                     "time_vs_math": med / statistics.median(medians["math"]), "peak_MiB": peaks[b] / 2**20,
                     "peak_vs_math": peaks[b] / peaks["math"]})
    return rows


def _cuda_rows(depth: int, batch: int) -> list[dict[str, Any]]:  # pragma: no cover - needs a GPU
    from triton.testing import do_bench

    work = _workload(depth, batch, "cuda")
    backends = ["math", "sdpa"]
    ok, reason = xformers_status("cuda")
    if ok:
        backends += ["xformers", "xformers-packed"]
    else:
        print(f"xformers rows skipped: {reason}")
    max_diff = _check_agreement(work, backends)
    rows, ref_ms, ref_peak = [], None, None
    for b in backends:
        fn = _step_fn(work, b)
        ms = do_bench(fn, warmup=25, rep=200)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ref_ms = ref_ms or ms
        ref_peak = ref_peak or peak
        rows.append({"device": "cuda", "backend": b, "median_s": ms / 1e3, "min_s": float("nan"),
                     "time_vs_math": ms / ref_ms, "peak_MiB": peak / 2**20, "peak_vs_math": peak / ref_peak,
                     "grad_rel_diff_vs_math": max_diff if b != "math" else 0.0})
    return rows


def run(quick: bool, threads: int | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write bench/results/attention.json; return the payload.

    ``threads``: CPU threads for torch during the run (default: torch's current setting). On a
    small machine shared with other jobs, 1 thread gives far steadier figures than oversubscribed
    OpenMP threads.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    depth, batch, rounds, repeats = (2, 2, 2, 2) if quick else (4, 4, 3, 2)
    config = {"model": "ViT-S/16 blocks (dim 384, 6 heads)", "depth": depth, "images": batch,
              "crops": f"{N_GLOBAL} x {GLOBAL_PX}px + {N_LOCAL} x {LOCAL_PX}px per image",
              "tokens_per_pass": [N_GLOBAL * batch * 197, N_LOCAL * batch * 37],
              "rounds": rounds, "repeats_per_round": repeats, "threads": torch.get_num_threads(),
              "dtype": "float32 and bfloat16 autocast (rows' dtype)", "measures": "forward + backward of the block stack"}
    rows = _cpu_rows(depth, batch, rounds, repeats)
    # the trainer's CPU precision where the CPU has bf16 units (train.precision=auto): the choice
    # of attn_backend=auto for half precision on CPU rests on these rows
    rows += _cpu_rows(depth, batch, rounds, repeats, autocast=torch.bfloat16)
    rows += _core_rows(batch, rounds, repeats)
    if torch.cuda.is_available():  # pragma: no cover - needs a GPU
        config_cuda = dict(config, depth=12, images=32)
        rows += _cuda_rows(config_cuda["depth"], config_cuda["images"])
        config["cuda"] = config_cuda
    cols = ["device", "backend", "dtype", "median_s", "min_s", "time_vs_math", "peak_MiB", "peak_vs_math",
            "grad_rel_diff_vs_math"]
    print(f"attention backends, {config['model']}, depth {depth}, {batch} images x "
          f"({config['crops']}), fp32 and bf16-autocast forward+backward, {config['threads']} threads")
    print(common.fmt_table(rows, cols))
    payload = {"config": config, "rows": rows}
    path = common.write_result("attention", payload)
    print(f"written to {path}")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.attention [--quick]``."""
    return common.suite_main(argv, name="attention", description=__doc__.split("\n")[0], run=run,
                             quick_help="2 blocks, 2 images, fewer repeats", threads=True)


if __name__ == "__main__":
    raise SystemExit(main())

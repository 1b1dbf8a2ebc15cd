"""Multi-crop loader throughput: reference vs fallback vs FFCV decode-once, and the decode floor.

``python -m bench.loader [--quick]`` (or ``dino-fast bench loader``).

A folder of a few hundred JPEGs of 400-500 px (built-in renderer, random sizes) is generated
in a temporary directory; then, side by side in one process, with the same worker count
(the cores available), batch 32, 2 x 224 + 8 x 96 crops:

- ``reference``: the official pipeline - DataLoader workers run the per-crop PIL augmentation
  (:mod:`dino_fast.reference.augment`), float tensors out;
- ``folder``: the fallback loader (PIL decode once, shared crop sampler, uint8 crops);
- ``folder+aug``: the same plus :class:`MultiCropAugment` on the batch in the main process
  (on a GPU machine this runs on the GPU; here on the CPU, one torch thread, beside the workers);
- ``ffcv``, ``ffcv+aug``: the FFCV decode-once loader (numba threads), without / with the
  batched augmentation;
- ``ffcv-per-view``: FFCV's own multi-crop recipe, one ``RandomResizedCropRGBImageDecoder``
  pipeline per view (each view decodes the JPEG again), uint8 crops;
- ``floor-pil`` / ``floor-ffcv``: decode + one resize to 224 x 224 and nothing else (PIL in
  DataLoader workers / FFCV's RandomResizedCrop decoder, one view);
- ``augment-only``: :class:`MultiCropAugment` alone on uint8 batches (one torch thread), as
  images/s, to show what the ``+aug`` rows spend on the CPU.

Every configuration runs a warm-up pass (FFCV's numba compilation, the page cache), then
``repeats`` timed epochs in interleaved rounds; images/s is images per epoch / median epoch time.
The bar: ``ffcv+aug`` >= 3x ``reference`` images/s.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from bench.common import fmt_table, suite_main, time_cpu, write_result
from dino_fast.data import MultiCropAugment, MultiCropConfig, build_multicrop_loader, ffcv_available
from dino_fast.data.builtin import render_image
from dino_fast.data.folder import available_cores, load_rgb, scan_image_folder

BATCH = 32
GLOBAL, LOCAL, N_LOCAL = 224, 96, 8


def make_jpeg_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs (quality 90) of random size in [400, 500]^2 under ``root/<class>/``, 10 classes."""
    rs = np.random.default_rng(seed)
    for i in range(n):
        k = i % 10
        h, w = (int(v) for v in rs.integers(400, 501, size=2))
        img = render_image(k, np.random.default_rng([seed, i]), image_size=max(h, w))
        img = img.crop((0, 0, w, h))
        d = root / f"class{k}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:05d}.jpg", quality=90)
    return root


class _DecodeResize(torch.utils.data.Dataset):
    """Floor: decode and one resize to 224 x 224 (uint8 [3, 224, 224])."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = load_rgb(self.paths[i]).resize((GLOBAL, GLOBAL), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _consume(batches: Iterable[Any], per_batch: Optional[Callable[[Any], Any]] = None) -> int:
    n = 0
    for b in batches:
        if per_batch is not None:
            per_batch(b)
        first = b[0] if isinstance(b, (tuple, list)) else b
        if isinstance(first, (list, tuple)):
            first = first[0]
        n += int(first.shape[0])
    return n


def _ffcv_extra(beton: Path, workers: int) -> dict[str, Callable[[], int]]:
    """The FFCV-only configurations that use FFCV's own decoders."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec

    threads = torch.get_num_threads()
    floor = Loader(
        str(beton), batch_size=BATCH, num_workers=workers, order=OrderOption.RANDOM, drop_last=True,
        pipelines={"image": [RandomResizedCropRGBImageDecoder((GLOBAL, GLOBAL), scale=(1.0, 1.0), ratio=(1.0, 1.0))],
                   "label": [IntDecoder()]},
    )  # fmt: skip
    pipes: dict[str, Any] = {
        "image": [RandomResizedCropRGBImageDecoder((GLOBAL, GLOBAL), scale=(0.4, 1.0))],
        "label": [IntDecoder()],
    }
    pipes["image_g1"] = PipelineSpec("image", decoder=RandomResizedCropRGBImageDecoder((GLOBAL, GLOBAL), scale=(0.4, 1.0)))
    for i in range(N_LOCAL):
        pipes[f"image_l{i}"] = PipelineSpec("image", decoder=RandomResizedCropRGBImageDecoder((LOCAL, LOCAL), scale=(0.05, 0.4)))
    per_view = Loader(
        str(beton), batch_size=BATCH, num_workers=workers, order=OrderOption.RANDOM, drop_last=True, pipelines=pipes
    )
    torch.set_num_threads(threads)
    return {"ffcv-per-view": lambda: _consume(per_view), "floor-ffcv": lambda: _consume(floor)}


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; prints a table and writes bench/results/loader.json."""
    n_images = 64 if quick else 320
    repeats = 1 if quick else 2
    workers = available_cores()
    torch_threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="dino_fast_bench_loader_"))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        folder = make_jpeg_folder(tmp / "images", n_images)
        paths = [r.path for r in scan_image_folder(folder).records]
        mean_bytes = float(np.mean([os.path.getsize(p) for p in paths]))
        aug = MultiCropAugment(local_crops_number=N_LOCAL)

        def augment(batch: Sequence[torch.Tensor]) -> None:
            aug(batch[0], batch[1])

        common = dict(batch_size=BATCH, num_workers=workers, global_crops_size=GLOBAL, local_crops_size=LOCAL,
                      local_crops_number=N_LOCAL, drop_last=True)  # fmt: skip
        folder_loader = build_multicrop_loader(MultiCropConfig(root=str(folder), backend="folder", **common))
        from dino_fast.reference.augment import build_reference_loader

        ref_loader = build_reference_loader(folder, batch_size=BATCH, num_workers=workers)
        floor_loader = torch.utils.data.DataLoader(_DecodeResize(paths), batch_size=BATCH, num_workers=workers, drop_last=True)
        configs: dict[str, Callable[[], int]] = {
            "reference": lambda: _consume(ref_loader),
            "folder": lambda: _consume(folder_loader),
            "folder+aug": lambda: _consume(folder_loader, augment),
            "floor-pil": lambda: _consume(floor_loader),
        }
        have_ffcv, why = ffcv_available()
        if have_ffcv:
            from dino_fast.data.ffcv_writer import write_beton

            beton = tmp / "images.beton"
            write_beton(folder, beton, max_resolution=512, jpeg_quality=90, num_workers=workers, progress=False)
            ffcv_loader = build_multicrop_loader(MultiCropConfig(root=str(beton), backend="ffcv", **common))
            configs["ffcv"] = lambda: _consume(ffcv_loader)
            configs["ffcv+aug"] = lambda: _consume(ffcv_loader, augment)
            try:
                configs.update(_ffcv_extra(beton, workers))
            except Exception as e:  # FFCV's own decoders are a comparison, not a requirement
                notes.append(f"FFCV per-view / floor-ffcv not measured: {type(e).__name__}: {e}")
        else:
            notes.append(f"FFCV rows not measured: {why}")

        # the batched augmentation runs in the main process with one torch thread, next to the
        # loader's workers (2 torch threads beside 2 busy workers oversubscribe 2 cores)
        torch.set_num_threads(1)
        times: dict[str, list[float]] = {k: [] for k in configs}
        counts: dict[str, int] = {}
        for name, fn in configs.items():  # warm-up: compilation, page cache, worker start-up
            counts[name] = fn()
        for _ in range(repeats):
            for name, fn in configs.items():
                t0 = time.perf_counter()
                counts[name] = fn()
                times[name].append(time.perf_counter() - t0)
        # the batched augmentation alone, on one uint8 batch (what the +aug rows add)
        g8 = torch.randint(0, 256, (BATCH, 2, 3, GLOBAL, GLOBAL), dtype=torch.uint8)
        l8 = torch.randint(0, 256, (BATCH, N_LOCAL, 3, LOCAL, LOCAL), dtype=torch.uint8)
        t_aug = time_cpu(lambda: aug(g8, l8), repeats=2 if quick else 5, warmup=1)
        times["augment-only"] = [t_aug["median_s"] * counts["folder"] / BATCH]
        counts["augment-only"] = counts["folder"]
        ref_ips = counts["reference"] / statistics.median(times["reference"])
        for name in times:
            med = statistics.median(times[name])
            ips = counts[name] / med
            rows.append(
                {
                    "loader": name,
                    "images": counts[name],
                    "median_epoch_s": med,
                    "images_per_s": ips,
                    "vs_reference": ips / ref_ips,
                }
            )
    finally:
        torch.set_num_threads(torch_threads)
        shutil.rmtree(tmp, ignore_errors=True)

    by = {r["loader"]: r for r in rows}
    bar = None
    if "ffcv+aug" in by:
        bar = {"metric": "ffcv+aug images/s / reference images/s", "target": 3.0, "value": by["ffcv+aug"]["vs_reference"]}
        bar["met"] = bar["value"] >= 3.0
    print(
        f"multi-crop loader throughput, 2 x {GLOBAL} + {N_LOCAL} x {LOCAL}, batch {BATCH}, {workers} workers, "
        f"{n_images} JPEGs of 400-500 px (mean {mean_bytes / 1024:.0f} KiB), {repeats} timed epoch(s) each"
    )
    print(fmt_table(rows, ["loader", "images", "median_epoch_s", "images_per_s", "vs_reference"]))
    if bar is not None:
        print(f"bar: ffcv+aug >= 3x reference images/s: {bar['value']:.2f}x -> {'met' if bar['met'] else 'NOT met'}")
    for n in notes:
        print("note:", n)
    payload = {
        "config": {"images": n_images, "batch_size": BATCH, "workers": workers, "repeats": repeats, "quick": quick,
                   "global": GLOBAL, "local": LOCAL, "n_local": N_LOCAL, "mean_jpeg_bytes": mean_bytes},
        "rows": rows,
        "bar": bar,
        "notes": notes,
    }  # fmt: skip
    path = write_result("loader", payload)
    print(f"wrote {path}")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.loader [--quick]``."""
    return suite_main(argv, name="loader", description=__doc__.split("\n")[0], run=run,
                             quick_help="64 images, one timed epoch")


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))

"""FFCV backend of the multi-crop loader: a decode-once multi-crop decoder.

FFCV's own recipe for multi-crop is one pipeline per view, each with a
``RandomResizedCropRGBImageDecoder``: every view decodes the JPEG again (10 decodes per image for
2 + 8 crops). :class:`MultiCropDecoder` decodes each JPEG once (libjpeg-turbo, through FFCV's
``imdecode``), then cuts every crop from the decoded image with the shared crop sampler
(:func:`dino_fast.data.crops.crop_box`, compiled by numba into the decode loop) and resizes it
(OpenCV ``INTER_AREA``, through FFCV's ``resize_crop``), writing CHW uint8 directly into the
batch buffer. The decode loop is numba ``prange`` over the samples of a batch, with FFCV's worker
threads.

Per-sample output of the decoder: one flat uint8 row holding the global crops ``[G, 3, Gs, Gs]``,
then the local crops ``[L, 3, Ls, Ls]``, then the boxes ``[G+L, 4]`` as little-endian uint16.

The epoch (an input of the crop sampler) changes at run time while numba freezes the decoder's
closure, so the decoder reads it from a small array it owns, by address, with FFCV's ``memcpy``
at the start of every batch; the loader never changes it while an epoch is being decoded.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

from .base import Batch, LoaderBackend, MultiCropConfig
from .crops import CropSpec, crop_box
from .folder import available_cores

__all__ = ["MultiCropDecoder", "FFCVBackend"]


# numba (0.68) raises a KeyError from the finaliser of these dispatchers when they are garbage
# collected; they are small, so they are kept for the life of the process (one pair per decoder).
_KEEP_ALIVE: list[tuple[Callable, Callable]] = []


class MultiCropDecoder(SimpleRGBImageDecoder):
    """FFCV decoder for an ``RGBImageField``: decode once, cut ``G + L`` crops (see module doc).

    (A subclass of FFCV's ``SimpleRGBImageDecoder`` only so that FFCV accepts it as the image
    field's decoder; it shares none of its behaviour.)

    Args:
        spec: the crop geometry.
        seed: seed of the crop sampler.
    """

    def __init__(self, spec: CropSpec, seed: int) -> None:
        super().__init__()
        self.spec = spec
        self.seed = int(seed)
        # [epoch]: read by the compiled decoder through its address (see module doc)
        self._epoch = np.zeros(1, dtype=np.int64)
        g, s = spec.global_number, spec.global_size
        l, t = spec.local_number, spec.local_size
        self.global_bytes = g * 3 * s * s
        self.local_bytes = l * 3 * t * t
        self.box_offset = self.global_bytes + self.local_bytes
        self.row_bytes = self.box_offset + spec.n_crops * 4 * 2

    def set_epoch(self, epoch: int) -> None:
        """Epoch seen by the crop sampler from the next decoded batch on."""
        self._epoch[0] = int(epoch)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        """Output: uint8 [row_bytes] per sample; scratch: one decoded image and one HWC crop."""
        widths = self.metadata["width"]
        heights = self.metadata["height"]
        max_pixels = np.uint64(int(widths.max()) * int(heights.max()))
        side = max(self.spec.global_size, self.spec.local_size)
        out_shape = (self.row_bytes,)
        u8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
            (
                AllocationQuery(out_shape, u8),
                AllocationQuery((max_pixels * np.uint64(3),), u8),
                AllocationQuery((side * side * 3,), u8),
            ),
        )

    def generate_code(self) -> Callable:
        """The numba decode loop (compiled by FFCV with ``parallel=True``)."""
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        _KEEP_ALIVE.append((imdecode_c, resize_crop_c))
        memcpy_raw = ctypes_memcopy
        epoch_addr = self._epoch.ctypes.data
        spec = self.spec
        n_crops = spec.n_crops
        table = spec.table()
        sizes = np.asarray([spec.size_of(c) for c in range(n_crops)], dtype=np.int64)
        offsets = np.zeros(n_crops, dtype=np.int64)
        for c in range(1, n_crops):
            offsets[c] = offsets[c - 1] + 3 * sizes[c - 1] * sizes[c - 1]
        box_offset = self.box_offset
        seed = self.seed

        def decode(batch_indices, my_storage, metadata, storage_state):  # pragma: no cover - numba
            destination, temp_storage, crop_storage = my_storage
            ep = np.zeros(1, dtype=np.int64)
            memcpy_raw(epoch_addr, ep.ctypes.data, 8)
            epoch = ep[0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    n_bytes = 3 * height * width
                    image = temp_buffer.reshape(-1)[:n_bytes].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                out = destination[dst_ix]
                scratch = crop_storage[dst_ix]
                for c in range(n_crops):
                    top, left, h, w = crop_box(
                        np.int64(height), np.int64(width), table[c, 0], table[c, 1], table[c, 2], table[c, 3],
                        seed, epoch, np.int64(source_ix), c,
                    )
                    s = sizes[c]
                    tmp = scratch[: s * s * 3].reshape(s, s, 3)
                    resize_crop_c(image, top, top + h, left, left + w, tmp)
                    off = offsets[c]
                    for ch in range(3):
                        for y in range(s):
                            row = off + (ch * s + y) * s
                            for x in range(s):
                                out[row + x] = tmp[y, x, ch]
                    b = box_offset + c * 8
                    out[b + 0] = top & 0xFF
                    out[b + 1] = top >> 8
                    out[b + 2] = left & 0xFF
                    out[b + 3] = left >> 8
                    out[b + 4] = h & 0xFF
                    out[b + 5] = h >> 8
                    out[b + 6] = w & 0xFF
                    out[b + 7] = w >> 8
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class FFCVBackend(LoaderBackend):
    """Multi-crop loading from a .beton file written by :func:`dino_fast.data.ffcv_writer.write_beton`."""

    name = "ffcv"

    def __init__(self, cfg: MultiCropConfig) -> None:
        self.spec = cfg.crop_spec()
        self.batch_size = cfg.batch_size
        self.num_workers = max(1, min(cfg.num_workers, available_cores()))
        self.decoder = MultiCropDecoder(self.spec, cfg.seed)
        torch_threads = torch.get_num_threads()
        try:
            self.loader = Loader(
                os.fspath(cfg.root),
                batch_size=cfg.batch_size,
                num_workers=self.num_workers,
                order=OrderOption.SEQUENTIAL,
                drop_last=False,
                os_cache=True,
                pipelines={"image": [self.decoder], "label": [IntDecoder()]},
                batches_ahead=2,
            )
        finally:
            torch.set_num_threads(torch_threads)  # FFCV sets torch's thread count to its own
        self.n = int(self.loader.reader.num_samples)
        meta = os.fspath(cfg.root) + ".json"
        classes = None
        if os.path.isfile(meta):
            try:
                classes = list(json.loads(open(meta).read())["classes"])
            except (ValueError, KeyError, TypeError):
                classes = None
        if classes is None:
            labels = np.asarray(self.loader.reader.metadata["f1"]["value"])
            classes = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
        self.classes = classes
        self._active = None
        self._lock = threading.Lock()

    def _stop_active(self) -> None:
        it = self._active
        self._active = None
        if it is not None:
            it.close()
            it.join(timeout=10.0)

    def iterate(self, epoch: int, batches: Sequence[np.ndarray]) -> Iterator[Batch]:
        """Decode ``batches`` (dataset indices) of ``epoch``; yields fresh tensors per batch."""
        if not batches:
            return
        spec, dec = self.spec, self.decoder
        with self._lock:
            self._stop_active()
            dec.set_epoch(epoch)
            order = np.concatenate([np.asarray(b, dtype=np.uint64) for b in batches])
            self.loader.traversal_order.indices = order
            torch_threads = torch.get_num_threads()
            try:
                it = iter(self.loader)
            finally:
                torch.set_num_threads(torch_threads)
            self._active = it
        gs, ls = spec.global_size, spec.local_size
        try:
            for rows, labels in it:
                b = rows.shape[0]
                t = torch.from_numpy(rows)
                g = t[:, : dec.global_bytes].reshape(b, spec.global_number, 3, gs, gs).clone()
                loc = t[:, dec.global_bytes : dec.box_offset].reshape(b, spec.local_number, 3, ls, ls).clone()
                raw = np.ascontiguousarray(rows[:, dec.box_offset : dec.row_bytes])
                boxes = torch.from_numpy(raw.view("<u2").reshape(b, spec.n_crops, 4).astype(np.int64))
                lab = torch.from_numpy(np.asarray(labels).reshape(b).astype(np.int64))
                yield g, loc, lab, boxes
        finally:
            with self._lock:
                if self._active is it:
                    self._stop_active()

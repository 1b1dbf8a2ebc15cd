"""Multi-crop loaders (PIL fallback and FFCV decode-once), the FFCV writer, the eval loader.

The test folder's images carry their identity in the red channel (R = 10*i + 5, constant over
the image; G and B are gradients), so the crops of a batch say which images they came from.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.data import (
    MultiCropConfig,
    build_eval_loader,
    build_multicrop_loader,
    ffcv_available,
    scan_image_folder,
)
from dino_fast.data.loader import epoch_order

HAVE_FFCV, WHY_NO_FFCV = ffcv_available()
needs_ffcv = pytest.mark.skipif(not HAVE_FFCV, reason=WHY_NO_FFCV or "FFCV missing")
# the fixture folder holds bad files on purpose; the loader warns about them (asserted once below)
pytestmark = pytest.mark.filterwarnings("ignore:image folder .* skipped:UserWarning")

N_RGB = 23
SPECIAL = {"gray.png": "L", "alpha.png": "RGBA", "cmyk.jpg": "CMYK", "palette.gif": "P"}
BAD = {"zero.jpg": "zero-byte", "text.png": "not an image", "truncated.jpg": "corrupt"}
GS, LS, G, L = 32, 16, 2, 3


def _rgb_image(ident: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[..., 0] = 10 * ident + 5
    img[..., 1] = (xx * 255 // max(1, w - 1)).astype(np.uint8)
    img[..., 2] = (yy * 255 // max(1, h - 1)).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rs = np.random.default_rng(random.SystemRandom().randrange(2**32))
    classes = ["a_cls", "b_cls", "c_cls"]
    for c in classes:
        (root / c).mkdir()
    for i in range(N_RGB):
        h, w = (int(v) for v in rs.integers(48, 160, size=2))
        Image.fromarray(_rgb_image(i, h, w)).save(root / classes[i % 3] / f"img{i:02d}.jpg", quality=95)
    ident = N_RGB
    Image.new("L", (70, 50), 10 * ident + 5).save(root / "a_cls" / "gray.png")
    Image.new("RGBA", (60, 80), (10 * (ident + 1) + 5, 30, 90, 100)).save(root / "b_cls" / "alpha.png")
    Image.new("RGB", (90, 64), (10 * (ident + 2) + 5, 60, 200)).convert("CMYK").save(root / "c_cls" / "cmyk.jpg", quality=95)
    Image.new("RGB", (64, 64), (5, 20, 90)).convert("P", palette=Image.ADAPTIVE, colors=4).save(root / "a_cls" / "palette.gif")
    (root / "a_cls" / "zero.jpg").write_bytes(b"")
    (root / "b_cls" / "text.png").write_text("definitely not a PNG\n")
    good = (root / "a_cls" / "img00.jpg").read_bytes()
    (root / "c_cls" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "c_cls" / "README.txt").write_text("ignored: not an image extension")
    return root


def _ident_of(crop: torch.Tensor) -> int:
    """Image identity from a uint8 crop [3, S, S] (red channel)."""
    return int(round((crop[0].double().median().item() - 5) / 10))


def _all_ids(scan) -> dict[str, int]:
    ids = {}
    for r in scan.records:
        name = Path(r.path).name
        if name.startswith("img"):
            ids[r.path] = int(name[3:5])
        elif name == "gray.png":
            ids[r.path] = N_RGB
        elif name == "alpha.png":
            ids[r.path] = N_RGB + 1
        elif name == "cmyk.jpg":
            ids[r.path] = N_RGB + 2
        else:
            ids[r.path] = 0  # palette: R = 5
    return ids


def _cfg(root, **kw) -> MultiCropConfig:
    base = dict(
        root=str(root),
        backend="folder",
        global_crops_size=GS,
        local_crops_size=LS,
        local_crops_number=L,
        batch_size=4,
        num_workers=0,
        seed=random.SystemRandom().randrange(2**31),
        drop_last=False,
    )
    base.update(kw)
    return MultiCropConfig(**base)  # type: ignore[arg-type]


def _collect(loader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader]


# ------------------------------------------------------------------------------------------------
def test_scan_reports_skips_and_conversions(folder: Path) -> None:
    scan = scan_image_folder(folder)
    assert scan.classes == ["a_cls", "b_cls", "c_cls"]
    assert len(scan.records) == N_RGB + len(SPECIAL)
    skipped = {Path(p).name: reason for p, reason in scan.skipped}
    assert set(skipped) == set(BAD)
    for name, word in BAD.items():
        assert word in skipped[name], (name, skipped[name])
    converted = {Path(p).name: mode for p, mode in scan.converted}
    assert converted == SPECIAL


def test_validate_image_files_is_the_scans_check(folder: Path) -> None:
    """The per-file check the scan runs (and the budget times): the same verdicts, in order, on one
    thread or a pool."""
    from dino_fast.data.folder import list_image_files, validate_image_files

    paths = [p for p, _ in list_image_files(folder)[1]]
    scan = scan_image_folder(folder, num_workers=1)
    kept = {r.path: (r.height, r.width, r.mode) for r in scan.records}
    skipped = dict(scan.skipped)
    assert len(paths) > 16  # the pool takes over above 16 files
    for workers in (1, 2):
        got = validate_image_files(paths, num_workers=workers)
        assert [info for info, _ in got] == [kept.get(p) for p in paths]
        assert [reason for _, reason in got] == [skipped.get(p) for p in paths]
    assert validate_image_files([]) == []


def test_folder_loader_epoch_covers_every_image_once(folder: Path) -> None:
    cfg = _cfg(folder)
    with pytest.warns(UserWarning, match="skipped 3"):
        loader = build_multicrop_loader(cfg, return_boxes=True)
    n = N_RGB + len(SPECIAL)
    assert loader.backend == "folder" and loader.dataset_size == n and len(loader) == -(-n // 4)
    batches = _collect(loader)
    assert len(batches) == len(loader)
    scan = scan_image_folder(folder)
    ids = _all_ids(scan)
    seen = []
    for g, loc, lab, boxes in batches:
        b = g.shape[0]
        assert g.dtype == torch.uint8 and g.shape == (b, G, 3, GS, GS)
        assert loc.dtype == torch.uint8 and loc.shape == (b, L, 3, LS, LS)
        assert lab.dtype == torch.int64 and lab.shape == (b,)
        assert boxes.shape == (b, G + L, 4)
        for j in range(b):
            crop_ids = {_ident_of(g[j, c]) for c in range(G)} | {_ident_of(loc[j, c]) for c in range(L)}
            assert len(crop_ids) == 1, crop_ids  # all crops of a sample come from one image
            seen.append((crop_ids.pop(), int(lab[j])))
    expected = sorted((ids[r.path], r.label) for r in scan.records)
    assert sorted(seen) == expected


def test_crops_are_resized_boxes_of_the_image(folder: Path) -> None:
    """Each crop equals PIL's bicubic resize of its box (float64 comparison of the pixels)."""
    loader = build_multicrop_loader(_cfg(folder, batch_size=30), return_boxes=True)
    scan = loader._backend.scan
    g, loc, lab, boxes = next(iter(loader))
    idx = loader.batch_indices()[0]
    for j in range(4):
        img = Image.open(scan.records[int(idx[j])].path).convert("RGB")
        for c in range(G + L):
            t, lft, h, w = (int(v) for v in boxes[j, c])
            s = GS if c < G else LS
            ref = np.asarray(img.resize((s, s), Image.BICUBIC, box=(lft, t, lft + w, t + h))).transpose(2, 0, 1)
            got = (g[j, c] if c < G else loc[j, c - G]).numpy()
            np.testing.assert_array_equal(got, ref)
            # and the box is where the gradients say: G grows with x, B with y
            gx = np.asarray(img)[t : t + h, lft : lft + w, 1].astype(np.float64).mean()
            assert abs(got[1].astype(np.float64).mean() - gx) < 6.0


def test_replay_resume_and_worker_independence(folder: Path) -> None:
    cfg = _cfg(folder, batch_size=5, seed=random.SystemRandom().randrange(2**31))
    a = build_multicrop_loader(cfg, return_boxes=True)
    a.set_epoch(3)
    first = _collect(a)
    again = _collect(a)  # same epoch again
    cfg2 = _cfg(folder, batch_size=5, seed=cfg.seed, num_workers=2)
    b = build_multicrop_loader(cfg2, return_boxes=True)
    b.set_epoch(3)
    with_workers = _collect(b)
    tail = [tuple(t.clone() for t in x) for x in b.iter_from(2)]
    b.set_epoch(3, start_batch=4)
    tail4 = _collect(b)
    for x, y, z in zip(first, again, with_workers):
        for u, v, w in zip(x, y, z):
            assert torch.equal(u, v) and torch.equal(u, w)
    assert len(tail) == len(first) - 2 and len(tail4) == len(first) - 4
    for x, y in zip(first[2:], tail):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    for x, y in zip(first[4:], tail4):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    b.set_epoch(4)
    other = _collect(b)
    assert not all(torch.equal(x[3], y[3]) for x, y in zip(first, other))  # different boxes
    # the workers persist across epochs: an epoch abandoned after one batch (its prefetched
    # batches in flight) does not leak into the next one, which yields exactly its own batches
    b.set_epoch(4)
    partial = iter(b)
    next(partial)
    b.set_epoch(3)
    after = _collect(b)
    assert len(after) == len(first)
    for x, y in zip(first, after):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert b._backend._dl is not None and b._backend._dl.persistent_workers
    assert not np.array_equal(epoch_order(27, cfg.seed, 3), epoch_order(27, cfg.seed, 4))
    # the same image in two epochs gets different boxes
    e3 = {int(i): x[3][k] for x, bi in zip(first, a.batch_indices(3)) for k, i in enumerate(bi)}
    e4 = {int(i): x[3][k] for x, bi in zip(other, b.batch_indices(4)) for k, i in enumerate(bi)}
    assert sum(not torch.equal(e3[i], e4[i]) for i in e3) >= len(e3) - 1


def test_two_ranks_disjoint_and_covering(folder: Path) -> None:
    seed = random.SystemRandom().randrange(2**31)
    shards = []
    for rank in range(2):
        ld = build_multicrop_loader(_cfg(folder, seed=seed), rank=rank, world_size=2)
        ld.set_epoch(1)
        shards.append(np.concatenate(ld.batch_indices()))
        ids = [_ident_of(g[j, 0]) for g, _, _ in ld for j in range(g.shape[0])]
        scan = ld._backend.scan
        id_of = _all_ids(scan)
        assert ids == [id_of[scan.records[int(i)].path] for i in shards[-1]]
    assert len(set(shards[0]) & set(shards[1])) == 0
    assert sorted(np.concatenate(shards).tolist()) == list(range(N_RGB + len(SPECIAL)))
    # drop_last: equal batch counts on both ranks
    lens = [len(build_multicrop_loader(_cfg(folder, seed=seed, drop_last=True), rank=r, world_size=2)) for r in range(2)]
    assert lens == [(27 // 2) // 4] * 2


def test_config_errors(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_multicrop_loader(_cfg(tmp_path / "missing"))
    with pytest.raises(ValueError, match="batch_size"):
        build_multicrop_loader(_cfg(folder, batch_size=0))
    with pytest.raises(ValueError, match="backend"):
        build_multicrop_loader(_cfg(folder, backend="dali"))
    with pytest.raises(ValueError, match="rank"):
        build_multicrop_loader(_cfg(folder), rank=2, world_size=2)
    with pytest.raises(ValueError, match="global_scale"):
        build_multicrop_loader(_cfg(folder, global_crops_scale=(0.9, 0.1)))
    with pytest.raises(TypeError, match="MultiCropConfig"):
        build_multicrop_loader({"root": str(folder)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no valid image"):
        (tmp_path / "empty").mkdir()
        build_multicrop_loader(_cfg(tmp_path / "empty"))
    loader = build_multicrop_loader(_cfg(folder))
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=len(loader) + 1)
    if HAVE_FFCV:
        with pytest.raises(ValueError, match="write-beton"):
            build_multicrop_loader(_cfg(folder, backend="ffcv"))


def test_eval_loader_fixed_order_and_pixels(folder: Path) -> None:
    loader = build_eval_loader(folder, image_size=24, batch_size=8, num_workers=0)
    assert loader.dataset.classes == ["a_cls", "b_cls", "c_cls"]
    xs, ys = zip(*[(x, y) for x, y in loader])
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (27, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    scan = scan_image_folder(folder)
    assert y.tolist() == scan.labels
    # float64 reference of image 0: resize shorter side to round(24*256/224) = 27, centre crop 24
    img = Image.open(scan.records[0].path).convert("RGB")
    w, h = img.size
    size = (27, int(27 * h / w)) if w <= h else (int(27 * w / h), 27)
    r = img.resize(size, Image.BICUBIC)
    top, left = int(round((size[1] - 24) / 2)), int(round((size[0] - 24) / 2))
    ref = np.asarray(r.crop((left, top, left + 24, top + 24)), dtype=np.float64).transpose(2, 0, 1) / 255
    ref = (ref - np.array([0.485, 0.456, 0.406])[:, None, None]) / np.array([0.229, 0.224, 0.225])[:, None, None]
    np.testing.assert_allclose(x[0].double().numpy(), ref, rtol=0, atol=1e-5)
    again = torch.cat([b for b, _ in loader])
    assert torch.equal(x, again)


# ------------------------------------------------------------------------------------------------
# FFCV
@pytest.fixture(scope="module")
def beton(folder: Path, tmp_path_factory: pytest.TempPathFactory):
    if not HAVE_FFCV:
        pytest.skip(WHY_NO_FFCV)
    from dino_fast.data.ffcv_writer import write_beton

    out = tmp_path_factory.mktemp("beton") / "data.beton"
    report = write_beton(folder, out, max_resolution=512, jpeg_quality=95, num_workers=2, progress=False)
    return out, report


@pytest.fixture(scope="module")
def ffcv_loader(beton):
    out, _ = beton
    seed = random.SystemRandom().randrange(2**31)
    cfg = MultiCropConfig(
        root=str(out), backend="auto", global_crops_size=GS, local_crops_size=LS, local_crops_number=L,
        batch_size=4, num_workers=2, seed=seed, drop_last=False,
    )  # fmt: skip
    return build_multicrop_loader(cfg, return_boxes=True)


@needs_ffcv
def test_writer_report(beton, folder: Path) -> None:
    out, report = beton
    assert Path(out).is_file() and report.written == N_RGB + len(SPECIAL)
    assert {Path(p).name for p, _ in report.skipped} == set(BAD)
    assert {Path(p).name: m for p, m in report.converted} == SPECIAL
    assert report.classes == ["a_cls", "b_cls", "c_cls"]
    assert "skipped 3" in report.summary()


@needs_ffcv
def test_ffcv_epoch_covers_every_image_once_and_matches_folder(ffcv_loader, folder: Path) -> None:
    loader = ffcv_loader
    assert loader.backend == "ffcv" and loader.classes == ["a_cls", "b_cls", "c_cls"]
    loader.set_epoch(2)
    batches = _collect(loader)
    scan = scan_image_folder(folder)
    ids = _all_ids(scan)
    seen = []
    for g, loc, lab, _ in batches:
        assert g.dtype == torch.uint8 and g.shape[1:] == (G, 3, GS, GS) and loc.shape[1:] == (L, 3, LS, LS)
        assert lab.dtype == torch.int64
        for j in range(g.shape[0]):
            crop_ids = {_ident_of(g[j, c]) for c in range(G)} | {_ident_of(loc[j, c]) for c in range(L)}
            assert len(crop_ids) == 1
            seen.append((crop_ids.pop(), int(lab[j])))
    assert sorted(seen) == sorted((ids[r.path], r.label) for r in scan.records)

    # same seed and epoch on the fallback backend: same order, same boxes, close pixels
    fcfg = _cfg(folder, seed=loader.cfg.seed)
    fb = build_multicrop_loader(fcfg, return_boxes=True)
    fb.set_epoch(2)
    for (g1, l1, y1, b1), (g2, l2, y2, b2) in zip(batches, _collect(fb)):
        assert torch.equal(b1, b2) and torch.equal(y1, y2)
        # OpenCV INTER_AREA + JPEG re-encoding vs PIL bicubic on smooth images
        assert (g1.float() - g2.float()).abs().mean() < 3.0
        assert (l1.float() - l2.float()).abs().mean() < 3.0


@needs_ffcv
def test_ffcv_replay_resume_and_epochs(ffcv_loader) -> None:
    loader = ffcv_loader
    loader.set_epoch(5)
    first = _collect(loader)
    again = _collect(loader)
    tail = [tuple(t.clone() for t in x) for x in loader.iter_from(3)]
    for x, y in zip(first, again):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert len(tail) == len(first) - 3
    for x, y in zip(first[3:], tail):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    # an iteration abandoned half-way does not disturb the next one
    it = iter(loader)
    next(it)
    del it
    loader.set_epoch(6)
    other = _collect(loader)
    assert sum(not torch.equal(x[3], y[3]) for x, y in zip(first, other)) == len(first)


@needs_ffcv
def test_ffcv_rank_shards(ffcv_loader, folder: Path) -> None:
    """Rank 1 of 2 decodes exactly its shard (same boxes as the fallback's rank 1); shards partition the set."""
    cfg = MultiCropConfig(**{**ffcv_loader.cfg.__dict__, "batch_size": 8})
    rank1 = build_multicrop_loader(cfg, rank=1, world_size=2, return_boxes=True)
    rank0 = build_multicrop_loader(_cfg(folder, seed=cfg.seed, batch_size=8), rank=0, world_size=2, return_boxes=True)
    fb1 = build_multicrop_loader(_cfg(folder, seed=cfg.seed, batch_size=8), rank=1, world_size=2, return_boxes=True)
    for ld in (rank0, rank1, fb1):
        ld.set_epoch(1)
    shards = [np.concatenate(rank0.batch_indices()), np.concatenate(rank1.batch_indices())]
    assert len(set(shards[0]) & set(shards[1])) == 0
    assert sorted(np.concatenate(shards).tolist()) == list(range(N_RGB + len(SPECIAL)))
    got = _collect(rank1)
    ref = _collect(fb1)
    assert len(got) == len(ref) == len(rank1)
    for (_g1, _, y1, b1), (_, _, y2, b2) in zip(got, ref):
        assert torch.equal(b1, b2) and torch.equal(y1, y2)
    scan = scan_image_folder(folder)
    id_of = _all_ids(scan)
    ids = [_ident_of(g[j, 0]) for g, _, _, _ in got for j in range(g.shape[0])]
    assert ids == [id_of[scan.records[int(i)].path] for i in shards[1]]


def test_images_of_more_than_8_bits_are_rescaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit grey PNG keeps its content (v / 257), where PIL's convert("RGB") saturates every
    value above 255; 32-bit int and float images map their range as to_8bit documents."""
    from dino_fast.data.folder import load_rgb, to_8bit

    ramp = (np.arange(40 * 48).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # I;16 (or I on some PIL versions)
    got = np.asarray(load_rgb(str(tmp_path / "deep.png")))
    assert got.shape == (40, 48, 3) and got.dtype == np.uint8
    want = np.rint(ramp / 257.0).astype(np.uint8)
    for ch in range(3):
        assert np.array_equal(got[..., ch], want)
    assert np.asarray(Image.fromarray(ramp).convert("RGB")).mean() > 250  # what PIL alone gives
    cases = [
        (np.array([[0, 100], [200, 255]], dtype=np.int32), "I", [[0, 100], [200, 255]]),      # 8-bit range: kept
        (np.array([[0, 257], [514, 65535]], dtype=np.int32), "I", [[0, 1], [2, 255]]),      # 16-bit range
        (np.array([[-10, 0], [10, 30]], dtype=np.int32), "I", [[0, 64], [128, 255]]),       # other: min-max
        (np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32), "F", [[0, 128], [64, 255]]),  # 0..1
        (np.array([[-1.0, 1.0], [3.0, 3.0]], dtype=np.float32), "F", [[0, 128], [255, 255]]),
        (np.full((2, 2), 7000, dtype=np.int32), "I", [[27, 27], [27, 27]]),                  # 7000 / 257
        (np.full((2, 2), 70000, dtype=np.int32), "I", [[0, 0], [0, 0]]),                     # constant, off range
    ]
    for arr, mode, expect in cases:
        out = to_8bit(Image.fromarray(arr, mode=mode))
        assert out.mode == "L" and np.asarray(out).tolist() == expect, (arr.tolist(), np.asarray(out).tolist())
    rgb = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_8bit(rgb) is rgb


def test_large_jpegs_decode_at_a_reduced_dct_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JPEG at least twice the needed side decodes at libjpeg's 1/2, 1/4 or 1/8 scale, never
    below the needed side; the crop boxes are still drawn on the file's size and the crops (and
    the eval loader's centre crop) stay within a fraction of a grey level of a full decode."""
    import dino_fast.data.loader as loader_mod
    from dino_fast.data.crops import CropSpec, crop_boxes
    from dino_fast.data.folder import decode_rgb, load_rgb
    from dino_fast.data.loader import EvalImageFolder, decode_multicrop

    rs = np.random.default_rng(random.SystemRandom().randrange(2**32))
    yy, xx = np.mgrid[0:1200, 0:1600]
    smooth = np.stack([(xx * 255 // 1599), (yy * 255 // 1199), ((xx + yy) * 255 // 2798)], axis=-1)
    photo = np.clip(smooth + rs.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
    (tmp_path / "c").mkdir()
    big, png = tmp_path / "c" / "big.jpg", tmp_path / "c" / "big.png"
    Image.fromarray(photo).save(big, quality=90)
    Image.fromarray(photo[:500, :700]).save(png)

    spec = CropSpec(global_size=64, local_size=32, local_number=6, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4))
    assert spec.decode_min_side() == 234  # 2 * 64 / sqrt(0.4 * 3/4) = 2 * 32 / sqrt(0.1 * 3/4) = 233.7
    for min_side, size in ((0, (1600, 1200)), (234, (400, 300)), (300, (400, 300)), (301, (800, 600)),
                           (600, (800, 600)), (601, (1600, 1200))):
        img, hw = decode_rgb(str(big), min_side)
        assert hw == (1200, 1600) and img.size == size and img.mode == "RGB", (min_side, img.size)
        assert min(img.size) >= min_side
    assert decode_rgb(str(png), 100)[0].size == (700, 500)  # not a JPEG: full size
    assert load_rgb(str(big)).size == (1600, 1200)

    ev = EvalImageFolder(tmp_path, image_size=64, resize_size=72, num_workers=1)
    reduced = [decode_multicrop(str(big), spec, seed=7, epoch=1, sample=i) for i in range(3)], ev[0][0]
    monkeypatch.setattr(CropSpec, "decode_min_side", lambda self: 0)  # from here on: full decodes
    real = loader_mod.decode_rgb
    monkeypatch.setattr(loader_mod, "decode_rgb", lambda path, min_side=0: real(path, 0))
    for sample, (g, loc, boxes) in enumerate(reduced[0]):
        g0, loc0, boxes0 = decode_multicrop(str(big), spec, seed=7, epoch=1, sample=sample)
        np.testing.assert_array_equal(boxes, crop_boxes(spec, 1200, 1600, seed=7, epoch=1, sample=sample))
        np.testing.assert_array_equal(boxes, boxes0)
        for a, a0 in ((g, g0), (loc, loc0)):
            diff = np.abs(a.astype(np.int64) - a0.astype(np.int64))
            assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    x, x0 = reduced[1], ev[0][0]
    assert x.shape == x0.shape == (3, 64, 64)
    assert (x - x0).abs().mean() < 0.01 and (x - x0).abs().max() < 0.1  # ImageNet-normalised units


def test_eval_dataset_from_samples_is_the_scanned_dataset_on_those_files(tmp_path):
    """EvalImageFolder.from_samples (what the time budget's evaluation estimate reads) gives the
    very items of the scanned dataset for the same (path, label) pairs, without a scan."""
    from dino_fast.data.loader import EvalImageFolder

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    full = EvalImageFolder(tmp_path, image_size=32, resize_size=36, num_workers=1)
    picked = full.samples[1::2]
    part = EvalImageFolder.from_samples(picked, full.classes, image_size=32, resize_size=36)
    assert part.scan is None and part.classes == ["a", "b"] and len(part) == 3
    assert part.targets == [lab for _, lab in picked]
    for j, i in enumerate(range(1, 6, 2)):
        x, y = part[j]
        x_ref, y_ref = full[i]
        assert y == y_ref and torch.equal(x, x_ref)
    with pytest.raises(ValueError, match="resize_size must be an int >= image_size"):
        EvalImageFolder.from_samples(picked, full.classes, image_size=32, resize_size=30)

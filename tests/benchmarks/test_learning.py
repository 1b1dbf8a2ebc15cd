"""bench/learning.py and bench/datasets.py: raw-pixel k-NN, the per-set bars, the glyph set."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import datasets, learning  # noqa: E402


def _folder(root: Path, per_class: int, rng: np.random.Generator) -> None:
    """Two classes told apart by which half of the image is bright, plus noise."""
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                a = rng.integers(0, 60, (16, 16, 3))
                if c == 0:
                    a[:, :8] += 180
                else:
                    a[:, 8:] += 180
                Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")


def test_raw_pixel_knn_separates_what_pixels_separate(tmp_path):
    _folder(tmp_path, 6, np.random.default_rng(0))
    res = learning.raw_pixel_knn(tmp_path / "train", tmp_path / "val", image_size=16, resize_size=16, k=5)
    assert res["top1"] == 100.0


def _run(seed, knn_t, knn_r, lin_t, lin_r, seconds=100.0, ent=3.0, warnings=()):
    return {"seed": seed, "knn_teacher": knn_t, "knn_random": knn_r, "knn_gain": knn_t - knn_r,
            "linear_teacher": lin_t, "linear_random": lin_r, "linear_gain": lin_t - lin_r,
            "seconds": seconds, "teacher_entropy": ent, "ln_k": 5.0, "collapse_warnings": list(warnings)}


def test_summary_bars():
    kw = dict(min_gain=25.0, entropy_frac=0.8, max_seconds=600.0)
    good = learning.summarise("s", [_run(0, 80, 50, 85, 55), _run(1, 78, 52, 83, 57)], {"top1": 79.5}, **kw)
    assert all(good["bars"].values())
    assert good["knn_gain"] == {"mean": 28.0, "std": pytest.approx(2.83, abs=0.01)}
    assert not good["knn_at_or_above_raw_pixels"]  # 79.0 vs 79.5
    bad = learning.summarise("s", [_run(0, 80, 50, 70, 55, seconds=700, ent=4.5, warnings=["epoch 3: x"])],
                             {"top1": 60.0}, **kw)
    assert bad["bars"] == {"no_collapse_warning": False, "teacher_entropy_below": False, "knn_gain": True,
                           "linear_gain": False, "time": False}
    assert bad["knn_at_or_above_raw_pixels"]


def test_glyphs_are_letters_from_disjoint_faces(tmp_path):
    root = datasets.build_glyphs(tmp_path / "g", train_per_class=3, val_per_class=2)
    assert sorted(p.name for p in (root / "train").iterdir()) == list(datasets.LETTERS)
    assert len(list((root / "val" / "A").iterdir())) == 2
    img = np.asarray(Image.open(root / "train" / "A" / "00000.png"))
    assert img.shape == (32, 32) and img.std() > 5  # a glyph, not a blank
    assert not set(datasets.VAL_FACES) - set(datasets.FACES)
    # written once: a second build reuses the folder
    stamp = (root / ".complete").stat().st_mtime_ns
    assert datasets.build_glyphs(root) == root and (root / ".complete").stat().st_mtime_ns == stamp


def test_tints_are_the_glyphs_in_colours_that_do_not_tell_the_class(tmp_path):
    root = datasets.build_tints(tmp_path / "t", train_per_class=6, val_per_class=2)
    assert sorted(p.name for p in (root / "train").iterdir()) == list(datasets.LETTERS)
    lum = np.array([0.299, 0.587, 0.114])
    means = []
    for letter in datasets.LETTERS:
        for i, f in enumerate(sorted((root / "train" / letter).iterdir())):
            img = np.asarray(Image.open(f), dtype=np.float64)
            assert img.shape == (32, 32, 3)
            y = img @ lum
            assert y.max() - y.min() >= 79.0, (letter, i)  # the letter stays readable
            means.append(img.mean(axis=(0, 1)))
    # the same drawing as the glyphs set, recoloured: luminance order follows the grey glyph's
    g = np.asarray(Image.open(datasets.build_glyphs(tmp_path / "g", 6, 2) / "train" / "A" / "00000.png"), float)
    t = np.asarray(Image.open(root / "train" / "A" / "00000.png"), float) @ lum
    assert np.corrcoef(g.ravel(), t.ravel())[0, 1] > 0.99
    # colours vary within a class about as much as across classes: no class has its own colour
    means = np.array(means).reshape(len(datasets.LETTERS), 6, 3)
    assert means.std(axis=1).mean() > 0.5 * means.mean(axis=1).std(axis=0).mean()


def test_every_face_draws_every_letter():
    fonts = datasets._fonts_dir()
    for face in datasets.FACES:
        for letter in datasets.LETTERS:
            a = np.asarray(datasets._glyph(letter, fonts / face, np.random.default_rng(1)), dtype=float)
            assert a.std() > 15, (face, letter)


def test_unknown_set_is_named():
    with pytest.raises(KeyError, match="unknown image set 'nope'; known"):
        datasets.build("nope", Path("/nonexistent"))


def test_scenes_are_patches_of_images_the_photos_do_not_use(tmp_path):
    pytest.importorskip("skimage", reason="the scenes set is cut from scikit-image's samples (the bench extra)")
    assert not set(datasets.SCENES) & set(datasets.PHOTOS)
    root = datasets.build_scenes(tmp_path / "s", train_per_class=3, val_per_class=2)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert classes == [f"{i:02d}-{n}" for i, n in enumerate(datasets.SCENES)]
    assert classes == sorted(p.name for p in (root / "val").iterdir())
    for c in classes:
        for split, n in (("train", 3), ("val", 2)):
            files = sorted((root / split / c).iterdir())
            assert len(files) == n
            img = np.asarray(Image.open(files[0]))
            assert img.shape == (48, 48, 3) and img.dtype == np.uint8, (c, split)


def _results(sets_raw: dict[str, float], extra=()) -> dict:
    kw = dict(min_gain=25.0, entropy_frac=0.8, max_seconds=600.0)
    runs, summaries = [], []
    for name, raw in sets_raw.items():
        rs = [{**_run(seed, 80, 50, 85, 55), "set": name} for seed in (1, 0)]
        runs += rs
        summaries.append(learning.summarise(name, rs, {"top1": raw}, **kw))
    return {"config": "configs/default.yaml", "extra": list(extra), "summaries": summaries, "runs": runs,
            "any_knn_at_or_above_raw_pixels": any(s["knn_at_or_above_raw_pixels"] for s in summaries)}


def test_update_replaces_the_sets_it_ran_and_keeps_the_rest():
    old = _results({"digits": 99.0, "glyphs": 99.0, "photos": 99.0})
    new = _results({"photos": 10.0, "scenes": 99.0})  # new sets arrive before the held-out one
    merged = learning.merge_results(old, new)
    assert [s["set"] for s in merged["summaries"]] == ["digits", "glyphs", "scenes", "photos"]
    assert [(r["set"], r["seed"]) for r in merged["runs"]] == [(s, k) for s in ("digits", "glyphs", "scenes", "photos")
                                                               for k in (0, 1)]
    assert merged["summaries"][-1]["raw_pixel_knn"] == 10.0 and merged["any_knn_at_or_above_raw_pixels"]
    assert not learning.merge_results(new, old)["any_knn_at_or_above_raw_pixels"]  # old's photos replace new's
    with pytest.raises(ValueError, match=r"cannot merge into results of extra=\[\]: this run has extra=\['a=1'\]"):
        learning.merge_results(old, _results({"digits": 1.0}, extra=["a=1"]))


def _write_idx(path: Path, a: np.ndarray) -> None:
    import gzip
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    path.write_bytes(gzip.compress(header + a.astype(np.uint8).tobytes()))


def test_read_idx_round_trips_and_names_a_bad_file(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x-idx3-ubyte.gz", a)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "x-idx3-ubyte.gz"), a)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        datasets.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match=r"header says \[5\] \(5 bytes\), the file holds 3"):
        datasets.read_idx(tmp_path / "short")


def test_fashion_takes_the_first_images_of_each_class_from_each_file(tmp_path, monkeypatch):
    src = tmp_path / "fm"
    src.mkdir()
    rng = np.random.default_rng(0)
    for stem, n in (("train", 40), ("t10k", 30)):
        labels = np.tile(np.arange(10), n // 10)
        rng.shuffle(labels)
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0] = np.arange(n)  # each image's index in its file, to check which were taken
        images[:, 1, 1] = labels
        _write_idx(src / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(src / f"{stem}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(src))
    root = datasets.build_fashion(tmp_path / "out", train_per_class=2, val_per_class=3)
    assert sorted(p.name for p in (root / "train").iterdir()) == [f"{i}-{c}" for i, c in
                                                                    enumerate(datasets.FASHION_CLASSES)]
    for split, stem, n in (("train", "train", 2), ("val", "t10k", 3)):
        labels = datasets.read_idx(src / f"{stem}-labels-idx1-ubyte.gz")
        for ci, name in enumerate(datasets.FASHION_CLASSES):
            files = sorted((root / split / f"{ci}-{name}").iterdir())
            got = [int(np.asarray(Image.open(f))[0, 0]) for f in files]
            assert got == list(np.flatnonzero(labels == ci)[:n])
            assert all(int(np.asarray(Image.open(f))[1, 1]) == ci for f in files)
    with pytest.raises(ValueError, match=r"class 0 \(tshirt\) has 4 train images, 5 wanted"):
        datasets.build_fashion(tmp_path / "out2", train_per_class=5, val_per_class=1)


def test_fashion_without_its_files_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.build_fashion(tmp_path / "out")


def test_folder_arguments_are_checked_before_any_run(tmp_path):
    (tmp_path / "a" / "train").mkdir(parents=True)
    (tmp_path / "a" / "val").mkdir()
    (tmp_path / "b" / "train").mkdir(parents=True)
    assert learning.parse_folders([f"mine={tmp_path / 'a'}"], taken={"digits"}) == {"mine": (tmp_path / "a").resolve()}
    with pytest.raises(ValueError, match="expected NAME=DIR"):
        learning.parse_folders([str(tmp_path / "a")], taken=set())
    with pytest.raises(ValueError, match="the name 'digits' is already used"):
        learning.parse_folders([f"digits={tmp_path / 'a'}"], taken={"digits"})
    with pytest.raises(ValueError, match=r"has no val/ folder"):
        learning.parse_folders([f"b={tmp_path / 'b'}"], taken=set())
    with pytest.raises(SystemExit):
        learning.main(["--sets"])  # nothing to run

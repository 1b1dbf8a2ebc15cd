"""The built-in dataset: layout, determinism, safe generation, and that colour alone does not solve it."""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_fast.data import builtin
from dino_fast.data.builtin import class_names, ensure_builtin_dataset, make_dataset


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg"))
    }


def test_layout_and_determinism(tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(1000)
    a = make_dataset(tmp_path / "a", n_classes=12, train_per_class=3, val_per_class=2, image_size=64, seed=seed)
    b = make_dataset(tmp_path / "b", n_classes=12, train_per_class=3, val_per_class=2, image_size=64, seed=seed)
    c = make_dataset(tmp_path / "c", n_classes=12, train_per_class=3, val_per_class=2, image_size=64, seed=seed + 1)
    names = class_names(12)
    assert len(set(names)) == 12
    assert sorted(os.listdir(a / "train")) == names and sorted(os.listdir(a / "val")) == names
    for split, k in (("train", 3), ("val", 2)):
        for name in names:
            files = sorted((a / split / name).glob("*.jpg"))
            assert len(files) == k
            with Image.open(files[0]) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    assert len(da) == 12 * 5 and all(da[k] != dc[k] for k in da)
    # train and val images differ
    assert da[f"train/{names[0]}/0000.jpg"] != da[f"val/{names[0]}/0000.jpg"]


def test_first_ten_classes_differ_in_shape_and_texture() -> None:
    names = class_names(10)
    shapes = {n.split("-")[1] for n in names}
    textures = {n.split("-")[2] for n in names}
    assert len(shapes) == 10 and len(textures) == 10
    assert len(set(class_names(builtin.MAX_CLASSES))) == builtin.MAX_CLASSES == 100
    with pytest.raises(ValueError, match="n_classes"):
        class_names(101)
    with pytest.raises(ValueError, match="image_size"):
        make_dataset("unused", image_size=8)


def test_ensure_builtin_dataset_generates_reuses_and_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = builtin.make_dataset

    def small(out, **kw):
        calls.append(out)
        return real(out, n_classes=10, train_per_class=2, val_per_class=1, image_size=48, seed=0)

    monkeypatch.setattr(builtin, "make_dataset", small)
    monkeypatch.chdir(tmp_path)
    root = ensure_builtin_dataset()
    assert root == tmp_path / "data_cache" / "builtin"
    assert (root / "dataset.json").is_file() and len(list((root / "train").rglob("*.jpg"))) == 20
    assert [p for p in root.parent.iterdir() if p.name != "builtin"] == []  # no temporary left
    before = _digest(root)
    mtime = (root / "dataset.json").stat().st_mtime_ns
    assert ensure_builtin_dataset() == root and len(calls) == 1  # reused
    assert (root / "dataset.json").stat().st_mtime_ns == mtime

    # an interrupted earlier run: a partial folder without dataset.json is replaced
    partial = tmp_path / "other"
    (partial / "train" / "junk").mkdir(parents=True)
    (partial / "train" / "junk" / "x.jpg").write_bytes(b"half")
    out = ensure_builtin_dataset(partial)
    assert _digest(out) == before and not (out / "train" / "junk").exists()

    # a dataset written by an older generator (another format) is regenerated
    meta = (out / "dataset.json").read_text().replace(f'"format": {builtin._FORMAT_VERSION}', '"format": 1')
    (out / "dataset.json").write_text(meta)
    (out / "train" / "stale.jpg").write_bytes(b"old")
    assert ensure_builtin_dataset(partial) == out and _digest(out) == before and len(calls) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".other")] == []

    # a failure while generating leaves nothing behind
    def boom(out, **kw):
        Path(out, "train").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "make_dataset", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_builtin_dataset(tmp_path / "third")
    assert not (tmp_path / "third").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".third")] == []


def _colour_features(paths: list[Path]) -> np.ndarray:
    feats = []
    for p in paths:
        x = np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255
        hist = [np.histogram(x[..., c], bins=8, range=(0, 1))[0] / x[..., c].size for c in range(3)]
        feats.append(np.concatenate([x.mean((0, 1)), x.std((0, 1)), *hist]))
    f = np.asarray(feats)
    f = f - f.mean(0)
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)


def test_colour_statistics_do_not_separate_the_classes(tmp_path: Path) -> None:
    """k-NN on colour statistics (what a random network mostly sees) stays near chance (10%)."""
    root = make_dataset(tmp_path / "d", n_classes=10, train_per_class=40, val_per_class=12, image_size=64, seed=0)
    names = class_names(10)
    tr = [(p, k) for k, n in enumerate(names) for p in sorted((root / "train" / n).glob("*.jpg"))]
    va = [(p, k) for k, n in enumerate(names) for p in sorted((root / "val" / n).glob("*.jpg"))]
    ftr = _colour_features([p for p, _ in tr])
    fva = _colour_features([p for p, _ in va])
    ytr = np.array([k for _, k in tr])
    yva = np.array([k for _, k in va])
    sim = fva @ ftr.T
    top = np.argsort(-sim, axis=1)[:, :10]
    votes = np.zeros((len(va), 10))
    for i in range(len(va)):
        for j in top[i]:
            votes[i, ytr[j]] += np.exp(sim[i, j] / 0.07)
    acc = (votes.argmax(1) == yva).mean()
    print(f"colour-statistics k-NN accuracy: {acc:.3f}")
    assert acc < 0.3, acc


def test_cli_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = builtin.main([str(tmp_path / "cli"), "--classes", "3", "--train-per-class", "2", "--val-per-class", "1", "--image-size", "40"])
    assert rc == 0 and "wrote 9 images" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").rglob("*.jpg"))) == 9
    assert builtin.main([str(tmp_path / "bad"), "--classes", "101"]) == 2

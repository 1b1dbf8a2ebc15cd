"""Bad inputs and non-finite values: each is reported clearly and loses nothing.

Data folders (empty, missing, with corrupt / zero-byte / non-image files, images smaller than
the crops), config keys, checkpoints (another architecture, truncated, full disk while writing),
NaN/inf in the model outputs or weights (stop at that iteration, last good checkpoint kept),
gradient overflow under a grad scaler (the step is skipped, the run goes on).
"""
from __future__ import annotations

import errno
import logging
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.data import MultiCropConfig, build_multicrop_loader
from dino_fast.ops.ema.teacher import NonFiniteEMAError, TeacherEMA
from dino_fast.train.loop import NonFiniteLossError, Trainer, main
from dino_fast.utils import checkpoint as ck
from tests._train_utils import make_image_folder, read_losses, tiny_config, write_config


def cli_args(data_root, out, *extra: str) -> list[str]:
    """``main`` arguments for the tiny config (written next to ``out`` as YAML) plus overrides."""
    path = write_config(tiny_config(data_root, out, "train.threads=1"), out.parent / f"{out.name}.yaml")
    return ["--config", str(path), *extra]


@pytest.fixture
def trained(data_root, tmp_path):
    """An output folder holding a good checkpoint after 2 iterations, and its bytes."""
    out = tmp_path / "out"
    assert main(cli_args(data_root, out, "train.max_iters=2", "train.threads=1")) == 0
    return out, (out / "checkpoint.pth").read_bytes()


# ------------------------------------------------------------------------------------ data
def test_missing_and_empty_data_folder_keep_the_checkpoint(trained, tmp_path, caplog):
    out, before = trained
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    (tmp_path / "empty" / "class0" / "README.txt").write_text("no images here")
    for root, expected in ((tmp_path / "nope", "does not exist"), (tmp_path / "empty", "no valid image found")):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="dino_fast.train"):
            assert main(cli_args(root, out, "train.resume=auto")) == 2
        assert expected in caplog.text and str(root) in caplog.text
        assert (out / "checkpoint.pth").read_bytes() == before  # nothing lost


def test_corrupt_zero_byte_and_non_image_files_are_skipped_counted_and_named(tmp_path, caplog):
    root = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=6)
    good = root / "class0" / "000.jpg"
    bad = {
        root / "class0" / "zero.jpg": b"",
        root / "class0" / "text.png": b"this is not a PNG file\n",
        root / "class1" / "garbage.jpg": os.urandom(3000),
        root / "class1" / "truncated.jpg": good.read_bytes()[:300],
    }
    for p, data in bad.items():
        p.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="dino_fast.train"):
        tr = Trainer(tiny_config(root, tmp_path / "out", "train.max_iters=3", "train.threads=1"))
    assert tr.loader.dataset_size == 12  # the 12 good images, nothing else
    assert f"skipped {len(bad)} file(s)" in caplog.text
    for p in bad:
        assert str(p) in caplog.text, p
    assert "zero-byte file" in caplog.text and "not an image" in caplog.text
    summary = tr.fit()
    assert summary["iterations"] == 3 and math.isfinite(summary["last_loss"])


def test_crops_larger_than_the_image_upsample(tmp_path):
    """RandomResizedCrop semantics: a box inside the image, resized to the crop size, whatever
    the image size (down to 1x1): the crop is an upsampled part of the image."""
    rng = np.random.default_rng()
    root = tmp_path / "small" / "c"
    root.mkdir(parents=True)
    colours = {}
    for i, (h, w) in enumerate([(1, 1), (5, 3), (12, 9), (20, 31), (7, 7), (2, 40), (16, 16), (9, 1)]):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(root / f"{i}.png")
        colours[i] = colour
    cfg = MultiCropConfig(root=str(root.parent), backend="folder", global_crops_size=32, local_crops_size=16,
                          local_crops_number=2, batch_size=8, num_workers=0)
    loader = build_multicrop_loader(cfg, return_boxes=True)
    g, loc, _, boxes = next(iter(loader))
    assert g.shape == (8, 2, 3, 32, 32) and loc.shape == (8, 2, 3, 16, 16)
    order = loader.batch_indices()[0]
    for j, i in enumerate(order):  # a solid image gives a solid crop of its colour
        want = torch.tensor(colours[int(i)], dtype=torch.int16).view(1, 3, 1, 1)
        assert (g[j].to(torch.int16) - want).abs().max() <= 1
        assert (loc[j].to(torch.int16) - want).abs().max() <= 1
        assert (boxes[j, :, 2:] >= 1).all()
    # and the trainer trains on it
    s = Trainer(tiny_config(root.parent, tmp_path / "out", "train.max_iters=2", "train.threads=1")).fit()
    assert s["iterations"] == 2 and math.isfinite(s["last_loss"])


# ------------------------------------------------------------------------------------ config
def test_mistyped_key_in_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 0.001\n  weight_decya: 0.04\n")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.weight_decya'" in err and "did you mean 'optim.weight_decay'?" in err
    assert main(["trian.epochs=3"]) == 2
    assert "unknown config key 'trian'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_of_another_architecture_is_refused(trained, data_root, caplog):
    out, before = trained
    with caplog.at_level(logging.ERROR, logger="dino_fast.train"):
        assert main(cli_args(data_root, out, "model.out_dim=32", "train.resume=auto", "train.max_iters=4")) == 2
    assert "checkpoint has shape" in caplog.text and "another architecture" in caplog.text
    assert (out / "checkpoint.pth").read_bytes() == before


def test_truncated_checkpoint_is_reported(trained, data_root, caplog):
    out, before = trained
    (out / "checkpoint.pth").write_bytes(before[: len(before) // 3])
    with caplog.at_level(logging.ERROR, logger="dino_fast.train"):
        assert main(cli_args(data_root, out, "train.resume=auto", "train.max_iters=4")) == 2
    assert "truncated or corrupt" in caplog.text and "checkpoint.pth" in caplog.text


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(data_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    tr = Trainer(tiny_config(data_root, out, "train.max_iters=8", "train.checkpoint_every_iters=2",
                             "train.threads=1"))
    real_save = ck.atomic_save
    calls = {"n": 0}

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk_on_second(obj, path):
        calls["n"] += 1
        if calls["n"] != 2:
            return real_save(obj, path)
        real_fsync = os.fsync  # the checkpoint after iteration 3: the disk fills up during it
        os.fsync = no_space
        try:
            return real_save(obj, path)
        finally:
            os.fsync = real_fsync

    monkeypatch.setattr(ck, "atomic_save", full_disk_on_second)
    with pytest.raises(ck.CheckpointError, match="the disk is full.*the previous checkpoint.pth is intact") as ei:
        tr.fit()
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOSPC
    st = ck.load_checkpoint(out / "checkpoint.pth")
    assert st["iteration"] == 2
    assert not list(out.glob(".checkpoint*.tmp"))
    assert max(read_losses(out)) == 3


# ------------------------------------------------------------------------------------ non-finite
@pytest.mark.parametrize("where,value,expected", [
    ("student", float("nan"), "student_output has a non-finite value (nan) at crop 2, row 1"),
    ("student", float("inf"), "student_output has a non-finite value (inf) at crop 3, row 2"),
    # -inf in a teacher logit leaves the loss finite (softmax weight 0) but poisons the center:
    # only the output check sees it
    ("teacher", float("-inf"), "teacher_output has a non-finite value (-inf) at crop 1, row 0"),
])
def test_non_finite_output_stops_at_that_iteration_with_crop_and_row(data_root, tmp_path, monkeypatch,
                                                                      where, value, expected):
    """check_finite on (the trainer's default): the stop names the iteration, the crop and the
    row; the last good checkpoint is kept (tests/train/test_loop.py covers check_finite off)."""
    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=12", "train.checkpoint_every_iters=2",
                             "train.threads=1"))
    assert tr.cfg.train.check_finite
    module = tr.student if where == "student" else tr.teacher
    orig = module.forward
    calls = {"n": 0}
    crop, row = [int(x) for x in expected.split("at crop ")[1].replace(" row ", "").split(",")]
    batch = tr.cfg.data.batch_size_per_gpu

    def poisoned(x, return_features=False):
        res = orig(x, return_features=return_features)  # the DINO teacher also returns its features
        out = res[0] if return_features else res
        calls["n"] += 1
        if calls["n"] == 6:  # iteration 5
            out = out.clone()
            out[crop * batch + row, 7] = value
        return (out, res[1]) if return_features else out

    monkeypatch.setattr(module, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="at iteration 5") as ei:
        tr.fit()
    assert expected in str(ei.value) and "last good checkpoint" in str(ei.value)
    st = ck.load_checkpoint(tmp_path / "checkpoint.pth")
    assert st["iteration"] == 4
    assert torch.isfinite(st["method"]["state"]["dino_loss.center"]).all()
    for side in ("student", "teacher"):
        assert all(torch.isfinite(v.float()).all() for v in st[side].values())


def test_non_finite_weights_after_the_step_stop_before_the_teacher_is_touched(data_root, tmp_path, monkeypatch):
    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=12", "train.checkpoint_every_iters=2",
                             "train.threads=1"))
    orig_step = tr.optimizer.step
    calls = {"n": 0}

    def step(*a, **k):
        r = orig_step(*a, **k)
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 3
            with torch.no_grad():
                tr.student.backbone.blocks[0].mlp.fc1.weight[5, 2] = float("nan")
            teacher_before.extend(p.detach().clone() for p in tr.teacher.parameters())
        return r

    teacher_before: list[torch.Tensor] = []
    monkeypatch.setattr(tr.optimizer, "step", step)
    with pytest.raises(NonFiniteLossError, match=r"after the optimizer step at iteration 3.*"
                       r"'backbone\.blocks\.0\.mlp\.fc1\.weight'.*index \(5, 2\)"):
        tr.fit()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, tr.teacher.parameters()))
    assert ck.load_checkpoint(tmp_path / "checkpoint.pth")["iteration"] == 2


def test_gradient_overflow_under_the_grad_scaler_skips_the_step(data_root, tmp_path):
    """fp16 autocast needs CUDA here, but the skip logic is the GradScaler's and runs on CPU:
    an inf gradient at iteration 4 (what an fp16 overflow produces) skips that optimizer step
    (student unchanged, scale halved), the teacher still follows, and training goes on."""
    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=8", "train.threads=1"))
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    param = tr.student.backbone.patch_embed.proj.weight
    state = {"it": -1}
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if state["it"] == 4 else g)
    snapshots = {}
    orig = tr.train_step

    def step(g, l, epoch, it, sample_ids=None):
        state["it"] = it
        before = (tr.ema.student_buffer.clone(), tr.ema.teacher_buffer.clone(), tr.scaler.get_scale())
        loss = orig(g, l, epoch, it, sample_ids=sample_ids)
        snapshots[it] = before + (tr.ema.student_buffer.clone(), tr.ema.teacher_buffer.clone(), tr.scaler.get_scale())
        return loss

    tr.train_step = step
    s = tr.fit()
    assert s["iterations"] == 8 and math.isfinite(s["last_loss"]) and sorted(snapshots) == list(range(8))
    assert tr.lr_schedule[0] == 0 and tr.lr_schedule[4] > 0
    for it, (s0, t0, scale0, s1, t1, scale1) in snapshots.items():
        if it == 4:
            assert torch.equal(s0, s1), "the overflowing step must be skipped"
            assert scale1 == scale0 / 2
        elif it > 0:  # at iteration 0 the warm-up learning rate is 0: nothing moves
            assert not torch.equal(s0, s1) and scale1 == scale0
        if it > 0:  # the teacher EMA runs every iteration, the skipped one included
            assert not torch.equal(t0, t1)
        assert torch.isfinite(s1).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast in the trainer needs CUDA (resolve_precision "
                    "refuses fp16 on CPU); the CPU test above covers the GradScaler skip logic")
def test_fp16_on_cuda_runs_with_a_grad_scaler(data_root, tmp_path):
    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=4", "train.precision=fp16"))
    assert tr.scaler.is_enabled()
    s = tr.fit()
    assert s["iterations"] == 4 and math.isfinite(s["last_loss"])


def test_ema_check_finite_names_the_tensor_and_leaves_the_teacher():
    student = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    ema = TeacherEMA(teacher, student, check_finite=True, backend="torch")
    ema.update(0.9)  # finite: applied
    expect = teacher[1].weight.detach().clone()
    with torch.no_grad():
        student[1].weight[2, 4] = float("inf")
    before = ema.teacher_buffer.clone()
    with pytest.raises(NonFiniteEMAError, match=r"'1\.weight' \(3, 5\) holds a non-finite value \(inf\) at index "
                       r"\(2, 4\)"):
        ema.update(0.9)
    assert torch.equal(ema.teacher_buffer, before) and torch.equal(teacher[1].weight, expect)
    off = TeacherEMA(teacher, student, backend="torch")  # the default: no check, no sync
    off.update(0.5)
    assert not torch.isfinite(teacher[1].weight[2, 4])  # the inf went into the teacher silently
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        TeacherEMA(teacher, student, check_finite=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    """The one-read check (aminmax) the trainer and TeacherEMA use, against isfinite().all()."""
    from dino_fast.utils.finite import all_finite

    rng = np.random.default_rng()
    x = torch.randn(int(rng.integers(1, 300)), int(rng.integers(1, 300))).to(dtype)
    y = torch.randn(int(rng.integers(1, 50))).to(dtype)
    assert bool(all_finite(x, y)) and all_finite(x, y).dtype == torch.bool
    for v in (float("nan"), float("inf"), float("-inf")):
        bad = x.clone()
        bad.view(-1)[int(rng.integers(0, x.numel()))] = v
        assert bool(all_finite(bad, y)) is bool(torch.isfinite(bad).all()) is False
        assert bool(all_finite(y, bad)) is False
    big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # finite extremes stay finite
    assert bool(all_finite(big, -big))
    assert bool(all_finite(torch.empty(0, 5, dtype=dtype)))

"""End-to-end CPU training: finite losses, checkpoints, exact resume, non-finite stop, CLI."""
import json
import math

import pytest
import torch

from dino_fast.methods import build_backbone
from dino_fast.train.loop import NonFiniteLossError, Trainer, main
from dino_fast.utils import checkpoint as ck
from tests._train_utils import make_image_folder, read_losses, tiny_config, write_config


def _weights(path):
    st = ck.load_checkpoint(path)
    return st["teacher"], st["student"], st


@pytest.mark.slow
def test_twenty_iterations_and_exact_resume(data_root, tmp_path):
    full = tmp_path / "full"
    s = Trainer(tiny_config(data_root, full, "train.max_iters=20")).fit()
    assert s["iterations"] == 20
    losses = read_losses(full)
    assert sorted(losses) == list(range(20)) and all(math.isfinite(v) for v in losses.values())
    assert (full / "checkpoint.pth").is_file() and (full / "teacher_backbone.pth").is_file()

    part = tmp_path / "part"
    Trainer(tiny_config(data_root, part, "train.max_iters=10")).fit()
    assert ck.load_checkpoint(part / "checkpoint.pth")["iteration"] == 10
    s2 = Trainer(tiny_config(data_root, part, "train.max_iters=20")).fit()
    assert s2["iterations"] == 20 and s2["iterations_run"] == 10
    resumed = read_losses(part)
    assert [resumed[i] for i in range(20)] == [losses[i] for i in range(20)]
    t_full, s_full, ck_full = _weights(full / "checkpoint.pth")
    t_part, s_part, ck_part = _weights(part / "checkpoint.pth")
    for k in t_full:
        assert torch.equal(t_full[k], t_part[k]), k
    for k in s_full:
        assert torch.equal(s_full[k], s_part[k]), k
    assert torch.equal(ck_full["method"]["state"]["dino_loss.center"], ck_part["method"]["state"]["dino_loss.center"])


def test_last_layer_frozen_in_first_epoch_and_teacher_follows(data_root, tmp_path):
    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=3"))
    w0 = tr.student.head.last_layer.weight_v.detach().clone() if hasattr(tr.student.head.last_layer, "weight_v") else None
    before_t = [p.detach().clone() for p in tr.teacher.parameters()]
    tr.fit()
    if w0 is not None:
        assert torch.equal(w0, tr.student.head.last_layer.weight_v.detach())
    moved = [not torch.equal(a, b) for a, b in zip(before_t, tr.teacher.parameters())]
    assert any(moved)
    assert all(not p.requires_grad for p in tr.teacher.parameters())


def test_non_finite_loss_stops_at_that_iteration(data_root, tmp_path, monkeypatch):
    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=12", "train.checkpoint_every_iters=2",
                             "train.check_finite=false"))
    orig = tr.student.forward
    calls = {"n": 0}

    def poisoned(x):
        out = orig(x)
        calls["n"] += 1
        if calls["n"] == 6:  # iteration 5
            out = out.clone()
            out[3, 0] = float("nan")
        return out

    monkeypatch.setattr(tr.student, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="iteration 5"):
        tr.fit()
    st = ck.load_checkpoint(tmp_path / "checkpoint.pth")
    assert st["iteration"] == 4  # the last good checkpoint is kept
    for v in st["student"].values():
        assert torch.isfinite(v.float()).all()


def test_cli_bad_key_and_missing_data(tmp_path, capsys):
    assert main(["optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    code = main([f"data.root={tmp_path / 'nope'}", f"train.output_dir={tmp_path / 'o'}", "train.progress=false"])
    assert code == 2


def test_knn_report_after_training_on_a_custom_folder(data_root, tmp_path):
    from dino_fast.train.loop import run_eval_report

    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=1", f"data.val_root={data_root}",
                             "eval.knn_k=[1]", "eval.image_size=32", "eval.resize_size=32"))
    tr.fit()
    report, linear, _ = run_eval_report(tr, linear=False)
    assert set(report) == {"teacher", "random_init"} and linear == {}
    for res in report.values():
        # val == train here: the nearest neighbour of every image is itself
        assert res["1"]["top1"] == 100.0


def test_linear_report_beside_knn(data_root, tmp_path, capsys):
    """The end-of-training linear probe: teacher and the same random-init twin as the k-NN, and
    `dino-fast train` prints it and writes linear.json."""
    from dino_fast.train.loop import run_eval_report

    args = ["train.max_iters=1", f"data.val_root={data_root}", "eval.knn_k=[1]", "eval.image_size=32",
            "eval.resize_size=32", "eval.linear_epochs=20"]
    tr = Trainer(tiny_config(data_root, tmp_path / "a", *args))
    tr.fit()
    report = run_eval_report(tr).linear
    assert set(report) == {"teacher", "random_init"}
    for res in report.values():
        assert 0 <= res["top1"] <= 100 and res["top5"] == 100.0  # 3 classes: top-5 covers all
        assert res["epochs"] == 20 and res["lr"] > 0
    assert run_eval_report(Trainer(tiny_config(data_root, tmp_path / "b", "train.max_iters=1"))) == ({}, {}, None)
    out = tmp_path / "c"
    cfg_path = write_config(tiny_config(data_root, out, *args, "eval.knn_after_training=true"), tmp_path / "c.yaml")
    assert main(["--config", str(cfg_path)]) == 0
    printed = capsys.readouterr().out
    assert "linear probe on the val split" in printed and "collapse check:" in printed
    assert set(json.loads((out / "linear.json").read_text())) == {"teacher", "random_init"}


def test_eval_report_matches_the_standalone_evaluations(data_root, tmp_path):
    """One feature pass per backbone serves both evaluations: the report equals what
    knn_eval_backbone and linear_eval_backbone (the `dino-fast knn` / `linear` commands) give on
    the same backbones, splits and settings."""
    from dino_fast.eval.knn import knn_eval_backbone
    from dino_fast.eval.linear import linear_eval_backbone
    from dino_fast.train.loop import run_eval_report

    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=2", f"data.val_root={data_root}",
                             "eval.knn_k=[1, 3]", "eval.image_size=32", "eval.resize_size=40",
                             "eval.linear_epochs=5"))
    tr.fit()
    knn, linear, _ = run_eval_report(tr)
    torch.manual_seed(tr.cfg.train.seed + 12345)
    twin = build_backbone(tr.cfg, teacher=True)
    ev = dict(image_size=32, resize_size=40, batch_size=tr.cfg.eval.batch_size)
    for name, backbone in (("teacher", tr.eval_backbone()), ("random_init", twin)):
        want = knn_eval_backbone(backbone, data_root, data_root, ks=(1, 3), **ev)
        for k in ("1", "3"):
            assert knn[name][k] == pytest.approx(want[k], abs=1e-9), (name, k)
        lin = linear_eval_backbone(backbone, data_root, data_root, epochs=5, seed=tr.cfg.train.seed, **ev)
        assert linear[name]["top1"] == pytest.approx(lin["top1"]) and linear[name]["lr"] == lin["lr"]
        assert linear[name]["feature_dim"] == lin["feature_dim"]


def test_eval_report_in_bf16(data_root, tmp_path, monkeypatch):
    """eval.precision=bf16: every feature pass of the report runs under CPU bf16 autocast (fp32:
    none does), the features it hands on stay fp32, and fp16 is refused."""
    import dino_fast.train.loop as loop_mod
    from dino_fast.config import ConfigError

    seen = []
    real = loop_mod.extract_probe_features

    def spy(*a, **kw):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        feats, labels = real(*a, **kw)
        assert feats.dtype == torch.float32
        return feats, labels

    monkeypatch.setattr(loop_mod, "extract_probe_features", spy)
    args = ["train.max_iters=1", f"data.val_root={data_root}", "eval.knn_k=[3]", "eval.image_size=32",
            "eval.resize_size=32"]
    for precision, want in (("bf16", (True, torch.bfloat16)), ("fp32", None)):
        tr = Trainer(tiny_config(data_root, tmp_path / precision, *args, f"eval.precision={precision}"))
        tr.fit()
        seen.clear()
        knn, linear, _ = loop_mod.run_eval_report(tr)
        assert len(seen) == 4 and set(knn) == set(linear) == {"teacher", "random_init"}
        assert all(s == want if want else not s[0] for s in seen), (precision, seen)
    with pytest.raises(ConfigError, match=r"eval.precision must be one of \['fp32', 'bf16', 'auto'\], got 'fp16'"):
        tiny_config(data_root, tmp_path / "b", *args, "eval.precision=fp16")
    # auto: fp32 on a small folder; bf16 on a large one (the threshold lowered to this folder's
    # size) when the training ran in bf16, fp32 when it ran in fp32
    import dino_fast.train.precision as precision_mod

    tr = Trainer(tiny_config(data_root, tmp_path / "auto", *args, "eval.precision=auto"))
    tr.fit()
    n_images = 2 * 24  # data_root is both the train and the val folder
    for threshold, train_precision, want in ((n_images + 1, "bf16", None), (n_images, "bf16", (True, torch.bfloat16)),
                                             (n_images, "fp32", None)):
        monkeypatch.setattr(precision_mod, "EVAL_BF16_MIN_IMAGES", threshold)
        tr.precision = train_precision
        seen.clear()
        loop_mod.run_eval_report(tr, linear=False)
        assert len(seen) >= 4 and all(s == want if want else not s[0] for s in seen), (threshold, train_precision, seen)


def test_resolve_eval_precision() -> None:
    from dino_fast.train.precision import EVAL_BF16_MIN_IMAGES, resolve_eval_precision

    assert resolve_eval_precision("auto", EVAL_BF16_MIN_IMAGES, "bf16") == "bf16"
    assert resolve_eval_precision("auto", EVAL_BF16_MIN_IMAGES - 1, "bf16") == "fp32"
    assert resolve_eval_precision("auto", 10 ** 6, "fp32") == "fp32"
    assert resolve_eval_precision("auto", 10 ** 6, "fp16") == "fp32"
    assert resolve_eval_precision("bf16", 10, "fp32") == "bf16" and resolve_eval_precision("fp32", 10 ** 6, "bf16") == "fp32"
    with pytest.raises(ValueError, match="eval.precision must be auto, bf16 or fp32, got 'fp16'"):
        resolve_eval_precision("fp16", 10, "bf16")
    with pytest.raises(ValueError, match="n_images must be an int >= 0, got -1"):
        resolve_eval_precision("auto", -1, "bf16")


def test_eval_report_skips_the_linear_probe_on_one_class(tmp_path):
    """A val split whose folder names one class: k-NN still runs (every vote is right), the
    linear probe, which needs 2 classes, is skipped instead of failing the finished run."""
    from PIL import Image

    from dino_fast.train.loop import run_eval_report

    root = tmp_path / "one" / "only"
    root.mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (24, 24), (i * 20, 100, 200 - i * 10)).save(root / f"{i}.png")
    tr = Trainer(tiny_config(tmp_path / "one", tmp_path / "out", "train.max_iters=1",
                             f"data.val_root={tmp_path / 'one'}", "eval.knn_k=[1]", "eval.image_size=32",
                             "eval.resize_size=32"))
    tr.fit()
    knn, linear, _ = run_eval_report(tr)
    assert knn["teacher"]["1"]["top1"] == 100.0 and linear == {}


def test_train_warns_when_the_features_barely_beat_random_init(data_root, tmp_path, monkeypatch, caplog):
    """`dino-fast train` reads its own end-of-run k-NN and linear reports: a run that passed every
    collapse check but gained little over its random-init twin gets a warning naming it."""
    import logging

    import dino_fast.train.loop as loop_mod

    def report(k_t, k_r, l_t, l_r):
        knn = {"teacher": {"20": {"top1": k_t, "top5": 50.0}}, "random_init": {"20": {"top1": k_r, "top5": 50.0}}}
        if k_t - k_r < 10:  # run_eval_report adds the grey twin where the gain is small
            knn[loop_mod.GREY_TWIN] = {"20": {"top1": 14.8, "top5": 50.0}}
        linear = {name: {"top1": t, "top5": 50.0, "lr": 0.1, "epochs": 1}
                  for name, t in (("teacher", l_t), ("random_init", l_r))}
        return lambda tr, **kw: loop_mod.EvalReport(knn, linear, 8)  # the fixture's 8 images a class

    for i, ((k_t, k_r, l_t, l_r), want) in enumerate((((13.9, 8.7, 16.1, 14.3), ["k-NN at k=20", "linear probe"]),
                                                      ((77.3, 62.4, 74.9, 64.7), []))):
        cfg_path = write_config(tiny_config(data_root, tmp_path / f"r{i}", "train.max_iters=1",
                                            "eval.knn_after_training=true", f"data.val_root={data_root}"),
                                tmp_path / f"r{i}.yaml")
        monkeypatch.setattr(loop_mod, "run_eval_report", report(k_t, k_r, l_t, l_r))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dino_fast.train"):
            assert main(["--config", str(cfg_path)]) == 0
        got = [r.getMessage() for r in caplog.records if "features barely better than random init" in r.getMessage()]
        assert [m.split(":")[0] for m in got] == want, got
        colour = [r.getMessage() for r in caplog.records if "colour looks like noise here" in r.getMessage()]
        assert len(colour) == (1 if want else 0), colour
        if want:
            assert "14.8 in grey against 8.7 in colour" in colour[0] and "model.grayscale_input=true" in colour[0]
            # the fixture folder holds 8 images a class: both warnings say the evaluation is label-starved
            assert all("has only 8 labelled image(s) in its smallest class" in m for m in got), got


def test_eval_report_counts_the_labels_of_the_smallest_train_class(data_root, tmp_path):
    """labels_per_class: the smallest class among the labels the train features were read with
    (a non-image file is not one); None where there is no labelled folder evaluation."""
    from dino_fast.train.loop import EvalReport, run_eval_report

    root = make_image_folder(tmp_path / "train", n_classes=3, per_class=5)
    extra = make_image_folder(tmp_path / "more", n_classes=3, per_class=4, seed=3)
    for i, f in enumerate(sorted((extra / "class1").iterdir())):  # class1: 5 + 4 images
        f.rename(root / "class1" / f"extra{i}{f.suffix}")
    (root / "class2" / "notes.txt").write_text("not an image")
    next(iter(sorted((root / "class0").iterdir()))).unlink()  # class0: 4 images
    val = make_image_folder(tmp_path / "val", n_classes=3, per_class=2, seed=1)
    ev = ("train.max_iters=1", "eval.knn_k=[1]", "eval.image_size=32", "eval.resize_size=32")
    tr = Trainer(tiny_config(root, tmp_path / "a", f"data.val_root={val}", *ev))
    tr.fit()
    report = run_eval_report(tr, linear=False)
    assert isinstance(report, EvalReport) and report.labels_per_class == 4 and report.linear == {}
    assert set(report.knn) == {"teacher", "random_init"}
    tr = Trainer(tiny_config(root, tmp_path / "b", *ev))  # no val split: nothing evaluated
    tr.fit()
    assert run_eval_report(tr) == EvalReport({}, {}) and run_eval_report(tr).labels_per_class is None


def test_eval_report_reads_the_twin_in_grey_when_the_gain_is_small(data_root, tmp_path, monkeypatch):
    """Only when diagnose_gain fires, and only for a model that reads colour: the random-init
    twin's own weights read in grey, k-NN as knn_eval_backbone gives it."""
    import dino_fast.train.loop as loop_mod
    from dino_fast.eval.knn import knn_eval_backbone
    from dino_fast.train.loop import GREY_TWIN, run_eval_report

    val = make_image_folder(tmp_path / "val", per_class=6, seed=1)
    ev = ("eval.knn_k=[1, 3]", "eval.image_size=32", "eval.resize_size=40", f"data.val_root={val}")
    tr = Trainer(tiny_config(data_root, tmp_path / "a", "train.max_iters=1", *ev))
    tr.fit()
    monkeypatch.setattr(loop_mod, "diagnose_gain", lambda *a, **kw: None)
    assert GREY_TWIN not in run_eval_report(tr, linear=False)[0]
    monkeypatch.setattr(loop_mod, "diagnose_gain", lambda *a, **kw: "barely")
    knn = run_eval_report(tr, linear=False).knn
    torch.manual_seed(tr.cfg.train.seed + 12345)
    twin = build_backbone(tr.cfg, teacher=True)
    twin.grayscale_input = True  # the same weights, read in grey
    want = knn_eval_backbone(twin, data_root, val, ks=(1, 3), image_size=32, resize_size=40,
                             batch_size=tr.cfg.eval.batch_size)
    for k in ("1", "3"):
        assert knn[GREY_TWIN][k] == pytest.approx(want[k], abs=1e-9), k
    assert knn[GREY_TWIN] != knn["random_init"]  # the folder's polygons are coloured: grey changes the figures
    grey = Trainer(tiny_config(data_root, tmp_path / "b", "train.max_iters=1", "model.grayscale_input=true", *ev))
    grey.fit()
    assert GREY_TWIN not in run_eval_report(grey, linear=False)[0]  # already grey: nothing to compare


def test_eval_report_reads_a_large_folder_in_grey_on_a_sample(data_root, tmp_path, monkeypatch):
    """Above the grey reading's cap, the twin is read in grey on every stride-th image of each
    split, and its colour features of the same images are the comparison: both as
    knn_eval_backbone gives them on folders holding only those images."""
    import shutil

    import dino_fast.eval.collapse as collapse_mod
    import dino_fast.train.loop as loop_mod
    from dino_fast.eval.knn import knn_eval_backbone
    from dino_fast.train.loop import GREY_TWIN, GREY_TWIN_COLOUR, run_eval_report

    val = make_image_folder(tmp_path / "val", per_class=6, seed=1)  # 18 val + 24 train images
    ev = ("eval.knn_k=[1, 3]", "eval.image_size=32", "eval.resize_size=40", f"data.val_root={val}")
    tr = Trainer(tiny_config(data_root, tmp_path / "a", "train.max_iters=1", *ev))
    tr.fit()
    monkeypatch.setattr(loop_mod, "diagnose_gain", lambda *a, **kw: "barely")
    monkeypatch.setattr(collapse_mod, "GREY_SAMPLE_IMAGES", 15)  # 42 images: stride 3
    knn = run_eval_report(tr, linear=False).knn
    picked = {}
    for split, root in (("train", data_root), ("val", val)):  # every 3rd file, in the folder's order
        files = sorted(p for p in root.rglob("*.jpg"))
        for f in files[::3]:
            dst = tmp_path / "picked" / split / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
        picked[split] = tmp_path / "picked" / split
    torch.manual_seed(tr.cfg.train.seed + 12345)
    twin = build_backbone(tr.cfg, teacher=True)

    def by_hand():
        return knn_eval_backbone(twin, picked["train"], picked["val"], ks=(1, 3), image_size=32, resize_size=40,
                                 batch_size=tr.cfg.eval.batch_size)

    colour = by_hand()
    twin.grayscale_input = True
    grey = by_hand()
    for k in ("1", "3"):
        assert knn[GREY_TWIN_COLOUR][k] == pytest.approx(colour[k], abs=1e-9), k
        assert knn[GREY_TWIN][k] == pytest.approx(grey[k], abs=1e-9), k
    assert knn[GREY_TWIN] != knn[GREY_TWIN_COLOUR]


def test_knn_report_compares_the_grey_reading_with_its_own_images(caplog):
    """The colour verdict reads the twin's colour figure of the grey reading's own sample where
    there is one, the twin's whole-folder figure otherwise."""
    import logging

    from dino_fast.train.loop import GREY_TWIN, GREY_TWIN_COLOUR, _print_knn_report

    def row(top1):
        return {"20": {"top1": top1, "top5": 50.0}}

    for extra, want in (({GREY_TWIN_COLOUR: row(9.0)}, "14.8 in grey against 9.0 in colour"),
                        ({}, "14.8 in grey against 20.0 in colour")):
        report = {"teacher": row(21.0), "random_init": row(20.0), GREY_TWIN: row(14.8), **extra}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dino_fast.train"):
            _print_knn_report(report)
        assert any(want in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_colour_augmentation_comes_from_the_config(data_root, tmp_path):
    """data.jitter_p / color_jitter / grayscale_p reach the trainer's augmentation; defaults are
    the official ones."""
    tr = Trainer(tiny_config(data_root, tmp_path / "a", "train.max_iters=1"))
    assert tr.augment.jitter_p == 0.8 and tr.augment.grayscale_p == 0.2
    assert tr.augment.jitter_ranges == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    tr = Trainer(tiny_config(data_root, tmp_path / "b", "train.max_iters=1", "data.jitter_p=1.0",
                             "data.color_jitter=[0.2, 0.3, 0.5, 0.5]", "data.grayscale_p=0.6"))
    assert tr.augment.jitter_p == 1.0 and tr.augment.grayscale_p == 0.6
    assert tr.augment.jitter_ranges == ((0.8, 1.2), (0.7, 1.3), (0.5, 1.5), (-0.5, 0.5))


def test_grayscale_input_reaches_every_backbone_and_the_export(data_root, tmp_path):
    """model.grayscale_input: student, teacher, the random-init twin of the evaluation and the
    exported teacher backbone all read grey, and the evaluation's features ignore colour."""
    from dino_fast.eval.knn import load_backbone_from_checkpoint

    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=2", "model.grayscale_input=true"))
    tr.fit()
    assert tr.method.student.backbone.grayscale_input and tr.method.teacher.backbone.grayscale_input
    assert build_backbone(tr.cfg, teacher=True).grayscale_input  # how run_eval_report builds the twin
    exported, cfg = load_backbone_from_checkpoint(tmp_path / "teacher_backbone.pth")
    assert cfg.model.grayscale_input and exported.grayscale_input
    x = torch.randn(2, 3, 32, 32)
    swapped = x[:, [2, 0, 1]]  # other colours, and another luma: the features must differ
    luma_same = x + torch.tensor([0.587 / 0.229, -0.299 / 0.224, 0.0]).view(1, 3, 1, 1) * 0.1  # chroma only
    with torch.no_grad():
        f = exported.eval()(x)
        torch.testing.assert_close(exported(luma_same), f, rtol=1e-4, atol=1e-4)
        assert (exported(swapped) - f).abs().max() > 1e-3


def test_knn_report_skipped_without_val_root(data_root, tmp_path):
    from dino_fast.train.loop import run_eval_report

    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=1"))
    assert run_eval_report(tr) == ({}, {}, None)


def test_auto_precision_on_cpu_follows_native_bf16(tmp_path, monkeypatch):
    """'auto' on CPU: bf16 when /proc/cpuinfo lists avx512_bf16 or amx_bf16, else fp32; explicit
    values pass through; fp16 on CPU is refused."""
    import dino_fast.train.precision as loop_mod
    from dino_fast.config import ConfigError

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert loop_mod.cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_tile amx_bf16\n")
    assert loop_mod.cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not loop_mod.cpu_has_native_bf16(info)
    assert not loop_mod.cpu_has_native_bf16(tmp_path / "missing")
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop_mod, "cpu_has_native_bf16", lambda *a: True)
    assert loop_mod.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(loop_mod, "cpu_has_native_bf16", lambda *a: False)
    assert loop_mod.resolve_precision("auto", cpu) == "fp32"
    assert loop_mod.resolve_precision("bf16", cpu) == "bf16" and loop_mod.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        loop_mod.resolve_precision("fp16", cpu)


def test_bf16_on_cpu_trains_and_resumes_exactly(data_root, tmp_path):
    """bf16 autocast on the CPU (what 'auto' picks on CPUs with native bf16): finite losses and
    the exact-resume guarantee hold as in fp32."""
    full, part = tmp_path / "full", tmp_path / "part"
    s = Trainer(tiny_config(data_root, full, "train.max_iters=8", "train.precision=bf16")).fit()
    assert s["iterations"] == 8 and math.isfinite(s["last_loss"])
    Trainer(tiny_config(data_root, part, "train.max_iters=4", "train.precision=bf16")).fit()
    Trainer(tiny_config(data_root, part, "train.max_iters=8", "train.precision=bf16")).fit()
    a, b = read_losses(full), read_losses(part)
    assert [a[i] for i in range(8)] == [b[i] for i in range(8)]


def test_teacher_momentum_schedule_ends_at_the_configured_value(data_root, tmp_path):
    """optim.momentum_teacher -> optim.momentum_teacher_end by the official cosine (end 1.0 by default)."""
    from dino_fast.utils.schedules import cosine_scheduler

    official = Trainer(tiny_config(data_root, tmp_path / "a", "optim.momentum_teacher=0.9"))
    short = Trainer(tiny_config(data_root, tmp_path / "b", "optim.momentum_teacher=0.9",
                                "optim.momentum_teacher_end=0.95"))
    n = len(official.momentum_schedule)
    assert official.momentum_schedule[0] == short.momentum_schedule[0] == 0.9
    assert official.momentum_schedule[-1] == pytest.approx(1.0, abs=1e-3)
    assert short.momentum_schedule[-1] == pytest.approx(0.95, abs=1e-3)
    e, per = official.cfg.train.epochs, n // official.cfg.train.epochs
    assert list(short.momentum_schedule) == list(cosine_scheduler(0.9, 0.95, e, per))


def test_train_iterations_sets_the_run_length_whatever_the_data_size(data_root, tmp_path):
    """train.iterations=T: ceil(T / iterations per epoch) epochs, T iterations, cosines ending at T."""
    tr = Trainer(tiny_config(data_root, tmp_path / "a", "train.iterations=5", "optim.warmup_epochs=1",
                             "train.epochs=1"))
    n = tr.niter_per_epoch
    assert tr.cfg.train.epochs == -(-5 // n)
    assert len(tr.lr_schedule) == max(tr.cfg.train.epochs * n, 5)
    assert tr.lr_schedule[min(n, 5 // 4)] == pytest.approx(tr.base_lr)  # warm-up: min(1 epoch, 5 // 4) iterations
    assert tr.lr_schedule[4] == pytest.approx(tr.cfg.optim.min_lr + 0.5 * (tr.base_lr - tr.cfg.optim.min_lr)
                                              * (1 + math.cos(math.pi * (4 - 5 // 4) / (5 - 5 // 4))))
    assert tr.freeze_last_layer_iters == min(tr.cfg.optim.freeze_last_layer * n, 5 // 4)
    s = tr.fit()
    assert s["iterations"] == 5
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["epochs"] == tr.cfg.train.epochs
    # resumed in two parts: the same five losses
    Trainer(tiny_config(data_root, tmp_path / "b", "train.iterations=5", "optim.warmup_epochs=1",
                        "train.max_iters=3")).fit()
    s2 = Trainer(tiny_config(data_root, tmp_path / "b", "train.iterations=5", "optim.warmup_epochs=1")).fit()
    assert s2["iterations"] == 5 and s2["iterations_run"] == 2
    assert read_losses(tmp_path / "a") == read_losses(tmp_path / "b")


def test_train_iterations_must_not_be_negative():
    from dino_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.iterations must be >= 0"):
        load_config(None, ["train.iterations=-1"])


def test_compile_mode_reaches_the_blocks_and_cuda_graph_modes_mark_every_step(data_root, tmp_path, monkeypatch):
    """model.compile_mode goes to torch.compile of every block of student and teacher; with a
    CUDA-graph mode each step starts a new cudagraph-trees generation (the previous step's graph
    outputs are dead). The compile itself runs with the eager backend here (inductor's C++ compile
    takes minutes on 2 cores, CUDA graphs need a GPU): the losses match the uncompiled run's."""
    from dino_fast.models.vit import VisionTransformer

    seen: list[dict] = []
    original = VisionTransformer.compile_blocks

    def recording(self, **kw):
        seen.append(dict(kw))
        original(self, backend="eager")

    marks = []
    monkeypatch.setattr(VisionTransformer, "compile_blocks", recording)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    Trainer(tiny_config(data_root, tmp_path / "eager", "train.max_iters=3")).fit()
    assert seen == [] and marks == []
    Trainer(tiny_config(data_root, tmp_path / "graphs", "train.max_iters=3", "model.compile=true",
                        "model.compile_mode=reduce-overhead")).fit()
    assert seen == [{"mode": "reduce-overhead"}] * 2 and len(marks) == 3
    Trainer(tiny_config(data_root, tmp_path / "default", "train.max_iters=3", "model.compile=true")).fit()
    assert seen[2:] == [{}, {}] and len(marks) == 3  # the default mode captures no graphs
    eager, graphs = read_losses(tmp_path / "eager"), read_losses(tmp_path / "graphs")
    assert sorted(graphs) == [0, 1, 2]
    for i in range(3):
        assert graphs[i] == pytest.approx(eager[i], rel=1e-5, abs=1e-6)


def test_compile_mode_is_checked():
    from dino_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.compile_mode='reduce-overhead' needs model.compile=true"):
        load_config(None, ["model.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match=r"model.compile_mode must be one of .*got 'graphs'"):
        load_config(None, ["model.compile=true", "model.compile_mode=graphs"])


def test_a_folder_smaller_than_one_batch_says_how_many_images_and_what_to_set(data_root, tmp_path):
    """Fewer images than one batch: the error counts them and names the largest batch that fits,
    before anything is trained or written."""
    from dino_fast.data.folder import list_image_files

    n = len(list_image_files(data_root)[1])
    with pytest.raises(ValueError, match=rf"holds {n} images, fewer than one batch of {n + 1} per rank over 1 "
                                         rf"rank\(s\) .* lower data.batch_size_per_gpu to at most {n}$"):
        Trainer(tiny_config(data_root, tmp_path / "o", f"data.batch_size_per_gpu={n + 1}"))
    assert not (tmp_path / "o" / "checkpoint.pth").exists()

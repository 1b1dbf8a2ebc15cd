"""Linear probe: accuracy on separable data, the optimum of a Newton-solved logistic regression,
determinism, top-5 semantics, the official probe features of a ViT, and the CLI."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.eval import linear
from dino_fast.eval.linear import (
    LR_GRID,
    extract_probe_features,
    linear_eval,
    main,
    probe_input,
    select_lr,
    train_linear,
)
from dino_fast.models import vit_tiny


def _blobs(n_per_class: int, centers: torch.Tensor, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, d = centers.shape
    y = torch.arange(c).repeat_interleave(n_per_class)
    x = centers[y] + noise * torch.randn(len(y), d, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


# ------------------------------------------------------------------------------ training

def test_separable_blobs_reach_100_percent():
    centers = 4.0 * torch.eye(3, 5)
    x, y = _blobs(60, centers, 0.5, seed=0)
    xv, yv = _blobs(30, centers, 0.5, seed=1)
    res = linear_eval(x, y, xv, yv)
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    assert res["lr"] in LR_GRID and set(res["lr_sweep"]) == {f"{v:g}" for v in LR_GRID}
    assert res["epochs"] == 100 and res["num_classes"] == 3
    json.dumps(res)  # serialisable as the CLI writes it


def _newton_logistic(x: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[np.ndarray, float]:
    """Minimiser of the mean logistic loss of [x, 1] (float64 Newton) and its loss."""
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    beta = np.zeros(xa.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-xa @ beta))
        grad = xa.T @ (p - y) / len(y)
        hess = (xa * (p * (1 - p))[:, None]).T @ xa / len(y)
        beta -= np.linalg.solve(hess, grad)
    z = xa @ beta
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    return beta, loss


def test_full_batch_sgd_reaches_the_logistic_regression_optimum():
    # two overlapping classes (not separable, so the optimum is finite)
    centers = torch.tensor([[1.0, 0.0, 0.5], [-0.5, 1.0, 0.0]])
    x, y = _blobs(100, centers, 1.0, seed=3)
    beta, opt_loss = _newton_logistic(x.double().numpy(), y.double().numpy())
    lin = train_linear(x, y, 2, epochs=1500, lr=0.5, batch_size=len(y), momentum=0.9)
    # a 2-class softmax is a logistic regression on the difference of the two rows
    w_diff = (lin.weight[1] - lin.weight[0]).detach().double().numpy()
    b_diff = float((lin.bias[1] - lin.bias[0]).detach())
    np.testing.assert_allclose(np.append(w_diff, b_diff), beta, rtol=1e-3, atol=1e-4)
    loss = F.cross_entropy(lin(x).detach().double(), y).item()
    assert loss == pytest.approx(opt_loss, abs=1e-6) and loss >= opt_loss - 1e-7
    z = np.concatenate([x.double().numpy(), np.ones((len(x), 1))], axis=1) @ beta
    assert torch.equal(lin(x).argmax(dim=1), torch.from_numpy((z > 0).astype(np.int64)))


def test_official_init_and_deterministic():
    x, y = _blobs(20, torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), 1.0, seed=0)
    a = train_linear(x, y, 4, epochs=5, seed=7)
    b = train_linear(x, y, 4, epochs=5, seed=7)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    c = train_linear(x, y, 4, epochs=5, seed=8)
    assert not torch.equal(a.weight, c.weight)
    assert linear_eval(x, y, x, y, seed=7) == linear_eval(x, y, x, y, seed=7)
    # no step at all: the official init N(0, 0.01), bias 0
    init = train_linear(x, y, 4, epochs=1, lr=1e-30)
    assert init.bias.abs().max().item() < 1e-20
    assert init.weight.std().item() == pytest.approx(0.01, rel=0.3)


def test_sweep_skips_diverged_rates():
    x, y = _blobs(30, 3.0 * torch.eye(2, 4), 1.0, seed=0)
    lr, sweep = select_lr(x * 1e4, y, 2, lrs=(1e-3, 1e6), epochs=20)  # 1e6 on 1e4-scaled features diverges
    assert lr == 1e-3
    lr, sweep = select_lr(x, y, 2, lrs=(1e-4, 0.3), epochs=30)
    assert lr == 0.3 and sweep["0.3"] >= sweep["0.0001"]


def test_stratified_folds_deal_each_class_evenly():
    """Every sample of a class with >= 2 samples lies in exactly one fold, each class spread as
    evenly as the folds allow; singletons are never held out; the seed fixes the deal."""
    y = torch.tensor([0] * 23 + [1] * 10 + [2] * 4 + [3])
    fold = linear._stratified_folds(y, 10, seed=0)
    assert fold.shape == y.shape and fold.dtype == torch.long
    assert fold[y == 3].tolist() == [-1]
    for c, n in ((0, 23), (1, 10), (2, 4)):
        counts = torch.bincount(fold[y == c], minlength=10)
        assert int(counts.sum()) == n and int(counts.max() - counts.min()) <= 1, (c, counts)
    assert torch.equal(fold, linear._stratified_folds(y, 10, seed=0))
    assert not torch.equal(fold, linear._stratified_folds(y, 10, seed=1))


def test_small_sweeps_cross_validate_and_pool_every_fold():
    """Under min_holdout held-out samples the sweep scores each lr on all 10 folds pooled:
    the same figures as fitting fold by fold by hand; at min_holdout=0 the single split as before."""
    centers = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    x, y = _blobs(15, centers, 1.5, seed=0)  # 60 samples: a 10 % split would hold 4
    lrs = (1e-3, 0.03, 1.0)
    lr, sweep = select_lr(x, y, 4, lrs=lrs, epochs=8, batch_size=16, seed=5)
    fold = linear._stratified_folds(y, 10, seed=5)
    correct, ce = torch.zeros(len(lrs), dtype=torch.float64), torch.zeros(len(lrs), dtype=torch.float64)
    for f in range(10):
        held = fold == f
        w, b = linear._fit_sgd(x[~held], y[~held], 4, lrs, epochs=8, batch_size=16, weight_decay=0.0,
                               momentum=0.9, seed=5)
        for i in range(len(lrs)):
            logits = x[held] @ w[i].T + b[i]
            correct[i] += (logits.argmax(1) == y[held]).sum().item()
            ce[i] += F.cross_entropy(logits, y[held], reduction="sum").item()
    want = (100.0 * correct / len(y)).tolist()
    assert [sweep[f"{v:g}"] for v in lrs] == pytest.approx(want, abs=1e-9)
    best = min(range(len(lrs)), key=lambda i: (-want[i], ce[i].item(), lrs[i]))
    assert lr == lrs[best]
    # min_holdout=0: one stratified 10 % split, as for large sets
    lr0, sweep0 = select_lr(x, y, 4, lrs=lrs, epochs=8, batch_size=16, seed=5, min_holdout=0)
    fit_idx, held_idx = linear._stratified_split(y, 0.1, 5)
    w, b = linear._fit_sgd(x[fit_idx], y[fit_idx], 4, lrs, epochs=8, batch_size=16, weight_decay=0.0,
                           momentum=0.9, seed=5)
    acc0, _ = linear._scores(w, b, x[held_idx], y[held_idx])
    assert [sweep0[f"{v:g}"] for v in lrs] == pytest.approx(acc0, abs=1e-9)
    assert sweep0 != sweep  # 4 held-out samples score in steps of 25 points, the pooled folds finer
    # a split of at least min_holdout samples is used as it is
    assert select_lr(x, y, 4, lrs=lrs, epochs=8, batch_size=16, seed=5, min_holdout=4) == (lr0, sweep0)
    assert select_lr(x, y, 4, lrs=lrs, epochs=8, batch_size=16, seed=5, min_holdout=5) == (lr, sweep)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="min_holdout must be an int >= 0, got "):
            select_lr(x, y, 4, lrs=lrs, epochs=1, min_holdout=bad)


def test_top5_semantics():
    x, y = _blobs(10, torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), 3.0, seed=0)
    res = linear_eval(x, y, x, y, epochs=3, lr=0.01)
    assert res["top5"] == 100.0 and res["lr_sweep"] is None  # 3 classes: all of them are in the top 5
    # 10 classes: top-1 / top-5 equal a direct count on the same (deterministic) classifier
    centers = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    x, y = _blobs(12, centers, 2.0, seed=0)
    xv, yv = _blobs(8, centers, 2.0, seed=1)
    res = linear_eval(x, y, xv, yv, epochs=10, lr=0.05, seed=3)
    lin = train_linear(x, y, 10, epochs=10, lr=0.05, seed=3)
    ranks = lin(xv).argsort(dim=1, descending=True)
    assert res["top1"] == pytest.approx(100.0 * (ranks[:, 0] == yv).double().mean().item())
    assert res["top5"] == pytest.approx(100.0 * (ranks[:, :5] == yv[:, None]).any(dim=1).double().mean().item())
    assert res["top5"] >= res["top1"]


def test_bad_training_inputs():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_linear(x, torch.zeros(10, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got values in \[0, 4\]"):
        train_linear(x, torch.arange(10) % 5, 2)
    with pytest.raises(ValueError, match=r"expected shape \(10,\)"):
        train_linear(x, y[:5], 2)
    with pytest.raises(TypeError, match="integer tensor"):
        train_linear(x, y.float(), 2)
    with pytest.raises(ValueError, match="lr must be a finite float > 0"):
        train_linear(x, y, 2, lr=0.0)
    with pytest.raises(ValueError, match="feature dims differ"):
        linear_eval(x, y, torch.randn(4, 5), y[:4])


# ------------------------------------------------------------------------------ features

def _manual_tokens(model, images, n):
    x = model.prepare_tokens(images)
    out = []
    for i, blk in enumerate(model.blocks):
        x = blk(x)
        if i >= len(model.blocks) - n:
            out.append(model.norm(x))
    return out


@pytest.mark.parametrize("n,avgpool", [(1, False), (2, False), (1, True), (2, True)])
def test_extract_probe_features_of_a_tiny_vit(n, avgpool):
    torch.manual_seed(0)
    model = vit_tiny(patch_size=16, img_size=32, depth=2, attn_backend="math").train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 1, 0])),
               (torch.randn(2, 3, 32, 32, generator=g), torch.tensor([1, 1]))]
    feats, labels = extract_probe_features(model, batches, "cpu", n_last_blocks=n, avgpool_patchtokens=avgpool)
    D = model.embed_dim
    assert not model.training and not feats.requires_grad
    assert feats.shape == (5, D * n + (D if avgpool else 0)) and feats.dtype == torch.float32
    assert labels.tolist() == [0, 1, 0, 1, 1] and labels.dtype == torch.int64
    with torch.no_grad():
        images = torch.cat([b[0] for b in batches])
        toks = _manual_tokens(model, images, n)
        cls = torch.cat([t[:, 0] for t in toks], dim=1)
        if avgpool:
            pooled = toks[-1][:, 1:].mean(dim=1)
            if n == 1:  # official eval_linear.py layout: [cls_0, avg_0, cls_1, avg_1, ...]
                expected = torch.stack([cls, pooled], dim=2).reshape(5, -1)
                assert torch.equal(expected[:, 0::2], cls) and torch.equal(expected[:, 1::2], pooled)
            else:
                expected = torch.cat([cls, pooled], dim=1)
        else:
            expected = cls
        torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
        if n == 1 and not avgpool:  # the backbone's own output
            torch.testing.assert_close(feats, model(images), rtol=1e-5, atol=1e-5)


def test_probe_input_layouts():
    a = torch.arange(2 * 3 * 2.0).view(2, 3, 2)  # B=2, CLS + 2 patches, D=2
    b = a + 100
    assert probe_input([a]).tolist() == [[0.0, 1.0], [6.0, 7.0]]
    assert probe_input([a, b]).tolist() == [[0.0, 1.0, 100.0, 101.0], [6.0, 7.0, 106.0, 107.0]]
    # n=1 avgpool: interleaved (official); patch mean of sample 0 = [(2+4)/2, (3+5)/2] = [3, 4]
    assert probe_input([a], True)[0].tolist() == [0.0, 3.0, 1.0, 4.0]
    assert probe_input([a, b], True)[0].tolist() == [0.0, 1.0, 100.0, 101.0, 103.0, 104.0]


def test_extract_probe_features_bad_inputs():
    model = vit_tiny(patch_size=16, img_size=32, depth=2)
    with pytest.raises(ValueError, match="only 2 blocks"):
        extract_probe_features(model, [], "cpu", n_last_blocks=3)
    with pytest.raises(ValueError, match="positive int"):
        extract_probe_features(model, [], "cpu", n_last_blocks=0)
    with pytest.raises(ValueError, match="no batches"):
        extract_probe_features(model, [], "cpu")
    with pytest.raises(TypeError, match="get_intermediate_layers"):
        extract_probe_features(torch.nn.Linear(2, 2), [], "cpu")


# ------------------------------------------------------------------------------ CLI

def _png_folder(root: Path, classes: list[str], per_class: int, seed: int) -> Path:
    """PNG images, class c a vertical stripe pattern of period c + 2 plus noise."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            base = (np.arange(40) % (c + 2) == 0).astype(np.float64)[None, :, None] * 200
            arr = np.clip(base + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A run directory with teacher_backbone.pth and its config.json, as training exports them."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    vit = vit_tiny(patch_size=8, img_size=32, depth=1)
    torch.save(vit.state_dict(), out / "teacher_backbone.pth")
    cfg = {"model": {"arch": "vit_tiny", "patch_size": 8, "depth": 1},
           "data": {"global_crops_size": 32}, "eval": {"image_size": 32, "resize_size": 36}}
    (out / "config.json").write_text(json.dumps(cfg))
    return out / "teacher_backbone.pth"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return (_png_folder(root / "train", ["a", "b"], 6, seed=0), _png_folder(root / "val", ["a", "b"], 3, seed=1))


def test_cli_prints_top1_and_writes_json(exported_run, folders, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["--checkpoint", str(exported_run), "--train", str(folders[0]), "--val", str(folders[1]),
               "--epochs", "20", "--avgpool", "--device", "cpu", "--num-workers", "0", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" in printed
    res = json.loads(out.read_text())
    assert 0.0 <= res["top1"] <= 100.0 and res["top5"] == 100.0  # 2 classes
    assert res["feature_dim"] == 2 * 192 and res["avgpool_patchtokens"] is True and res["epochs"] == 20


def test_cli_bad_input_returns_2(exported_run, folders, tmp_path, capsys):
    train, val = str(folders[0]), str(folders[1])
    common = ["--epochs", "1", "--device", "cpu", "--num-workers", "0"]
    assert main(["--checkpoint", str(tmp_path / "missing.pth"), "--train", train, "--val", val, *common]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["--checkpoint", str(exported_run), "--train", str(tmp_path / "nope"), "--val", val, *common]) == 2
    assert "--train" in capsys.readouterr().err
    one = _png_folder(tmp_path / "one", ["a"], 3, seed=2)
    assert main(["--checkpoint", str(exported_run), "--train", str(one), "--val", str(one), *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dino-fast linear:") and "at least 2 classes" in err and err.count("\n") == 1
    other = _png_folder(tmp_path / "other", ["a", "c"], 2, seed=3)
    assert main(["--checkpoint", str(exported_run), "--train", train, "--val", str(other), *common]) == 2
    assert "different classes" in capsys.readouterr().err
    assert main(["--checkpoint", str(exported_run), "--train", train, "--val", val, "--n-last-blocks", "2",
                 *common]) == 2
    assert "only 1 blocks" in capsys.readouterr().err


# ------------------------------------------------------------------------------ import rules

def test_linear_imports_follow_the_rules():
    path = Path(linear.__file__)
    allowed = {"dino_fast.eval.knn", "dino_fast.data"}
    for node in ast.parse(path.read_text()).body:  # module level
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) else [])
        for mod in names:
            root = mod.split(".")[0]
            assert root in sys.stdlib_module_names or root in ("torch", "numpy") or mod in allowed, mod
    for node in ast.walk(ast.parse(path.read_text())):  # anywhere, deferred ones included
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dino_fast"):
            assert node.module in allowed, node.module
    code = ("import sys; import dino_fast.eval.linear; "
            "bad = [m for m in sys.modules if m.startswith(('dino_fast.train', 'dino_fast.loss', 'dino_fast.ema'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(path.parents[2]))
    assert r.returncode == 0, r.stdout + r.stderr

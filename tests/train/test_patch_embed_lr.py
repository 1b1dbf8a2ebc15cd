"""optim.patch_embed_lr_mult (the official Mugs and DINOv2 patch-embedding lr x 0.2): the param
groups of every method's student, the effective lr of every parameter in a trainer step, the
config and checkpoint errors, and the exact resume with a multiplier != 1."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dino_fast.config import ConfigError, load_config
from dino_fast.methods import build_method
from dino_fast.train.loop import Trainer
from dino_fast.train.optim import build_adamw, param_groups
from dino_fast.utils import checkpoint as ck
from tests._train_utils import read_losses, tiny_config

PATCH = {"backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"}


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("method", ["dino", "dinov2", "mugs"])
def test_groups_split_the_patch_embedding_and_keep_the_decay_rule(tmp_path, method):
    student = build_method(tiny_config(tmp_path, tmp_path / "o", f"method.name={method}")).student
    plain = param_groups(student)
    assert [g["name"] for g in plain] == ["regularized", "not_regularized"]
    assert [(g["lr_mult"], g["scheduled_wd"]) for g in plain] == [(1.0, True), (1.0, False)]
    groups = param_groups(student, 0.2)
    assert [g["name"] for g in groups] == ["regularized", "not_regularized", "patch_embed_regularized",
                                           "patch_embed_not_regularized"]
    assert [g["lr_mult"] for g in groups] == [1.0, 1.0, 0.2, 0.2]
    assert [g["scheduled_wd"] for g in groups] == [True, False, True, False]
    assert [g.get("weight_decay") for g in groups] == [None, 0.0, None, 0.0]
    names = [_names(student, g) for g in groups]
    assert names[2] == {"backbone.patch_embed.proj.weight"} and names[3] == {"backbone.patch_embed.proj.bias"}
    # the other parameters keep their official group, and every trainable parameter is in exactly one group
    assert names[0] == _names(student, plain[0]) - PATCH and names[1] == _names(student, plain[1]) - PATCH
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert sum(len(s) for s in names) == len(trainable) and set().union(*names) == trainable


def test_bad_multipliers_and_models_without_patch_embedding_are_refused():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    assert len(param_groups(m, 1.0)) == 2  # no multiplier: nothing to look for
    with pytest.raises(ValueError, match=r"patch_embed_lr_mult=0.2 but Sequential has no trainable parameter of "
                                         r"a 'patch_embed' module"):
        param_groups(m, 0.2)
    for bad in (-0.1, float("nan"), float("inf"), True, "0.2"):
        with pytest.raises(ValueError, match=r"patch_embed_lr_mult must be a finite number >= 0 \(1.0: no multiplier\), "
                                             r"got "):
            build_adamw(m, bad)


def test_config_option_is_validated():
    assert load_config(None, []).optim.patch_embed_lr_mult == 1.0
    assert load_config(None, ["optim.patch_embed_lr_mult=0.2"]).optim.patch_embed_lr_mult == 0.2
    for raw, shown in (("-0.5", "-0.5"), (".nan", "nan"), (".inf", "inf")):
        with pytest.raises(ConfigError, match=rf"optim.patch_embed_lr_mult must be a finite number >= 0 \(1.0: the "
                                              rf"official DINO, 0.2: the official Mugs and DINOv2; 0 freezes the patch "
                                              rf"embedding\), got {shown}"):
            load_config(None, [f"optim.patch_embed_lr_mult={raw}"])
    with pytest.raises(ConfigError, match=r"optim.patch_embed_lr_mult expects a number, got 'fast' \(str\)"):
        load_config(None, ["optim.patch_embed_lr_mult=fast"])


@pytest.mark.parametrize("method", ["dino", "mugs"])
def test_effective_lr_of_every_parameter_in_a_trainer_step(data_root, tmp_path, method):
    """One train_step at an iteration with lr > 0 on a fresh AdamW: every parameter moves by
    lr_eff x g / (|g| + eps) plus its decoupled decay lr_eff x wd x p, with lr_eff the schedule's
    lr x 0.2 for the patch embedding and x 1 for the rest; the groups hold those lrs afterwards."""
    tr = Trainer(tiny_config(data_root, tmp_path, f"method.name={method}", "optim.patch_embed_lr_mult=0.2",
                             "optim.clip_grad=0"))
    it = tr.niter_per_epoch  # after the 1-epoch warm-up and the last-layer freeze
    lr, wd = float(tr.lr_schedule[it]), float(tr.wd_schedule[it])
    assert lr > 0 and wd > 0
    names = {id(p): n for n, p in tr.student.named_parameters()}
    before = {n: p.detach().clone() for n, p in tr.student.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def keep_grads(opt, args, kwargs) -> None:
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone()

    tr.optimizer.register_step_pre_hook(keep_grads)
    n_global, n_local = 2 + tr.method.extra_global_crops(tr.cfg), tr.cfg.data.local_crops_number
    g = torch.Generator().manual_seed(0)
    tr.train_step(torch.randint(0, 256, (4, n_global, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 256, (4, n_local, 3, 16, 16), dtype=torch.uint8, generator=g), 1, it)
    lrs = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}
    assert lrs == {"regularized": lr, "not_regularized": lr, "patch_embed_regularized": lr * 0.2,
                   "patch_embed_not_regularized": lr * 0.2}
    assert PATCH <= set(grads)
    regularized = {names[id(p)] for grp in tr.optimizer.param_groups if grp["scheduled_wd"] for p in grp["params"]}
    for n, p in tr.student.named_parameters():
        if n not in grads:
            continue
        eff = lr * (0.2 if n in PATCH else 1.0)
        decay = wd if n in regularized else 0.0
        gr = grads[n].double()
        want = before[n].double() * (1 - eff * decay) - eff * gr / (gr.abs() + 1e-8)
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-3 * eff + 2e-7, msg=n)


@pytest.mark.slow
def test_resume_is_bit_exact_with_a_multiplier(data_root, tmp_path):
    """mult 0.2: 8 iterations in one run equal 4 + 4 resumed (losses, student, teacher, AdamW
    state), and the resumed groups keep the multiplier."""
    extra = ("method.name=mugs", "optim.patch_embed_lr_mult=0.2")
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(tiny_config(data_root, full, "train.max_iters=8", *extra)).fit()
    Trainer(tiny_config(data_root, part, "train.max_iters=4", *extra)).fit()
    resumed = Trainer(tiny_config(data_root, part, "train.max_iters=8", *extra))
    resumed.fit()
    assert [g["lr_mult"] for g in resumed.optimizer.param_groups] == [1.0, 1.0, 0.2, 0.2]
    assert read_losses(full) == read_losses(part) and len(read_losses(full)) == 8
    a, b = ck.load_checkpoint(full / "checkpoint.pth"), ck.load_checkpoint(part / "checkpoint.pth")
    for key in ("student", "teacher"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for k, v in a["method"]["state"].items():
        assert torch.equal(v, b["method"]["state"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def test_resume_with_another_group_layout_is_refused(data_root, tmp_path):
    Trainer(tiny_config(data_root, tmp_path, "train.max_iters=1")).fit()
    tr = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=2", "optim.patch_embed_lr_mult=0.2"))
    with pytest.raises(ck.CheckpointError, match=r"has optimizer param groups \['regularized', 'not_regularized'\], "
                                                 r"this run builds \['regularized', 'not_regularized', "
                                                 r"'patch_embed_regularized', 'patch_embed_not_regularized'\] "
                                                 r"\(optim.patch_embed_lr_mult=0.2"):
        tr.maybe_resume()

"""optim.layerwise_decay (DINOv2's layer-wise lr decay): the rate of every parameter against
DINOv2's rule, the groups (with the patch-embedding multiplier too), the lr a trainer step sets,
config errors, and the resume refusal when the layout differs."""
from __future__ import annotations

import pytest

from dino_fast.config import ConfigError, load_config
from dino_fast.methods import build_method
from dino_fast.train.loop import Trainer
from dino_fast.train.optim import layer_lr_rate, param_groups
from dino_fast.utils import checkpoint as ck
from tests._train_utils import tiny_config


def test_rate_follows_dinov2s_rule():
    L, d = 4, 0.9
    assert layer_lr_rate("backbone.cls_token", d, L) == pytest.approx(d ** 5)
    assert layer_lr_rate("backbone.pos_embed", d, L) == pytest.approx(d ** 5)
    assert layer_lr_rate("backbone.patch_embed.proj.weight", d, L) == pytest.approx(d ** 5)
    assert layer_lr_rate("backbone.mask_token", d, L) == pytest.approx(d ** 5)
    assert layer_lr_rate("backbone.blocks.0.attn.qkv.weight", d, L) == pytest.approx(d ** 4)
    assert layer_lr_rate("backbone.blocks.3.mlp.fc2.bias", d, L) == pytest.approx(d)
    assert layer_lr_rate("backbone.norm.weight", d, L) == 1.0
    assert layer_lr_rate("head.mlp.0.weight", d, L) == 1.0
    assert layer_lr_rate("ibot_head.last_layer.weight", d, L) == 1.0


@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_groups_carry_the_rate_times_the_patch_multiplier(tmp_path, method):
    cfg = tiny_config(tmp_path, tmp_path / "o", f"method.name={method}")
    student = build_method(cfg).student
    depth = student.backbone.depth
    groups = param_groups(student, 0.2, 0.9, depth)
    names = {id(p): n for n, p in student.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            want = layer_lr_rate(n, 0.9, depth) * (0.2 if ".patch_embed." in n else 1.0)
            assert g["lr_mult"] == pytest.approx(want), (g["name"], n)
            assert g["scheduled_wd"] == (not (n.endswith(".bias") or p.ndim == 1))
            seen.add(n)
    assert seen == {n for n, p in student.named_parameters() if p.requires_grad}
    assert len({g["name"] for g in groups}) == len(groups)
    assert [g["name"] for g in param_groups(student, 0.2, 1.0, depth)] == [g["name"] for g in param_groups(student, 0.2)]
    with pytest.raises(ValueError, match=r"layerwise_decay must be a number in \(0, 1\]"):
        param_groups(student, 1.0, 1.5, depth)
    with pytest.raises(ValueError, match="needs the backbone depth"):
        param_groups(student, 1.0, 0.9, 0)


def test_config_and_trainer_step(data_root, tmp_path):
    for bad in ("0", "1.5", "-0.9"):
        with pytest.raises(ConfigError, match=r"optim.layerwise_decay must be a number in \(0, 1\]"):
            load_config(None, [f"optim.layerwise_decay={bad}"])
    tr = Trainer(tiny_config(data_root, tmp_path, "optim.layerwise_decay=0.8", "train.max_iters=2"))
    it = 1
    g, loc, _ = next(iter(tr.loader))
    tr.train_step(g, loc, 0, it, sample_ids=tr.loader.batch_indices()[0])
    for group in tr.optimizer.param_groups:
        assert group["lr"] == pytest.approx(tr.lr_schedule[it] * group["lr_mult"])
    depth = tr.method.student.backbone.depth
    mults = sorted({round(gr["lr_mult"], 9) for gr in tr.optimizer.param_groups})
    assert mults[0] == pytest.approx(0.8 ** (depth + 1)) and mults[-1] == 1.0
    tr.save(0, 1)
    other = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=2"))
    with pytest.raises(ck.CheckpointError, match="optim.layerwise_decay=1.0"):
        other.maybe_resume()

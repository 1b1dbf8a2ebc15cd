"""The dinov2 method: its terms equal DINOv2's formulas restated in float64 on the step's own
network outputs (local + global DINO terms with swapped teacher crops, iBOT forward_masked,
KoLeo), the student sees masked global crops, heads shared or separate, Sinkhorn-Knopp mode,
masks from the batch info, and the config checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_fast.config import ConfigError
from dino_fast.methods import BatchInfo, build_method
from dino_fast.reference.ibot import ibot_patch_loss_reference
from dino_fast.reference.loss import koleo_loss_reference
from dino_fast.reference.sinkhorn import sinkhorn_knopp_reference
from tests._loss_utils import rel
from tests._train_utils import tiny_config


def _crops(B=4, n_local=2):
    g = [torch.randn(B, 3, 32, 32) for _ in range(2)]
    return g + [torch.randn(B, 3, 16, 16) for _ in range(n_local)]


def _dinov2_dino_terms(s_cls, t_targets, B, n_local):
    """DINOv2's dino_local_crops_loss + dino_global_crops_loss (ssl_meta_arch), float64:
    local crops against both teacher crops, global crops against the swapped teacher crops x 2."""
    n_terms = 2 * n_local + 2
    s = s_cls.double()
    logp = F.log_softmax(s / 0.1, dim=-1)
    t0, t1 = t_targets[:B], t_targets[B:2 * B]
    local = 0.0
    for v in range(n_local):
        lp = logp[(2 + v) * B:(3 + v) * B]
        for t in (t0, t1):
            local = local - (t * lp).sum(-1).mean()
    swapped = torch.cat([t1, t0])
    glob = -(swapped * logp[:2 * B]).sum(-1).mean() * 2
    return (local + glob) / n_terms


@pytest.mark.parametrize("separate", [False, True])
def test_terms_equal_dinov2_formulas_on_the_step_outputs(separate, data_root, tmp_path):
    extra = ["method.name=dinov2", "loss.koleo_weight=0.1", f"dinov2.ibot_separate_head={str(separate).lower()}"]
    if separate:
        extra.append("dinov2.ibot_out_dim=48")
    cfg = tiny_config(data_root, tmp_path, *extra)
    torch.manual_seed(0)
    m = build_method(cfg)
    assert (m.student.ibot_head is not None) == separate
    assert any(k.startswith("ibot_head.") for k in m.student.state_dict()) == separate
    c_dino = 0.1 * torch.randn_like(m.dino_loss.center)
    c_ibot = 0.1 * torch.randn_like(m.ibot_loss.center)
    m.dino_loss.center.copy_(c_dino)
    m.ibot_loss.center.copy_(c_ibot)
    B = 4
    crops = _crops(B)
    m.set_batch_info(BatchInfo(seed=3, epoch=1, batch=2, sample_ids=np.arange(10, 14)))
    masks = torch.from_numpy(m.masks_for(B, it=99, epoch=1))
    assert masks.shape == (2 * B, 16) and masks.any(1).sum() == B  # half of the 8 global crops masked
    out = m.forward_step(crops, epoch=1, it=99)
    assert list(out.terms) == ["dino", "ibot", "koleo"] and out.terms["koleo"].weight == 0.1
    s_cls, t_cls = out.outputs["student_output"][0], out.outputs["teacher_output"][0]
    temp = m.dino_loss.teacher_temp_at(1)
    t_targets = F.softmax((t_cls.double() - c_dino.double()) / temp, dim=-1)
    want = _dinov2_dino_terms(s_cls, t_targets, B, 2)
    assert rel(out.terms["dino"].value.detach(), want) < 1e-5
    sp, tp = out.outputs["student_patch_output"][0], out.outputs["teacher_patch_output"][0]
    assert sp.shape == (int(masks.sum()), 48 if separate else 64)
    want_ibot = ibot_patch_loss_reference(sp.double(), tp.double(), masks, c_ibot.double(), student_temp=0.1,
                                          teacher_temp=temp)
    assert rel(out.terms["ibot"].value.detach(), want_ibot) < 1e-5
    # KoLeo: per global crop on the student's backbone CLS features of the masked crops
    feats = m.student(crops, masks, n_global=2)["cls_features"][: 2 * B].detach().double()
    want_k = sum(koleo_loss_reference(f) for f in feats.chunk(2))
    assert rel(out.terms["koleo"].value.detach(), want_k) < 1e-4
    # both centers moved, towards this step's teacher outputs
    assert not torch.equal(m.dino_loss.center, c_dino) and not torch.equal(m.ibot_loss.center, c_ibot)
    out.total().backward()
    assert m.student.backbone.mask_token.grad is not None and m.student.backbone.mask_token.grad.abs().sum() > 0


def test_student_sees_masked_crops_and_teacher_unmasked(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path, "method.name=dinov2")
    m = build_method(cfg)
    with torch.no_grad():
        m.student.backbone.mask_token.normal_()
    crops = _crops()
    masks = torch.zeros(8, 16, dtype=torch.bool)
    masks[0, :5] = True
    m.eval()
    with torch.no_grad():
        a = m.student(crops, masks, apply_masks=True)
        b = m.student(crops, masks, apply_masks=False)
        plain = m.student(crops, None)
    assert not torch.allclose(a["cls_logits"][0], b["cls_logits"][0])  # masked crop changed
    torch.testing.assert_close(a["cls_logits"][1:8], b["cls_logits"][1:8])  # unmasked crops untouched
    torch.testing.assert_close(b["cls_logits"], plain["cls_logits"])
    assert a["patch_logits"].shape == (5, 64) and "patch_logits" not in plain


def test_sinkhorn_mode_uses_dinov2_targets(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path, "method.name=dinov2", "loss.centering=sinkhorn_knopp")
    m = build_method(cfg)
    out = m.forward_step(_crops(), epoch=0, it=0)
    temp = m.dino_loss.teacher_temp_at(0)
    t_cls = out.outputs["teacher_output"][0].double()
    want = _dinov2_dino_terms(out.outputs["student_output"][0], sinkhorn_knopp_reference(t_cls, temp), 4, 2)
    assert rel(out.terms["dino"].value.detach(), want) < 1e-5
    masks = torch.from_numpy(m.masks_for(4, 0, 0))
    sp, tp = out.outputs["student_patch_output"][0].double(), out.outputs["teacher_patch_output"][0].double()
    q = sinkhorn_knopp_reference(tp, temp)
    w = (1 / masks.sum(-1).double().clamp(min=1)).unsqueeze(1).expand(masks.shape)[masks]
    want_i = -((q * F.log_softmax(sp / 0.1, dim=-1)).sum(-1) * w).sum() / masks.shape[0]
    assert rel(out.terms["ibot"].value.detach(), want_i) < 1e-5
    assert not m.dino_loss.center.any() and not m.ibot_loss.center.any()


def test_masks_follow_the_batch_info(data_root, tmp_path):
    m = build_method(tiny_config(data_root, tmp_path, "method.name=dinov2"))
    m.set_batch_info(BatchInfo(seed=1, epoch=0, batch=0, sample_ids=np.arange(4)))
    a = m.masks_for(4, 0, 0)
    m.set_batch_info(BatchInfo(seed=1, epoch=0, batch=0, sample_ids=np.arange(4)))
    assert np.array_equal(a, m.masks_for(4, 7, 3))  # the batch info decides, not (it, epoch)
    m.set_batch_info(BatchInfo(seed=1, epoch=0, batch=1, sample_ids=np.arange(4)))
    assert not np.array_equal(a, m.masks_for(4, 0, 0))
    with pytest.raises(ValueError, match="3 sample ids for a batch of 4"):
        m.set_batch_info(BatchInfo(seed=1, epoch=0, batch=0, sample_ids=np.arange(3)))
        m.masks_for(4, 0, 0)


@pytest.mark.parametrize("override,match", [
    ("dinov2.mask_sample_probability=1.5", r"dinov2.mask_sample_probability must be in \[0, 1\]"),
    ("dinov2.mask_ratio_min_max=[0.5,0.1]", r"dinov2.mask_ratio_min_max must be \(lo, hi\)"),
    ("dinov2.ibot_loss_weight=-1", r"dinov2.ibot_loss_weight must be a finite number >= 0"),
    ("dinov2.mask_max_patches_fraction=0", r"dinov2.mask_max_patches_fraction must be in \(0, 1\]"),
    ("dinov2.ibot_out_dim=32", r"dinov2.ibot_out_dim=32 needs dinov2.ibot_separate_head=true"),
    ("dinov2.ibot_head_hidden_dim=-2", r"dinov2.ibot_head_hidden_dim must be >= 0"),
    ("dinov2.nope=1", r"unknown config key 'dinov2.nope'"),
])
def test_config_checks(override, match, data_root, tmp_path):
    with pytest.raises(ConfigError, match=match):
        tiny_config(data_root, tmp_path, "method.name=dinov2", override)

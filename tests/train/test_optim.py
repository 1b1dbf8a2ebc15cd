"""Per-parameter clipping, global clipping, last-layer freezing and parameter groups, against the
official formulas (the per-parameter clip is dino_fast.reference's copy of the official loop)."""
import pytest
import torch
from torch import nn

from dino_fast.reference.optim import clip_gradients_reference
from dino_fast.train.optim import cancel_gradients_last_layer, clip_gradients, param_groups


def _model():
    m = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.Linear(13, 5))
    m.last_layer = nn.Linear(5, 3, bias=False)
    return m


def test_per_param_clip_matches_official():
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    for p, q in zip(a.parameters(), b.parameters()):
        p.grad = torch.randn_like(p) * torch.rand(()) * 10
        q.grad = p.grad.clone()
    norms = clip_gradients(a.parameters(), 3.0, "per_param")
    ref_norms = clip_gradients_reference(list(b.parameters()), 3.0)
    torch.testing.assert_close(norms, torch.tensor(ref_norms))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
        assert p.grad.norm() <= 3.0 + 1e-4


def test_global_clip():
    m = _model()
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 5
    grads = [p.grad.clone() for p in m.parameters()]
    total = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    out = clip_gradients(m.parameters(), 1.0, "global")
    torch.testing.assert_close(out, total)
    coef = min(1.0, 1.0 / (total.item() + 1e-6))
    for p, g in zip(m.parameters(), grads):
        torch.testing.assert_close(p.grad, g * coef)
    with pytest.raises(ValueError, match="clip mode"):
        clip_gradients(m.parameters(), 1.0, "layer")


def test_last_layer_frozen_only_in_first_epochs():
    m = _model()
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    cancel_gradients_last_layer(0, m, freeze_last_layer=1)
    assert m.last_layer.weight.grad is None
    assert all(p.grad is not None for n, p in m.named_parameters() if "last_layer" not in n)
    m.last_layer.weight.grad = torch.ones_like(m.last_layer.weight)
    cancel_gradients_last_layer(1, m, freeze_last_layer=1)
    assert m.last_layer.weight.grad is not None


def test_param_groups_official_rule():
    m = _model()
    groups = param_groups(m)
    reg = {id(p) for p in groups[0]["params"]}
    noreg = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    for name, p in m.named_parameters():
        expected_noreg = name.endswith(".bias") or p.ndim == 1
        assert (id(p) in noreg) == expected_noreg and (id(p) in reg) != expected_noreg

"""The backbone registry, forward_features and the optional mask token."""
from __future__ import annotations

import pytest
import torch

from dino_fast.config import ConfigError, load_config
from dino_fast.models import BACKBONES, VisionTransformer, backbone_names, create_backbone, register_backbone, vit_tiny


def test_builtin_backbones_and_errors() -> None:
    assert {"vit_tiny", "vit_small", "vit_base"} <= set(backbone_names())
    m = create_backbone("vit_tiny", patch_size=8, img_size=32, depth=1)
    assert isinstance(m, VisionTransformer) and m.embed_dim == 192
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'; registered: .*vit_small"):
        create_backbone("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("vit_tiny")(lambda **kw: None)


def test_registered_backbone_is_a_valid_model_arch(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="model.arch must be one of"):
        load_config(None, ["model.arch=vit_toy"])
    monkeypatch.setitem(BACKBONES, "vit_toy", lambda **kw: vit_tiny(depth=1, **kw))
    assert load_config(None, ["model.arch=vit_toy"]).model.arch == "vit_toy"


def test_forward_features_matches_forward_and_blocks() -> None:
    m = vit_tiny(patch_size=8, img_size=32, depth=2, attn_backend="math").eval()
    x = torch.randn(3, 3, 32, 32)
    out = m.forward_features(x)
    assert set(out) == {"x_norm_clstoken", "x_norm_patchtokens", "x_prenorm", "masks"} and out["masks"] is None
    assert out["x_norm_patchtokens"].shape == (3, 16, 192) and out["x_prenorm"].shape == (3, 17, 192)
    torch.testing.assert_close(out["x_norm_clstoken"], m(x), rtol=0, atol=0)
    torch.testing.assert_close(out["x_norm_patchtokens"], m.norm(out["x_prenorm"])[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(m.get_intermediate_layers(x, 1)[0][:, 1:], out["x_norm_patchtokens"], rtol=0, atol=0)


def test_mask_token_replaces_masked_patches_only() -> None:
    torch.manual_seed(0)
    plain = vit_tiny(patch_size=8, img_size=32, depth=1, attn_backend="math")
    assert plain.mask_token is None and "mask_token" not in plain.state_dict()  # official keys
    m = vit_tiny(patch_size=8, img_size=32, depth=1, attn_backend="math", mask_token=True)
    assert m.mask_token.shape == (1, 192) and torch.count_nonzero(m.mask_token) == 0
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3] = masks[1, 0] = True
    tok = m.prepare_tokens(x, masks)
    ref = m.prepare_tokens(x)
    pos = m.interpolate_pos_encoding(ref, 32, 32)
    torch.testing.assert_close(tok[0, 4], m.mask_token[0] + pos[0, 4])  # CLS is token 0: patch 3 is token 4
    torch.testing.assert_close(tok[1, 1], m.mask_token[0] + pos[0, 1])
    keep = torch.ones(2, 17, dtype=torch.bool)
    keep[0, 4] = keep[1, 1] = False
    assert torch.equal(tok[keep], ref[keep])
    out = m.forward_features(x, masks)
    assert out["masks"] is masks
    with pytest.raises(ValueError, match="no mask token"):
        plain.forward_features(x, masks)
    with pytest.raises(ValueError, match=r"masks must be a bool tensor of shape \(2, 16\)"):
        m.forward_features(x, masks[:, :8])

"""MultiCropWrapper: grouped passes equal per-crop passes; packed (block-diagonal) path; errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dino_fast.models import DINOHead, MultiCropWrapper, group_by_resolution, vit_tiny, xformers_status

HAS_CUDA = torch.cuda.is_available()
XF_OK, XF_REASON = xformers_status("cuda" if torch.cuda.is_available() else None)
needs_xformers = pytest.mark.skipif(
    not (HAS_CUDA and XF_OK),
    reason="the fused BlockDiagonalMask path runs on CUDA with xformers only: "
    + ("no CUDA device" if not HAS_CUDA else XF_REASON),
)


def _model(depth: int = 2, out_dim: int = 64, **kw) -> MultiCropWrapper:
    backbone = vit_tiny(16, depth=depth, attn_backend="sdpa")
    head = DINOHead(192, out_dim, hidden_dim=96, bottleneck_dim=32)
    return MultiCropWrapper(backbone, head, **kw)


def _crops(B: int, n_global: int = 2, n_local: int = 8, device: str = "cpu") -> list[torch.Tensor]:
    return ([torch.randn(B, 3, 224, 224, device=device) for _ in range(n_global)]
            + [torch.randn(B, 3, 96, 96, device=device) for _ in range(n_local)])


def test_multicrop_equals_each_crop_alone() -> None:
    """[2 x 224, 8 x 96]: rows i*B + b of the wrapper output equal crop i run alone."""
    B = 2
    model = _model().eval()
    crops = _crops(B)
    with torch.no_grad():
        out = model(crops)
        alone = [model.head(model.backbone(c)) for c in crops]
    assert out.shape == (10 * B, 64)
    for i, ref in enumerate(alone):
        torch.testing.assert_close(out[i * B:(i + 1) * B], ref, rtol=0, atol=1e-5)


def test_one_backbone_pass_per_resolution_and_one_head_pass() -> None:
    model = _model(depth=1).eval()
    calls: dict[str, list[tuple[int, ...]]] = {"backbone": [], "head": []}
    model.backbone.register_forward_hook(lambda m, a, o: calls["backbone"].append(tuple(a[0].shape)))
    model.head.register_forward_hook(lambda m, a, o: calls["head"].append(tuple(a[0].shape)))
    with torch.no_grad():
        model(_crops(2))
    assert calls["backbone"] == [(4, 3, 224, 224), (16, 3, 96, 96)]
    assert calls["head"] == [(20, 192)]
    calls["backbone"].clear()
    x = [torch.randn(2, 3, 224, 224), torch.randn(2, 3, 96, 96), torch.randn(2, 3, 224, 224)]
    with torch.no_grad():
        model(x)
    assert calls["backbone"] == [(2, 3, 224, 224), (2, 3, 96, 96), (2, 3, 224, 224)]  # consecutive runs only


def test_group_by_resolution() -> None:
    t = lambda s: torch.empty(1, 3, *s)  # noqa: E731
    assert group_by_resolution([t((224, 224))] * 2 + [t((96, 96))] * 8) == [(0, 2), (2, 10)]
    assert group_by_resolution([t((96, 96)), t((96, 64)), t((96, 64))]) == [(0, 1), (1, 3)]
    assert group_by_resolution([t((32, 32))]) == [(0, 1)]


def test_single_tensor_input_and_backbone_head_replaced() -> None:
    model = _model(depth=1).eval()
    assert isinstance(model.backbone.head, nn.Identity) and isinstance(model.backbone.fc, nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.backbone(x)), rtol=0, atol=0)


def test_packed_backbone_equals_grouped_forward_and_gradients() -> None:
    """forward_packed (all crops in one token sequence, per-sequence reference attention) equals
    the grouped passes, values and parameter gradients."""
    B = 2
    model = _model(depth=2).eval()
    crops = [torch.randn(B, 3, 64, 64) for _ in range(2)] + [torch.randn(B, 3, 32, 32) for _ in range(4)]
    batches = [torch.cat(crops[:2]), torch.cat(crops[2:])]

    feats = model.backbone.forward_packed(batches, backend="sdpa")
    ref = torch.cat([model.backbone(b) for b in batches])
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-5)

    # gradients in float64, so that summation order cannot hide a packing error
    backbone = model.backbone.double()
    batches = [b.double() for b in batches]
    feats = backbone.forward_packed(batches, backend="sdpa")
    ref = torch.cat([backbone(b) for b in batches])
    w = torch.randn_like(ref)
    params = list(backbone.parameters())
    g_packed = torch.autograd.grad((feats * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for (name, _), a, b in zip(backbone.named_parameters(), g_packed, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


def test_training_mode_with_drop_path_runs_and_differs_from_eval() -> None:
    backbone = vit_tiny(16, depth=2, drop_path_rate=0.5, attn_backend="sdpa")
    model = MultiCropWrapper(backbone, DINOHead(192, 32, hidden_dim=64, bottleneck_dim=16))
    crops = _crops(4, 2, 2)
    out_train = model(crops)
    out_train.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        out_eval = model.eval()(crops)
    assert out_train.shape == out_eval.shape == (16, 32)
    assert not torch.allclose(out_train, out_eval)


def test_bad_crops_raise() -> None:
    model = _model(depth=1)
    with pytest.raises(TypeError, match="non-empty list"):
        model([])
    with pytest.raises(ValueError, match=r"crop 1 must be a tensor \[B, C, H, W\]"):
        model([torch.randn(2, 3, 32, 32), torch.randn(3, 32, 32)])
    with pytest.raises(ValueError, match="share batch size"):
        model([torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)])
    with pytest.raises(TypeError, match="forward_packed"):
        MultiCropWrapper(nn.Linear(3, 3), nn.Identity(), fused_attention=True)


@needs_xformers
@pytest.mark.cuda
def test_fused_block_diagonal_wrapper_matches_grouped_on_cuda() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    B = 4
    grouped = _model(depth=4).cuda().eval()
    grouped.backbone.set_attn_backend("xformers")
    fused = _model(depth=4, fused_attention=True).cuda().eval()
    fused.load_state_dict(grouped.state_dict())
    fused.backbone.set_attn_backend("auto")
    crops = _crops(B, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fused(crops), grouped(crops), rtol=0, atol=1e-4)


def test_wrapper_keys_match_official_full_checkpoint_layout() -> None:
    """Official full checkpoints hold the DDP-wrapped MultiCropWrapper: ``module.backbone.*`` and
    ``module.head.*``; without the ``module.`` prefix they load strict into ours."""
    model = _model(depth=2)
    src = _model(depth=2)
    official = {f"module.{k}": v.clone() for k, v in src.state_dict().items()}
    assert {k.split(".")[1] for k in official} == {"backbone", "head"}
    assert "module.backbone.blocks.1.attn.qkv.weight" in official
    assert "module.head.last_layer.weight_v" in official
    model.load_state_dict({k.removeprefix("module."): v for k, v in official.items()}, strict=True)
    x = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src.eval()(x), rtol=0, atol=0)

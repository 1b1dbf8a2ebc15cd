"""ViT and DINO head: official checkpoint layout, numerics against the float64 reference."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import dino_fast
from dino_fast.models import DINOHead, VisionTransformer, WeightNormLinear, vit_base, vit_small, vit_tiny
from dino_fast.models.vit import DropPath, drop_path
from dino_fast.reference.attention import dino_head_reference, pos_embed_reference, vit_reference


# ------------------------------------------------------------------------- official layouts
def official_vit_state_dict(embed_dim: int, depth: int, patch: int, img: int = 224,
                            in_chans: int = 3, mlp_ratio: int = 4) -> dict[str, torch.Tensor]:
    """Random tensors under the documented key names and shapes of the official DINO ViT
    checkpoints (dino_deitsmall16_pretrain.pth and friends), written out by hand."""
    D, M, G = embed_dim, mlp_ratio * embed_dim, img // patch
    sd = {
        "cls_token": torch.randn(1, 1, D) * 0.02,
        "pos_embed": torch.randn(1, G * G + 1, D) * 0.02,
        "patch_embed.proj.weight": torch.randn(D, in_chans, patch, patch) * (in_chans * patch * patch) ** -0.5,
        "patch_embed.proj.bias": torch.randn(D) * 0.02,
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + 0.1 * torch.randn(D), p + "norm1.bias": 0.1 * torch.randn(D),
            p + "attn.qkv.weight": torch.randn(3 * D, D) * D**-0.5, p + "attn.qkv.bias": 0.02 * torch.randn(3 * D),
            p + "attn.proj.weight": torch.randn(D, D) * D**-0.5, p + "attn.proj.bias": 0.02 * torch.randn(D),
            p + "norm2.weight": 1 + 0.1 * torch.randn(D), p + "norm2.bias": 0.1 * torch.randn(D),
            p + "mlp.fc1.weight": torch.randn(M, D) * D**-0.5, p + "mlp.fc1.bias": 0.02 * torch.randn(M),
            p + "mlp.fc2.weight": torch.randn(D, M) * M**-0.5, p + "mlp.fc2.bias": 0.02 * torch.randn(D),
        })
    sd["norm.weight"] = 1 + 0.1 * torch.randn(D)
    sd["norm.bias"] = 0.1 * torch.randn(D)
    return sd


def official_head_state_dict(in_dim: int, out_dim: int, hidden: int, bottleneck: int) -> dict[str, torch.Tensor]:
    """Documented keys of the official DINO head (3 layers, no BatchNorm), random values."""
    return {
        "mlp.0.weight": torch.randn(hidden, in_dim) * in_dim**-0.5, "mlp.0.bias": 0.02 * torch.randn(hidden),
        "mlp.2.weight": torch.randn(hidden, hidden) * hidden**-0.5, "mlp.2.bias": 0.02 * torch.randn(hidden),
        "mlp.4.weight": torch.randn(bottleneck, hidden) * hidden**-0.5, "mlp.4.bias": 0.02 * torch.randn(bottleneck),
        "last_layer.weight_g": 0.5 + torch.rand(out_dim, 1),
        "last_layer.weight_v": torch.randn(out_dim, bottleneck),
    }


@pytest.mark.parametrize("factory,dim,patch", [(vit_tiny, 192, 16), (vit_tiny, 192, 8)])
def test_official_vit_state_dict_loads_strict_and_round_trips(factory, dim: int, patch: int) -> None:
    sd = official_vit_state_dict(dim, 12, patch)
    model = factory(patch)
    model.load_state_dict(sd, strict=True)
    out = model.state_dict()
    assert list(out) == list(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k]), k
    again = factory(patch)
    again.load_state_dict(out, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)


@pytest.mark.parametrize("factory,dim,patch", [(vit_small, 384, 16), (vit_small, 384, 8), (vit_base, 768, 16),
                                               (vit_base, 768, 8)])
def test_small_and_base_have_official_keys_and_shapes(factory, dim: int, patch: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        expected = {k: v.shape for k, v in official_vit_state_dict(dim, 12, patch).items()}
        got = {k: v.shape for k, v in factory(patch).state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("img_hw,patch", [((224, 224), 16), ((96, 96), 16), ((160, 128), 16), ((96, 96), 8)])
def test_loaded_vit_matches_float64_reference(img_hw: tuple[int, int], patch: int) -> None:
    """A loaded official-layout checkpoint gives the official outputs (CLS, intermediate layers,
    last attention), including position-embedding interpolation at other resolutions."""
    depth = 4
    sd = official_vit_state_dict(192, depth, patch)
    model = vit_tiny(patch, depth=depth).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, *img_hw)
    ref = vit_reference(sd, x, patch_size=patch, num_heads=3)
    with torch.no_grad():
        cls = model(x)
        layers = model.get_intermediate_layers(x, n=2)
        attn = model.get_last_selfattention(x)
    torch.testing.assert_close(cls.double(), ref["cls"], rtol=0, atol=2e-5)
    assert len(layers) == 2
    for got, want in zip(layers, ref["layers"][-2:]):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(layers[-1][:, 0], cls, rtol=0, atol=0)
    torch.testing.assert_close(attn.double(), ref["last_attn"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_backend", ["sdpa", "math"])
def test_last_selfattention_rows_sum_to_one_and_match_math(attn_backend: str) -> None:
    model = vit_tiny(16, depth=3, attn_backend=attn_backend).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)
        model.set_attn_backend("math")
        attn_math = model.get_last_selfattention(x)
    n = 1 + (96 // 16) * (128 // 16)
    assert attn.shape == (2, 3, n, n)
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, n), rtol=0, atol=1e-5)
    torch.testing.assert_close(attn, attn_math, rtol=0, atol=1e-6)
    ref = vit_reference(model.state_dict(), x, patch_size=16, num_heads=3)["last_attn"]
    torch.testing.assert_close(attn.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("img_hw,patch", [((96, 96), 16), ((160, 160), 16), ((224, 160), 16), ((96, 64), 8)])
def test_interpolate_pos_encoding_official_numerics(img_hw: tuple[int, int], patch: int) -> None:
    """Against an independent bicubic implementation that samples with the official scale
    factor ``(grid + 0.1) / sqrt(N)`` (not the output size)."""
    model = vit_tiny(patch, depth=1)
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.02)
    n = (img_hw[0] // patch) * (img_hw[1] // patch)
    tokens = torch.zeros(1, n + 1, 192)
    got = model.interpolate_pos_encoding(tokens, *img_hw)
    assert got.shape == (1, n + 1, 192)
    torch.testing.assert_close(got.double(), pos_embed_reference(model.pos_embed.detach(), img_hw, patch),
                               rtol=0, atol=1e-6)


def test_interpolate_pos_encoding_identity_at_training_size() -> None:
    model = vit_tiny(16, depth=1)
    tokens = torch.zeros(2, 197, 192)
    assert model.interpolate_pos_encoding(tokens, 224, 224) is model.pos_embed


def test_vit_attributes_and_factories() -> None:
    for factory, dim, heads in ((vit_tiny, 192, 3), (vit_small, 384, 6)):
        m = factory(8, drop_path_rate=0.1)
        assert isinstance(m, VisionTransformer)
        assert (m.embed_dim, m.patch_size, m.num_heads, m.depth) == (dim, 8, heads, 12)
        assert m.blocks[0].norm1.eps == 1e-6 and m.norm.eps == 1e-6
        assert m.blocks[0].attn.qkv.bias is not None
        probs = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in m.blocks]
        torch.testing.assert_close(torch.tensor(probs), torch.linspace(0, 0.1, 12))
    assert dino_fast.vit_small is vit_small and dino_fast.VisionTransformer is VisionTransformer
    assert dino_fast.DINOHead is DINOHead


def test_vit_rejects_bad_inputs() -> None:
    m = vit_tiny(16, depth=1)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        m(torch.randn(1, 3, 40, 32))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="n must be a positive int"):
        m.get_intermediate_layers(torch.randn(1, 3, 32, 32), n=0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VisionTransformer(embed_dim=100, num_heads=3, depth=1)
    with pytest.raises(ValueError, match="drop_path_rate"):
        vit_tiny(16, drop_path_rate=1.5)


def test_drop_path_per_sample() -> None:
    x = torch.rand(64, 5, 4) + 1.0
    out = drop_path(x, 0.25, training=True)
    kept = torch.isclose(out, x / 0.75).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert bool((kept ^ dropped).all())
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    assert torch.equal(DropPath(0.25).eval()(x), x)


def test_compile_blocks_keeps_keys_and_outputs() -> None:
    model = vit_tiny(16, depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)
        model.compile_blocks(backend="eager")
        after = model(x)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- head
def test_head_construction_emits_no_warning_and_has_official_keys() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = DINOHead(384, 1000)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight_g": (1000, 1), "last_layer.weight_v": (1000, 256),
    }
    assert torch.equal(head.last_layer.weight_g, torch.ones(1000, 1))
    assert not head.last_layer.weight_g.requires_grad
    assert head.last_layer.weight_v.requires_grad
    assert DINOHead(384, 10, norm_last_layer=False).last_layer.weight_g.requires_grad
    last = [n for n, _ in head.named_parameters() if "last_layer" in n]
    assert last == ["last_layer.weight_g", "last_layer.weight_v"]


def test_head_variants_keys() -> None:
    bn = DINOHead(32, 10, use_bn=True, hidden_dim=16, bottleneck_dim=8)
    assert [k for k in bn.state_dict() if "weight" in k] == [
        "mlp.0.weight", "mlp.1.weight", "mlp.3.weight", "mlp.4.weight", "mlp.6.weight", "last_layer.weight_g",
        "last_layer.weight_v"]
    assert "mlp.1.running_mean" in bn.state_dict()
    one = DINOHead(32, 10, nlayers=1, bottleneck_dim=8)
    assert set(one.state_dict()) == {"mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"}


def test_loaded_head_matches_float64_reference() -> None:
    sd = official_head_state_dict(48, 300, 64, 16)
    head = DINOHead(48, 300, hidden_dim=64, bottleneck_dim=16)
    head.load_state_dict(sd, strict=True)
    assert all(torch.equal(head.state_dict()[k], v) for k, v in sd.items())
    x = torch.randn(7, 48)
    torch.testing.assert_close(head(x).double(), dino_head_reference(sd, x), rtol=0, atol=1e-5)
    one_sd = {"mlp.weight": torch.randn(16, 48) * 0.1, "mlp.bias": torch.randn(16) * 0.1,
              "last_layer.weight_g": torch.rand(300, 1) + 0.5, "last_layer.weight_v": torch.randn(300, 16)}
    one = DINOHead(48, 300, nlayers=1, bottleneck_dim=16)
    one.load_state_dict(one_sd, strict=True)
    torch.testing.assert_close(one(x).double(), dino_head_reference(one_sd, x), rtol=0, atol=1e-5)


def test_weight_norm_linear_matches_torch_weight_norm_and_gradients() -> None:
    layer = WeightNormLinear(12, 9).double()
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    # torch's own weight-norm primitive (what the official nn.utils.weight_norm computes)
    torch.testing.assert_close(layer.weight, torch._weight_norm(layer.weight_v, layer.weight_g, 0))
    norms = torch.linalg.vector_norm(layer.weight, dim=1)
    torch.testing.assert_close(norms, layer.weight_g[:, 0])
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, g, v: torch.nn.functional.linear(
        a, v * (g / v.norm(dim=1, keepdim=True))), (x, layer.weight_g, layer.weight_v))
    # and the module's own gradients agree with that function's
    y = layer(x).sum()
    gx, gg, gv = torch.autograd.grad(y, (x, layer.weight_g, layer.weight_v))
    v, g = layer.weight_v.detach().requires_grad_(), layer.weight_g.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    yr = (xr @ (v * (g / v.norm(dim=1, keepdim=True))).t()).sum()
    rx, rg, rv = torch.autograd.grad(yr, (xr, g, v))
    for a, b in ((gx, rx), (gg, rg), (gv, rv)):
        torch.testing.assert_close(a, b)


def test_norm_last_layer_keeps_g_fixed_under_training() -> None:
    head = DINOHead(16, 20, hidden_dim=32, bottleneck_dim=8)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    head(torch.randn(4, 16)).pow(2).sum().backward()
    assert head.last_layer.weight_g.grad is None
    opt.step()
    assert torch.equal(head.last_layer.weight_g, torch.ones(20, 1))
    w = head.last_layer.weight
    torch.testing.assert_close(torch.linalg.vector_norm(w, dim=1), torch.ones(20))


def test_head_rejects_bad_inputs() -> None:
    head = DINOHead(16, 20, hidden_dim=32, bottleneck_dim=8)
    with pytest.raises(ValueError, match=r"features \[\.\.\., 16\]"):
        head(torch.randn(3, 15))
    with pytest.raises(ValueError, match="out_dim must be a positive int"):
        DINOHead(16, 0)
    assert math.isfinite(head(torch.zeros(2, 16)).sum().item())  # zero features: normalize's eps, no NaN


def test_layerscale_blocks_match_the_formula_and_keys() -> None:
    """layerscale_init > 0: every block is x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x)), with
    gamma initialised to the value (DINOv2's keys ls1.gamma / ls2.gamma); 0: the official blocks."""
    from dino_fast.models import vit_tiny

    torch.manual_seed(0)
    plain = vit_tiny(16, depth=2)
    ls = vit_tiny(16, depth=2, layerscale_init=0.25)
    assert not any(".ls" in k for k in plain.state_dict())
    extra = set(ls.state_dict()) - set(plain.state_dict())
    assert extra == {f"blocks.{i}.ls{j}.gamma" for i in range(2) for j in (1, 2)}
    assert all(torch.equal(ls.state_dict()[k], torch.full((192,), 0.25)) for k in extra)
    ls.load_state_dict({**plain.state_dict(), **{k: ls.state_dict()[k] for k in extra}}, strict=True)
    blk = ls.blocks[0].eval()
    x = torch.randn(2, 5, 192)
    with torch.no_grad():
        y = x + 0.25 * blk.attn(blk.norm1(x))
        want = y + 0.25 * blk.mlp(blk.norm2(y))
        torch.testing.assert_close(blk(x), want)
        img = torch.randn(1, 3, 32, 32)
        # gamma = 1 is the plain block
        one = vit_tiny(16, depth=2, layerscale_init=1.0)
        one.load_state_dict({**plain.state_dict(), **{k: torch.ones(192) for k in extra}})
        torch.testing.assert_close(one.eval()(img), plain.eval()(img))
    (ls(torch.randn(2, 3, 32, 32)).sum()).backward()
    assert all(ls.state_dict(keep_vars=True)[k].grad is not None for k in extra)
    for bad in (-1e-5, float("nan"), True):
        with pytest.raises(ValueError, match="layerscale_init"):
            vit_tiny(16, depth=1, layerscale_init=bad)


def test_layerscale_config_key() -> None:
    from dino_fast.config import ConfigError, load_config
    from dino_fast.methods.base import build_backbone

    cfg = load_config(None, ["model.arch=vit_tiny", "model.depth=1", "model.layerscale_init=1.0e-5"])
    net = build_backbone(cfg, teacher=False)
    assert float(net.blocks[0].ls1.gamma[0]) == pytest.approx(1e-5)
    assert not hasattr(build_backbone(load_config(None, ["model.arch=vit_tiny", "model.depth=1"]), teacher=True)
                       .blocks[0].ls1, "gamma")
    with pytest.raises(ConfigError, match="model.layerscale_init"):
        load_config(None, ["model.layerscale_init=-1.0"])


# ------------------------------------------------------------------------- grey input
def _normalise(img: torch.Tensor) -> torch.Tensor:
    from dino_fast.utils.image_stats import IMAGENET_MEAN, IMAGENET_STD
    return (img - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _same_luma_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two RGB images in [0, 1] with the same luma and different colours (and that luma in grey)."""
    g = torch.Generator().manual_seed(3)
    luma = 0.3 + 0.4 * torch.rand(2, 1, 32, 32, generator=g)
    # move along a chroma direction of zero luma: w . d = 0
    d = torch.tensor([0.587, -0.299, 0.0]).view(1, 3, 1, 1)
    chroma = 0.2 * (torch.rand(2, 1, 32, 32, generator=g) - 0.5)
    return luma.expand(-1, 3, -1, -1) + chroma * d, luma.expand(-1, 3, -1, -1).clone()


def test_grayscale_input_sees_luma_only_on_every_forward_path() -> None:
    torch.manual_seed(0)
    net = vit_tiny(8, img_size=32, depth=2, grayscale_input=True).eval()
    plain = vit_tiny(8, img_size=32, depth=2).eval()
    plain.load_state_dict(net.state_dict())  # the same keys: the flag adds no parameter
    assert net.grayscale_input and not plain.grayscale_input
    colour, grey = (_normalise(t) for t in _same_luma_pair())
    with torch.no_grad():
        paths = {
            "forward": lambda m, x: m(x),
            "forward_features": lambda m, x: m.forward_features(x)["x_norm_patchtokens"],
            "get_intermediate_layers": lambda m, x: m.get_intermediate_layers(x, 2)[0],
            "get_last_selfattention": lambda m, x: m.get_last_selfattention(x),
            "forward_packed": lambda m, x: m.forward_packed([x, x[:, :, :16, :16]], backend="sdpa"),
        }
        for name, f in paths.items():
            torch.testing.assert_close(f(net, colour), f(net, grey), rtol=1e-5, atol=1e-5, msg=name)
            # a grey image passes unchanged, so the flag is the plain model on grey images
            torch.testing.assert_close(f(net, grey), f(plain, grey), rtol=1e-5, atol=1e-5, msg=name)
            assert (f(plain, colour) - f(plain, grey)).abs().max() > 1e-3, name  # without it colour counts


def test_grayscale_input_rejects_bad_values_and_config_key() -> None:
    from dino_fast.config import ConfigError, load_config
    from dino_fast.methods.base import build_backbone

    with pytest.raises(ValueError, match="grayscale_input must be a bool, got 1"):
        vit_tiny(16, depth=1, grayscale_input=1)
    with pytest.raises(ValueError, match=r"needs RGB inputs \(in_chans=3\), got in_chans=1"):
        vit_tiny(16, depth=1, in_chans=1, grayscale_input=True)
    on = build_backbone(load_config(None, ["model.arch=vit_tiny", "model.depth=1", "model.grayscale_input=true"]),
                        teacher=True)
    off = build_backbone(load_config(None, ["model.arch=vit_tiny", "model.depth=1"]), teacher=False)
    assert on.grayscale_input is True and off.grayscale_input is False
    with pytest.raises(ConfigError, match="model.grayscale_input"):
        load_config(None, ["model.grayscale_input=2"])

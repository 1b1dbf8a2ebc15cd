"""Attention backends: sdpa / math / xformers agree with the float64 reference; backend dispatch."""
from __future__ import annotations

import logging

import pytest
import torch

import dino_fast.models.attention as attn_mod
from dino_fast.models import Attention, MultiCropWrapper, vit_tiny
from dino_fast.models.attention import packed_attention, resolve_attn_backend, xformers_status
from dino_fast.models.vit import drop_path_packed
from dino_fast.reference.attention import attention_reference, block_diagonal_attention_reference

HAS_CUDA = torch.cuda.is_available()
XF_OK, XF_REASON = xformers_status("cuda" if torch.cuda.is_available() else None)
needs_xformers = pytest.mark.skipif(
    not (HAS_CUDA and XF_OK),
    reason="xformers attention runs on CUDA only (xformers has no CPU operators): "
    + ("no CUDA device" if not HAS_CUDA else XF_REASON),
)


# ------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("img", [224, 96, 160])
@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("batch", [1, 5])
def test_vit_sdpa_matches_math(img: int, patch: int, batch: int) -> None:
    """ViT-Tiny (4 blocks) with sdpa attention equals the explicit-softmax path, fp32 < 1e-5."""
    model = vit_tiny(patch, depth=4, attn_backend="sdpa").eval()
    x = torch.randn(batch, 3, img, img)
    with torch.no_grad():
        out_sdpa = model(x)
        model.set_attn_backend("math")
        out_math = model(x)
    assert out_sdpa.shape == (batch, 192)
    torch.testing.assert_close(out_sdpa, out_math, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("n", [1, 37, 197])
def test_attention_module_matches_float64_reference(backend: str, n: int) -> None:
    """Attention module output and input gradient against the float64 reference."""
    dim, heads, B = 96, 4, 3
    m = Attention(dim, heads, qkv_bias=True, attn_backend=backend)
    x = torch.randn(B, n, dim, requires_grad=True)
    out = m(x)

    xd = x.detach().double().requires_grad_(True)
    qkv = torch.nn.functional.linear(xd, m.qkv.weight.double(), m.qkv.bias.double())
    q, k, v = qkv.reshape(B, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    o, _ = attention_reference(q, k, v)
    ref = torch.nn.functional.linear(o.transpose(1, 2).reshape(B, n, dim), m.proj.weight.double(),
                                     m.proj.bias.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)

    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=1e-5)


def test_math_attention_returns_softmax_weights() -> None:
    m = Attention(64, 2, qkv_bias=True, attn_backend="sdpa").eval()
    x = torch.randn(2, 50, 64)
    out, attn = m(x, return_attention=True)
    assert attn.shape == (2, 2, 50, 50)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 50), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, m(x), rtol=0, atol=1e-5)  # sdpa output agrees with the math one


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_packed_attention_reference_paths(backend: str) -> None:
    """The per-sequence (CPU) packed path equals dense block-diagonal attention in float64."""
    seqlens = [197, 197, 37, 37, 37, 50]
    H, Dh = 3, 16
    q, k, v = (torch.randn(1, sum(seqlens), H, Dh) for _ in range(3))
    out = packed_attention(q, k, v, seqlens, Dh**-0.5, backend)
    ref = block_diagonal_attention_reference(q, k, v, seqlens)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_packed_attention_rejects_mismatched_seqlens() -> None:
    q = torch.randn(1, 100, 2, 8)
    with pytest.raises(ValueError, match="sum to 99 tokens but the packed tensor holds 100"):
        packed_attention(q, q, q, [50, 49], 0.1, "sdpa")
    with pytest.raises(ValueError, match="positive ints"):
        packed_attention(q, q, q, [101, -1], 0.1, "sdpa")
    with pytest.raises(ValueError, match="at least one"):
        packed_attention(q, q, q, [], 0.1, "sdpa")
    with pytest.raises(ValueError, match=r"\[1, T, H, Dh\]"):
        packed_attention(q.expand(2, -1, -1, -1), q, q, [100], 0.1, "sdpa")
    with pytest.raises(ValueError, match="'xformers', 'sdpa' or 'math'"):
        packed_attention(q, q, q, [100], 0.1, "flash")


def test_drop_path_packed_drops_whole_sequences() -> None:
    seqlens = [5, 7, 3, 9, 4, 6, 8, 2]
    x = torch.rand(1, sum(seqlens), 4) + 1.0
    p = 0.5
    out = drop_path_packed(x, seqlens, p, training=True)
    for seg_in, seg_out in zip(x.split(seqlens, 1), out.split(seqlens, 1)):
        kept = torch.allclose(seg_out, seg_in / (1 - p))
        dropped = bool((seg_out == 0).all())
        assert kept != dropped, "a packed sequence must be kept (scaled by 1/keep) or dropped as a whole"
    assert torch.equal(drop_path_packed(x, seqlens, p, training=False), x)


# ------------------------------------------------------------------------- dispatch
def _fake_xformers(monkeypatch: pytest.MonkeyPatch, ok: bool, reason: str = "") -> None:
    monkeypatch.setattr(attn_mod, "xformers_status", lambda device=None: (ok, reason))


def test_auto_picks_sdpa_on_cpu_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    model = vit_tiny(16, depth=1)
    x = torch.randn(1, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="dino_fast.models.attention"):
        model(x)
        model(x)
        model.get_intermediate_layers(x)
    records = [r for r in caplog.records if "attn_backend='auto'" in r.getMessage()]
    assert len(records) == 1
    assert "'sdpa'" in records[0].getMessage() and "cpu" in records[0].getMessage()
    assert model.resolve_attn_backend(torch.device("cpu")) == "sdpa"


def test_auto_picks_math_for_half_precision_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    """bf16/fp16 attention on CPU (inputs or autocast) resolves to the explicit softmax, fp32 to
    SDPA; the outputs under bf16 autocast match an explicit-math model within bf16 rounding, and
    the choice is logged once per dtype."""
    from dino_fast.models.attention import attention_compute_dtype

    assert resolve_attn_backend("auto", "cpu", dtype=torch.bfloat16) == "math"
    assert resolve_attn_backend("auto", "cpu", dtype=torch.float16) == "math"
    assert resolve_attn_backend("auto", "cpu", dtype=torch.float32) == "sdpa"
    assert resolve_attn_backend("sdpa", "cpu", dtype=torch.bfloat16) == "sdpa"  # explicit: honoured
    x = torch.randn(2, 3, 32, 32)
    assert attention_compute_dtype(x) == torch.float32
    assert attention_compute_dtype(x.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_compute_dtype(x) == torch.bfloat16
    assert attention_compute_dtype(torch.zeros(2, dtype=torch.int64)) == torch.int64
    torch.manual_seed(0)
    model = vit_tiny(16, depth=2)
    ref = vit_tiny(16, depth=2, attn_backend="math")
    ref.load_state_dict(model.state_dict())
    with caplog.at_level(logging.INFO, logger="dino_fast.models.attention"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            model(x)
            expected = ref(x)
        model(x)
    msgs = [r.getMessage() for r in caplog.records if "attn_backend='auto'" in r.getMessage()]
    assert len(msgs) == 2, msgs
    assert "'math'" in msgs[0] and "cpu/bfloat16" in msgs[0]
    assert "'sdpa'" in msgs[1]
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=0)


def test_auto_picks_xformers_on_cuda_when_installed(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    _fake_xformers(monkeypatch, True)
    with caplog.at_level(logging.INFO, logger="dino_fast.models.attention"):
        assert resolve_attn_backend("auto", torch.device("cuda")) == "xformers"
    assert "the tensors are on CUDA and its operators run there" in caplog.text
    assert resolve_attn_backend("auto", "cpu") == "sdpa"


def test_auto_picks_sdpa_on_cuda_without_xformers(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    _fake_xformers(monkeypatch, False, "xformers is not installed (pip install 'dino-fast[xformers]')")
    with caplog.at_level(logging.INFO, logger="dino_fast.models.attention"):
        assert resolve_attn_backend("auto", "cuda") == "sdpa"
    assert "xformers is not installed" in caplog.text


class _BrokenXops:
    """An xformers.ops whose binary was built for another torch: imports, but no operator runs."""

    @staticmethod
    def memory_efficient_attention(q, k, v):
        raise NotImplementedError(
            "No operator found for `memory_efficient_attention_forward` with inputs:\n"
            "     query       : shape=(1, 8, 1, 64) (torch.float16)\n"
            "`fa2F@2.5.7-pt` is not supported because:\n    xFormers wasn't build with CUDA support\n"
            "`cutlassF-pt` is not supported because:\n    xFormers wasn't build with CUDA support\n")


class _GoodXops:
    calls: list = []

    @staticmethod
    def memory_efficient_attention(q, k, v):
        _GoodXops.calls.append(q.dtype)
        return q


def test_probe_reports_an_xformers_without_operators() -> None:
    """Seen on an H200 with xformers 0.0.35 (built for torch 2.10) beside torch 2.11: import
    worked, every call raised; 'auto' must then pick sdpa and say why, not crash mid-forward."""
    reason = attn_mod._probe_attention(_BrokenXops, torch.device("cpu"), [torch.float32, torch.float16], "GPU-X")
    assert reason.startswith("xformers is installed but its attention does not run on GPU-X for float32 inputs "
                             "(NotImplementedError: No operator found for `memory_efficient_attention_forward`")
    assert reason.count("xFormers wasn't build with CUDA support") == 1 and "query" not in reason
    assert "python -m xformers.info" in reason
    _GoodXops.calls.clear()
    assert attn_mod._probe_attention(_GoodXops, torch.device("cpu"), [torch.float32, torch.bfloat16], "GPU-X") == ""
    assert _GoodXops.calls == [torch.float32, torch.bfloat16]


def test_cuda_status_uses_the_cached_probe(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(attn_mod, "_xformers_import", lambda: (_BrokenXops, ""))
    monkeypatch.setattr(attn_mod, "_CUDA_PROBES", {0: "xformers is installed but its attention does not run"})
    assert attn_mod.xformers_status() == (True, "")  # import only
    assert attn_mod.xformers_status("cuda:0") == (False, "xformers is installed but its attention does not run")
    with caplog.at_level(logging.INFO, logger="dino_fast.models.attention"):
        assert resolve_attn_backend("auto", "cuda:0") == "sdpa"
    assert "does not run" in caplog.text
    with pytest.raises(ValueError, match="attn_backend='xformers' was requested but xformers is installed but its "
                                         "attention does not run"):
        resolve_attn_backend("xformers", "cuda:0")


def test_explicit_backends_pass_through() -> None:
    for dev in ("cpu", "cuda"):
        assert resolve_attn_backend("sdpa", dev) == "sdpa"
        assert resolve_attn_backend("math", dev) == "math"


def test_impossible_xformers_requests_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_xformers(monkeypatch, True)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_attn_backend("xformers", "cpu")
    assert resolve_attn_backend("xformers", "cuda") == "xformers"
    _fake_xformers(monkeypatch, False, "xformers is not installed (pip install 'dino-fast[xformers]')")
    with pytest.raises(ValueError, match="xformers is not installed"):
        resolve_attn_backend("xformers", "cuda")


def test_real_xformers_request_on_cpu_raises() -> None:
    """Without monkeypatching: an xformers ViT on CPU tensors fails clearly (either reason)."""
    model = vit_tiny(16, depth=1, attn_backend="xformers")
    with pytest.raises(ValueError, match="attn_backend='xformers'"):
        model(torch.randn(1, 3, 32, 32))


def test_bad_backend_names() -> None:
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attn_backend("flash", "cpu")
    with pytest.raises(TypeError, match="must be a str"):
        resolve_attn_backend(None, "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be one of"):
        vit_tiny(16, depth=1, attn_backend="flash")
    model = vit_tiny(16, depth=1)
    with pytest.raises(ValueError, match="must be one of"):
        model.set_attn_backend("triton")


def test_fused_wrapper_on_cpu_raises() -> None:
    from dino_fast.models import DINOHead

    wrapper = MultiCropWrapper(vit_tiny(16, depth=1), DINOHead(192, 16, hidden_dim=32, bottleneck_dim=8),
                               fused_attention=True)
    with pytest.raises(ValueError, match="fused_attention=True .* needs\\s+CUDA tensors with xformers"):
        wrapper([torch.randn(1, 3, 32, 32)])


# ------------------------------------------------------------------------- xformers (CUDA only)
@needs_xformers
@pytest.mark.cuda
@pytest.mark.parametrize("img", [224, 96])
def test_xformers_matches_math_on_cuda(img: int) -> None:
    model = vit_tiny(16, attn_backend="xformers").cuda().eval()
    x = torch.randn(4, 3, img, img, device="cuda")
    with torch.no_grad():
        out_xf = model(x)
        model.set_attn_backend("math")
        out_math = model(x)
    torch.testing.assert_close(out_xf, out_math, rtol=0, atol=1e-4)


@needs_xformers
@pytest.mark.cuda
def test_xformers_block_diagonal_matches_reference_on_cuda() -> None:
    seqlens = [197, 197, 37, 37, 37, 37]
    q, k, v = (torch.randn(1, sum(seqlens), 6, 64, device="cuda") for _ in range(3))
    out = packed_attention(q, k, v, seqlens, 64**-0.5, "xformers")
    ref = block_diagonal_attention_reference(q.cpu(), k.cpu(), v.cpu(), seqlens)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=1e-4)

"""Reference (float64, op by op) for the attention, the ViT forward pass and the DINO head.

Written from the official DINO definitions against a plain state dict, independently of
``dino_fast.models``, so the tests can check the modules (and their checkpoint layout) against
it. Tests and benchmarks only; never used by training.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention in float64.

    Args:
        q, k, v: ``[B, H, N, Dh]`` (any float dtype; computed in float64).
        scale: multiplier of ``q k^T``; default ``Dh ** -0.5``.

    Returns:
        ``(out [B, H, N, Dh], attn [B, H, N, N])`` in float64.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"expected q, k, v of one shape [B, H, N, Dh], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    logits = logits - logits.amax(dim=-1, keepdim=True)
    e = logits.exp()
    attn = e / e.sum(dim=-1, keepdim=True)
    return torch.einsum("bhnm,bhmd->bhnd", attn, v), attn


def block_diagonal_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: Sequence[int], scale: float | None = None
) -> torch.Tensor:
    """Attention over packed sequences with a dense block-diagonal mask, in float64.

    ``q, k, v``: ``[1, T, H, Dh]`` with ``T == sum(seqlens)``. Returns ``[1, T, H, Dh]`` float64 in
    which token ``t`` attends to the tokens of its own sequence only.
    """
    T = q.shape[1]
    if sum(seqlens) != T:
        raise ValueError(f"seqlens sum to {sum(seqlens)}, expected T = {T}")
    seq_id = torch.repeat_interleave(torch.arange(len(seqlens)), torch.as_tensor(list(seqlens)))
    allowed = seq_id[:, None] == seq_id[None, :]  # [T, T]
    qd, kd, vd = (t.double().permute(0, 2, 1, 3) for t in (q, k, v))  # [1, H, T, Dh]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhnd,bhmd->bhnm", qd, kd) * scale
    logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    attn = torch.softmax(logits, dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", attn, vd).permute(0, 2, 1, 3)


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic-convolution weights of the 4 taps around a sample at fraction ``t``."""

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_scale_factor_reference(
    grid: torch.Tensor, out_hw: tuple[int, int], scale_factor: tuple[float, float]
) -> torch.Tensor:
    """Bicubic resize of ``grid [D, h, w]`` to ``out_hw`` sampling with a *given* scale factor
    (align_corners=False, cubic coefficient -0.75, border taps clamped): output pixel ``i`` reads
    source coordinate ``(i + 0.5) / scale_factor - 0.5``. This is the arithmetic that the official
    DINO position-embedding interpolation relies on. Returns ``[D, *out_hw]`` float64.
    """
    g = grid.double()
    D, h, w = g.shape

    def matrix(n_out: int, n_in: int, sf: float) -> torch.Tensor:
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            src = (i + 0.5) / sf - 0.5
            i0 = math.floor(src)
            for tap, wt in zip(range(i0 - 1, i0 + 3), _cubic_weights(src - i0)):
                m[i, min(max(tap, 0), n_in - 1)] += wt
        return m

    rows = matrix(out_hw[0], h, scale_factor[0])  # [H', h]
    cols = matrix(out_hw[1], w, scale_factor[1])  # [W', w]
    return torch.einsum("ih,dhw,jw->dij", rows, g, cols)


def pos_embed_reference(pos_embed: torch.Tensor, img_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Official DINO position embeddings for an image of ``img_hw``: ``pos_embed [1, 1 + N, D]`` ->
    ``[1, 1 + (H/P)*(W/P), D]`` float64 (unchanged for the training grid of a square image;
    otherwise bicubic with ``scale_factor = (H/P + 0.1, W/P + 0.1) / sqrt(N)``)."""
    pe = pos_embed.double()
    N, D = pe.shape[1] - 1, pe.shape[2]
    gh, gw = img_hw[0] // patch_size, img_hw[1] // patch_size
    if gh * gw == N and img_hw[0] == img_hw[1]:
        return pe
    side = int(math.sqrt(N))
    grid = pe[0, 1:].reshape(side, side, D).permute(2, 0, 1)  # [D, side, side]
    sf = ((gh + 0.1) / math.sqrt(N), (gw + 0.1) / math.sqrt(N))
    out = bicubic_scale_factor_reference(grid, (gh, gw), sf)  # [D, gh, gw]
    return torch.cat([pe[:, :1], out.permute(1, 2, 0).reshape(1, gh * gw, D)], dim=1)


def vit_reference(
    state_dict: Mapping[str, torch.Tensor], x: torch.Tensor, *, patch_size: int, num_heads: int, eps: float = 1e-6
) -> dict[str, object]:
    """The official DINO ViT forward pass in float64 from an official-layout state dict.

    Args:
        state_dict: ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``, ``norm.*``.
        x: images ``[B, C, H, W]``.
        patch_size, num_heads: architecture (not recoverable from the keys alone).
        eps: LayerNorm epsilon (1e-6 in the DINO ViTs).

    Returns:
        ``{"cls": [B, D], "layers": [per block: norm(tokens) [B, N, D]], "last_attn": [B, heads, N, N]}``,
        all float64.
    """
    sd = {k: v.double() for k, v in state_dict.items()}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = x.double()
    B, _, H, W = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    t = t.flatten(2).transpose(1, 2)  # [B, n, D]
    D = t.shape[-1]
    t = torch.cat([sd["cls_token"].expand(B, 1, D), t], dim=1)
    t = t + pos_embed_reference(sd["pos_embed"], (H, W), patch_size)

    def ln(z: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(z, (D,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    layers, last_attn = [], None
    for i in range(depth):
        p = f"blocks.{i}."
        h = ln(t, p + "norm1")
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(B, -1, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
        o, last_attn = attention_reference(q, k, v)
        o = o.transpose(1, 2).reshape(B, -1, D)
        t = t + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = ln(t, p + "norm2")
        h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        t = t + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        layers.append(ln(t, "norm"))
    return {"cls": layers[-1][:, 0], "layers": layers, "last_attn": last_attn}


def dino_head_reference(state_dict: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The official DINO head (no BatchNorm) in float64 from its state dict.

    ``mlp.{0,2,4,...}`` Linear layers with GELU between them (or a single ``mlp.weight``), L2
    normalisation, then ``W = weight_g * weight_v / ||weight_v||_row``. ``x [B, in_dim]`` ->
    ``[B, out_dim]`` float64.
    """
    sd = {k: v.double() for k, v in state_dict.items()}
    h = x.double()
    if "mlp.weight" in sd:
        h = F.linear(h, sd["mlp.weight"], sd["mlp.bias"])
    else:
        idx = sorted(int(k.split(".")[1]) for k in sd if k.startswith("mlp.") and k.endswith(".weight"))
        for j, i in enumerate(idx):
            h = F.linear(h, sd[f"mlp.{i}.weight"], sd[f"mlp.{i}.bias"])
            if j < len(idx) - 1:
                h = F.gelu(h)
    h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    v = sd["last_layer.weight_v"]
    weight = sd["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    return h @ weight.t()

"""Vision Transformer with the official DINO state-dict layout and numerics.

Keys (D = embed_dim, P = patch_size, G = img_size // P, L = depth, M = mlp_ratio * D):

    cls_token                    [1, 1, D]
    pos_embed                    [1, G*G + 1, D]
    patch_embed.proj.weight      [D, in_chans, P, P]      patch_embed.proj.bias [D]
    blocks.{i}.norm1.weight/bias [D]
    blocks.{i}.attn.qkv.weight   [3D, D]                  blocks.{i}.attn.qkv.bias [3D]
    blocks.{i}.attn.proj.weight  [D, D]                   blocks.{i}.attn.proj.bias [D]
    blocks.{i}.norm2.weight/bias [D]
    blocks.{i}.mlp.fc1.weight    [M, D]                   blocks.{i}.mlp.fc1.bias [M]
    blocks.{i}.mlp.fc2.weight    [D, M]                   blocks.{i}.mlp.fc2.bias [D]
    norm.weight/bias             [D]

so the published DINO backbone checkpoints load with ``strict=True``. The forward pass is the
official one (pre-norm blocks, LayerNorm eps 1e-6, GELU MLP, CLS token of the final norm),
with the attention computed by a selectable backend (:mod:`dino_fast.models.attention`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dino_fast.utils.image_stats import normalized_to_grayscale

from .attention import Attention, attention_compute_dtype, check_attn_backend, resolve_attn_backend


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample (official semantics): zero a sample's residual branch with
    probability ``drop_prob`` and scale the kept ones by ``1 / (1 - drop_prob)``.

    ``x``: ``[B, ...]`` float; returns the same shape and dtype.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep_prob) * random_tensor


def drop_path_packed(
    x: torch.Tensor, seqlens: Sequence[int], drop_prob: float = 0.0, training: bool = False
) -> torch.Tensor:
    """Stochastic depth per packed sequence: ``x [1, T, C]`` holds ``len(seqlens)`` sequences
    back to back; each sequence is dropped or kept as a whole, as :func:`drop_path` drops a
    sample of an unpacked batch. Returns ``[1, T, C]``.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    per_seq = (keep_prob + torch.rand(len(seqlens), dtype=x.dtype, device=x.device)).floor_()
    lens = torch.as_tensor(list(seqlens), device=x.device)
    random_tensor = per_seq.repeat_interleave(lens, output_size=x.shape[1]).view(1, -1, 1)
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (no parameters)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, ...]`` -> same shape."""
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """``fc1 -> GELU -> dropout -> fc2 -> dropout`` over ``[..., in_features]``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features]`` -> ``[..., out_features]``."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DINOv2, after CaiT): ``x * gamma``, ``gamma [dim]``
    initialised to ``init_values`` (DINOv2: 1e-5). State dict: ``gamma`` (DINOv2's key)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., dim]`` -> ``x * gamma``, same shape and dtype rules as a multiply."""
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, each
    residual branch through drop-path (and, with ``layerscale_init > 0``, a :class:`LayerScale`
    ``ls1`` / ``ls2`` before it, as DINOv2's blocks; 0: none, the official DINO block and keys)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_backend: str = "auto",
        layerscale_init: float = 0.0,
    ) -> None:
        super().__init__()
        if not (isinstance(layerscale_init, (int, float)) and not isinstance(layerscale_init, bool)
                and math.isfinite(layerscale_init) and layerscale_init >= 0):
            raise ValueError(f"layerscale_init must be a finite float >= 0 (0: no LayerScale), got {layerscale_init!r}")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, attn_backend)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, backend: str | None = None, return_attention: bool = False
    ) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N, C]``; with ``return_attention`` the last attention weights
        ``[B, H, N, N]`` of the math path instead (official behaviour).

        ``backend``: resolved attention backend chosen by the caller (``None``: the module's own).
        """
        if return_attention:
            _, attn = self.attn(self.norm1(x), return_attention=True)
            return attn
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), backend=backend)))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward_packed(self, x: torch.Tensor, seqlens: Sequence[int], backend: str) -> torch.Tensor:
        """The block over sequences packed along tokens: ``x [1, T, C]`` -> ``[1, T, C]``; attention
        stays within each sequence and drop-path drops whole sequences."""
        p = self.drop_path.drop_prob if isinstance(self.drop_path, DropPath) else 0.0
        y = self.ls1(self.attn.forward_packed(self.norm1(x), seqlens, backend=backend))
        x = x + drop_path_packed(y, seqlens, p, self.training)
        x = x + drop_path_packed(self.ls2(self.mlp(self.norm2(x))), seqlens, p, self.training)
        return x


class PatchEmbed(nn.Module):
    """Image to patch tokens: ``[B, in_chans, H, W]`` -> ``[B, (H/P)*(W/P), embed_dim]``."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> ``[B, (H/P)*(W/P), embed_dim]`` (row-major patch order)."""
        return self.proj(x).flatten(2).transpose(1, 2)


def _as_img_size(img_size: int | Sequence[int]) -> int:
    if isinstance(img_size, (list, tuple)):  # the official code takes a one-element list
        if len(img_size) == 0:
            raise ValueError("img_size must be an int or a non-empty sequence of ints, got an empty sequence")
        img_size = img_size[0]
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0:
        raise TypeError(f"img_size must be a positive int, got {img_size!r}")
    return img_size


class VisionTransformer(nn.Module):
    """Vision Transformer (official DINO architecture and state-dict keys, see the module doc).

    Args:
        img_size: training resolution that sizes ``pos_embed`` (int, or the official one-element list).
        patch_size: P; inputs must have H and W divisible by P.
        in_chans: input channels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale: architecture.
        drop_rate, attn_drop_rate: dropout rates (0 in DINO).
        drop_path_rate: stochastic depth, increasing linearly from 0 to this over the blocks.
        norm_layer: norm constructor ``f(dim) -> nn.Module`` (default LayerNorm, eps 1e-6).
        attn_backend: ``"auto" | "xformers" | "sdpa" | "math"`` (see :mod:`.attention`).
        mask_token: add a learnt ``mask_token`` ``[1, embed_dim]`` (zero-initialised, as DINOv2)
            that replaces masked patch tokens in :meth:`forward_features`. Off by default, so the
            state dict keeps the official DINO keys (official weights load strict).
        layerscale_init: DINOv2's LayerScale on both residual branches of every block, ``gamma``
            initialised to this (DINOv2: 1e-5; keys ``blocks.{i}.ls1.gamma`` / ``ls2.gamma``); 0 (default):
            none, the official DINO architecture and state dict.
        grayscale_input: read every image in grey: the inputs (RGB normalised with the ImageNet
            mean and std, as every loader gives them) become their luma, normalised again
            (:func:`dino_fast.utils.image_stats.normalized_to_grayscale`), before the patch
            embedding, on every forward path. For image folders whose colours vary at random
            within a class. No parameters: the state dict is the same. Needs ``in_chans=3``.

    Attributes: ``embed_dim`` (= ``num_features``), ``patch_size``, ``num_heads``, ``depth``,
    ``grayscale_input``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        attn_backend: str = "auto",
        mask_token: bool = False,
        layerscale_init: float = 0.0,
        grayscale_input: bool = False,
    ) -> None:
        super().__init__()
        img_size = _as_img_size(img_size)
        for name, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads), ("in_chans", in_chans)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if patch_size > img_size:
            raise ValueError(f"patch_size ({patch_size}) must not exceed img_size ({img_size})")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if not isinstance(grayscale_input, bool):
            raise ValueError(f"grayscale_input must be a bool, got {grayscale_input!r}")
        if grayscale_input and in_chans != 3:
            raise ValueError(f"grayscale_input needs RGB inputs (in_chans=3), got in_chans={in_chans}")
        if norm_layer is None:
            norm_layer = _layer_norm_eps6
        self.grayscale_input = grayscale_input
        self.attn_backend = check_attn_backend(attn_backend)
        self._auto_log: dict[str, str] = {}
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.in_chans = in_chans

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i],
                  norm_layer=norm_layer, attn_backend=attn_backend, layerscale_init=layerscale_init)
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()  # no classifier: MultiCropWrapper and the official code expect this
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        else:
            self.mask_token = None

        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ---------------------------------------------------------------- attention backend
    def set_attn_backend(self, name: str) -> None:
        """Set the attention backend (``"auto" | "xformers" | "sdpa" | "math"``) of every block.

        Validated now against the name; whether it can run is checked against the input device
        at the next forward (raises ``ValueError`` there, e.g. ``"xformers"`` on CPU).
        """
        self.attn_backend = check_attn_backend(name)
        self._auto_log.clear()
        for blk in self.blocks:
            blk.attn.attn_backend = name
            blk.attn._auto_log.clear()

    def resolve_attn_backend(self, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
        """The concrete attention backend the blocks use for inputs on ``device`` computing in
        ``dtype`` (:func:`~dino_fast.models.attention.attention_compute_dtype`; ``"auto"`` logs its
        choice once per model, device type and dtype)."""
        return resolve_attn_backend(self.attn_backend, device, dtype=dtype, log_state=self._auto_log)

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` each block in place (``nn.Module.compile``): state-dict keys stay the
        official ones. ``compile_kwargs`` go to :func:`torch.compile` (``mode=``, ``backend=``,
        ``dynamic=``...). Crops of each resolution give their own compiled graph."""
        for blk in self.blocks:
            blk.compile(**compile_kwargs)

    # ---------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """Position embeddings for tokens ``x [B, npatch + 1, D]`` of an image of size ``w x h``
        (official naming: ``w`` is the size of dim 2 of the image, ``h`` of dim 3).

        Returns ``[1, npatch + 1, D]`` (``pos_embed`` itself when the grid is the training one).
        Other grids use the official numerics: bicubic interpolation of the patch embeddings with
        ``scale_factor = ((w // P + 0.1) / sqrt(N), (h // P + 0.1) / sqrt(N))``.
        """
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_size
        h0 = h // self.patch_size
        # the +0.1 avoids a floating point error in the output size (facebookresearch/dino#8)
        w0, h0 = w0 + 0.1, h0 + 0.1
        side = int(math.sqrt(N))
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        if int(w0) != patch_pos_embed.shape[-2] or int(h0) != patch_pos_embed.shape[-1]:
            raise RuntimeError(
                f"position-embedding interpolation gave a {tuple(patch_pos_embed.shape[-2:])} grid, "
                f"expected {(int(w0), int(h0))}"
            )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected images as a torch.Tensor [B, {self.in_chans}, H, W], got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got {x.dtype}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not divisible by patch_size {self.patch_size}")

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> tokens ``[B, 1 + (H/P)*(W/P), D]`` (CLS first, position
        embeddings added; the images read in grey first when ``grayscale_input``). ``masks``:
        optional bool ``[B, (H/P)*(W/P)]``; True patches are replaced by the mask token before the
        position embeddings are added (as DINOv2)."""
        self._check_images(x)
        B, _, w, h = x.shape
        if self.grayscale_input:
            x = normalized_to_grayscale(x)
        x = self.patch_embed(x)  # [B, n, D]
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given but this VisionTransformer has no mask token "
                                 "(build it with mask_token=True)")
            if masks.dtype != torch.bool or tuple(masks.shape) != tuple(x.shape[:2]):
                raise ValueError(f"masks must be a bool tensor of shape {tuple(x.shape[:2])} "
                                 f"(images, patches), got {masks.dtype} {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # [B, n + 1, D]
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    # ---------------------------------------------------------------- forward passes
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Images ``[B, C, H, W]`` float (and optional bool ``masks [B, N]``) -> a dict:

        - ``x_norm_clstoken``: ``[B, D]`` CLS token after the final norm (what :meth:`forward`
          returns);
        - ``x_norm_patchtokens``: ``[B, N, D]`` patch tokens after the final norm;
        - ``x_prenorm``: ``[B, 1 + N, D]`` all tokens before the final norm;
        - ``masks``: the ``masks`` given (or None).

        N = (H/P)*(W/P). Same keys as DINOv2's ``forward_features``.
        """
        backend = self.resolve_attn_backend(x.device, attention_compute_dtype(x))
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x, backend)
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": x,
                "masks": masks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` float -> CLS features after the final norm ``[B, embed_dim]``."""
        backend = self.resolve_attn_backend(x.device, attention_compute_dtype(x))
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x, backend)
        return self.norm(x)[:, 0]

    def forward_packed(self, xs: Sequence[torch.Tensor], backend: str | None = None) -> torch.Tensor:
        """All crops through each block in one packed sequence (block-diagonal attention).

        Args:
            xs: image batches ``[B_g, C, H_g, W_g]``, one per resolution group.
            backend: ``"xformers"`` (one attention call per block with a ``BlockDiagonalMask``;
                CUDA) or ``"sdpa"``/``"math"`` (per-sequence loop: the reference for this path);
                ``None`` resolves the model's backend against the input device.

        Returns:
            CLS features after the final norm, ``[sum_g B_g, embed_dim]``, in input order:
            the same values as ``torch.cat([self(x) for x in xs])``.
        """
        if len(xs) == 0:
            raise ValueError("forward_packed needs at least one image batch, got none")
        if backend is None:
            backend = self.resolve_attn_backend(xs[0].device, attention_compute_dtype(xs[0]))
        tokens, seqlens = [], []
        for x in xs:
            t = self.prepare_tokens(x)  # [B_g, N_g, D]
            tokens.append(t.reshape(1, -1, t.shape[-1]))
            seqlens += [t.shape[1]] * t.shape[0]
        x = torch.cat(tokens, dim=1)  # [1, T, D]
        if x.shape[1] != sum(seqlens):  # pragma: no cover - guards the packing above
            raise RuntimeError(f"packed {x.shape[1]} tokens but sequence lengths sum to {sum(seqlens)}")
        for blk in self.blocks:
            x = blk.forward_packed(x, seqlens, backend)
        x = self.norm(x)
        starts = torch.tensor([0] + seqlens[:-1], device=x.device).cumsum(0)
        return x[0, starts]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights of the last block ``[B, num_heads, N, N]`` (math path for that
        block, the configured backend for the others); ``N = 1 + (H/P)*(W/P)``."""
        backend = self.resolve_attn_backend(x.device, attention_compute_dtype(x))
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x, backend)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Normalised tokens of the ``n`` last blocks, each ``[B, N, embed_dim]`` (official)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        backend = self.resolve_attn_backend(x.device, attention_compute_dtype(x))
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, backend)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


def _layer_norm_eps6(dim: int) -> nn.LayerNorm:
    """LayerNorm with the DINO ViTs' eps of 1e-6."""
    return nn.LayerNorm(dim, eps=1e-6)


def _vit(embed_dim: int, num_heads: int, patch_size: int, img_size: int, drop_path_rate: float,
         attn_backend: str, kw: dict[str, Any]) -> VisionTransformer:
    kw.setdefault("depth", 12)
    kw.setdefault("mlp_ratio", 4.0)
    kw.setdefault("qkv_bias", True)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads,
                             drop_path_rate=drop_path_rate, attn_backend=attn_backend, **kw)


def vit_tiny(patch_size: int = 16, *, img_size: int = 224, drop_path_rate: float = 0.0,
             attn_backend: str = "auto", **kw: Any) -> VisionTransformer:
    """ViT-Tiny: embed 192, depth 12, 3 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6.

    ``kw`` goes to :class:`VisionTransformer` (e.g. ``depth=`` for a shallower test model).
    """
    return _vit(192, 3, patch_size, img_size, drop_path_rate, attn_backend, kw)


def vit_small(patch_size: int = 16, *, img_size: int = 224, drop_path_rate: float = 0.0,
              attn_backend: str = "auto", **kw: Any) -> VisionTransformer:
    """ViT-Small (DINO's ViT-S/16 and ViT-S/8): embed 384, depth 12, 6 heads."""
    return _vit(384, 6, patch_size, img_size, drop_path_rate, attn_backend, kw)


def vit_base(patch_size: int = 16, *, img_size: int = 224, drop_path_rate: float = 0.0,
             attn_backend: str = "auto", **kw: Any) -> VisionTransformer:
    """ViT-Base (DINO's ViT-B/16 and ViT-B/8): embed 768, depth 12, 12 heads."""
    return _vit(768, 12, patch_size, img_size, drop_path_rate, attn_backend, kw)


def vit_large(patch_size: int = 16, *, img_size: int = 224, drop_path_rate: float = 0.0,
              attn_backend: str = "auto", **kw: Any) -> VisionTransformer:
    """ViT-Large (DINOv2's ViT-L/14 and ViT-L/16): embed 1024, depth 24, 16 heads, MLP ratio 4
    (the plain MLP block, not the SwiGLU of DINOv2's larger models; DINOv2's LayerScale: ``layerscale_init=1e-5``)."""
    kw.setdefault("depth", 24)
    return _vit(1024, 16, patch_size, img_size, drop_path_rate, attn_backend, kw)

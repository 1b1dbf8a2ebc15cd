"""Self-attention maps of the last block's CLS token, and the ``dino-fast attention`` command.

For each head, the CLS token's attention over the patch tokens of the last block, reshaped to the
patch grid and upsampled (nearest, by the patch size) to the image, as the DINO paper shows.
Optionally a mask keeps the smallest set of patches holding a given fraction of the attention
mass (the paper's "threshold" visualisation).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.data.folder import load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# anchor colours of a perceptually ordered dark-to-bright map (black, purple, red, orange, yellow)
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB (shape + (3,)) along a dark-to-bright ramp."""
    v = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (v - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def preprocess(image: Image.Image, image_size: int, patch_size: int) -> tuple[torch.Tensor, Image.Image]:
    """Resize so the shorter side is ``image_size``, crop both sides to multiples of the patch size,
    and normalise. Returns (tensor fp32 [1,3,H,W], the resized RGB PIL image)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = image_size / min(w, h)
    nw, nh = max(patch_size, round(w * scale)), max(patch_size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    nw, nh = nw - nw % patch_size, nh - nh % patch_size
    image = image.crop((0, 0, nw, nh))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std)[None], image


@torch.no_grad()
def cls_attention_maps(backbone: torch.nn.Module, x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """CLS-to-patch attention of the last block, per head, upsampled to the image.

    Args:
        backbone: a ViT with ``get_last_selfattention``.
        x: fp32 [1, 3, H, W] with H, W multiples of ``patch_size``.

    Returns:
        fp32 [heads, H, W]; each head's map sums to 1 over the patch grid before upsampling.
    """
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[2] % patch_size or x.shape[3] % patch_size:
        raise ValueError(f"expected one image [1, 3, H, W] with H, W multiples of {patch_size}, got {tuple(x.shape)}")
    backbone.eval()
    attn = backbone.get_last_selfattention(x)  # [1, heads, N, N]
    heads = attn.shape[1]
    gh, gw = x.shape[2] // patch_size, x.shape[3] // patch_size
    cls = attn[0, :, 0, 1:].reshape(heads, gh, gw).float()
    cls = cls / cls.sum(dim=(1, 2), keepdim=True)
    return F.interpolate(cls[None], scale_factor=patch_size, mode="nearest")[0]


def mass_mask(maps: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean mask per head keeping the smallest set of pixels holding ``keep`` of the mass.

    Args:
        maps: fp32 [heads, H, W], non-negative.
        keep: fraction in (0, 1].
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    flat = maps.flatten(1)
    flat = flat / flat.sum(dim=1, keepdim=True)
    vals, idx = flat.sort(dim=1, descending=True)
    cum = vals.cumsum(dim=1)
    keep_sorted = (cum - vals) < keep  # include the element that crosses the threshold
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, idx, keep_sorted)
    return mask.view_as(maps)


def render_grid(image: Image.Image, maps: torch.Tensor, mask: Optional[torch.Tensor] = None,
                columns: int = 4) -> Image.Image:
    """A PNG-ready grid: the image first, then one coloured map per head (masked pixels dimmed)."""
    w, h = image.size
    tiles = [np.asarray(image.convert("RGB"))]
    for i in range(maps.shape[0]):
        m = maps[i].numpy()
        m = (m - m.min()) / max(m.max() - m.min(), 1e-12)
        rgb = colormap(m)
        if mask is not None:
            rgb = np.where(mask[i].numpy()[..., None], rgb, (rgb * 0.25).astype(np.uint8))
        tiles.append(rgb)
    cols = min(columns, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    pad = 4
    canvas = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), 255, dtype=np.uint8)
    for j, t in enumerate(tiles):
        r, c = divmod(j, cols)
        canvas[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = t
    return Image.fromarray(canvas)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-fast attention --checkpoint CKPT --image IMG --out attn.png [--keep 0.6]``."""
    from dino_fast.eval.knn import load_backbone_from_checkpoint

    p = argparse.ArgumentParser(prog="dino-fast attention", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth or teacher_backbone.pth")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--which", default="teacher", choices=["teacher", "student"])
    p.add_argument("--image-size", type=int, default=None, help="shorter side (default: the run's global crop size)")
    p.add_argument("--keep", type=float, default=None, help="also mask: keep this fraction of the attention mass")
    p.add_argument("--columns", type=int, default=4)
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        backbone, cfg = load_backbone_from_checkpoint(a.checkpoint, a.which)
        try:
            img = load_rgb(a.image)  # the training loader's decoding (16-bit images rescaled, alpha dropped)
        except OSError as e:
            raise ValueError(f"cannot read image {a.image}: {e}") from e
        size = a.image_size or cfg.data.global_crops_size
        x, resized = preprocess(img, size, cfg.model.patch_size)
        maps = cls_attention_maps(backbone, x, cfg.model.patch_size)
        mask = mass_mask(maps, a.keep) if a.keep is not None else None
        out = render_grid(resized, maps, mask, columns=a.columns)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        out.save(a.out, format="PNG")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dino-fast attention: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({out.size[0]}x{out.size[1]}, {maps.shape[0]} heads)")
    return 0

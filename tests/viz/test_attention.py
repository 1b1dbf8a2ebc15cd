"""The attention command: maps per head, mass mask, PNG of the expected size."""
import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.config import load_config
from dino_fast.methods.dino import build_student_teacher
from dino_fast.utils import checkpoint as ck
from dino_fast.viz import attention as viz


def _checkpoint(tmp_path):
    cfg = load_config(None, ["model.arch=vit_tiny", "model.patch_size=8", "model.depth=2", "model.out_dim=64",
                             "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
                             "data.global_crops_size=32", "data.local_crops_size=16"])
    student, teacher = build_student_teacher(cfg)
    path = ck.atomic_save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                           "config": cfg.to_dict()}, tmp_path / "checkpoint.pth")
    return path, teacher


def test_maps_are_distributions_and_match_math_attention(tmp_path):
    _, teacher = _checkpoint(tmp_path)
    x = torch.randn(1, 3, 40, 56)
    maps = viz.cls_attention_maps(teacher.backbone, x, 8)
    assert maps.shape == (3, 40, 56)
    # each patch value repeated 8x8 times: the per-head sum over pixels is 64
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.full((3,), 64.0))
    attn = teacher.backbone.get_last_selfattention(x)[0, :, 0, 1:]
    attn = attn / attn.sum(-1, keepdim=True)
    torch.testing.assert_close(maps[:, ::8, ::8].reshape(3, -1), attn)
    with pytest.raises(ValueError, match="multiples of 8"):
        viz.cls_attention_maps(teacher.backbone, torch.randn(1, 3, 30, 32), 8)


def test_mass_mask_keeps_fraction():
    maps = torch.rand(2, 16, 16)
    mask = viz.mass_mask(maps, 0.6)
    for h in range(2):
        m = maps[h] / maps[h].sum()
        kept = m[mask[h]].sum().item()
        assert kept >= 0.6 - 1e-6
        # minimal: dropping the smallest kept pixel falls below the fraction
        assert kept - m[mask[h]].min().item() < 0.6
    with pytest.raises(ValueError, match="keep must be in"):
        viz.mass_mask(maps, 0.0)


def test_command_writes_png(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path)
    img = tmp_path / "img.jpg"
    Image.fromarray(np.random.randint(0, 255, (50, 70, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "attn.png"
    assert viz.main(["--checkpoint", str(path), "--image", str(img), "--out", str(out), "--keep", "0.6",
                     "--columns", "2"]) == 0
    png = Image.open(out)
    # shorter side 32, width 70*32/50 = 44.8 -> 45 -> cropped to 40; 1 image + 3 heads in 2 columns
    assert png.format == "PNG" and png.size == (2 * 40 + 4, 2 * 32 + 4)
    assert viz.main(["--checkpoint", str(path), "--image", str(tmp_path / "none.jpg"), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err

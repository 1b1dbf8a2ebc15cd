"""The GPU paths on a CUDA device: the Triton kernels compiled for the GPU (not the interpreter)
against the float64 reference, the drop-in loss and torch.compile, the EMA, the augmentation on
the device against the CPU, the ViT's attention backends, and the trainer in bf16 / fp16.

Run on a CUDA machine with the kernels compiled::

    TRITON_INTERPRET=0 python -m pytest -m cuda tests

Everywhere else every test here is skipped with its reason (CI has no GPU): the same checks run
under ``TRITON_INTERPRET=1`` on CPU tensors in tests/ops/test_*_kernels.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino_fast.ops.backend import triton_interpreter_active
from tests._loss_utils import check_kernels_against_float64, make_inputs, reference64, rel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (run `TRITON_INTERPRET=0 python -m pytest -m cuda tests` on a GPU "
                              "machine); the kernels are checked under the interpreter in tests/ops/test_*_kernels.py"),
    pytest.mark.skipif(triton_interpreter_active(), reason="TRITON_INTERPRET=1 is set: these tests check the kernels compiled for "
                                              "the GPU; run them with TRITON_INTERPRET=0"),
]

DEV = "cuda"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """TF32 off so fp32 comparisons are fp32 (restored after)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------- fused loss kernels
LOSS_CASES = [  # (B, K, ncrops, n_teacher, dtype)
    (1, 1, 2, 2, torch.float32),
    (3, 7, 4, 2, torch.float32),
    (5, 4099, 12, 2, torch.float32),
    (3, 1000, 5, 3, torch.float32),
    (3, 1000, 4, 1, torch.float32),
    (1, 262144, 2, 2, torch.float32),
    (32, 65536, 10, 2, torch.float32),
    (64, 65536, 12, 2, torch.float32),
    (17, 65536, 10, 2, torch.float32),
    (64, 65536, 12, 2, torch.bfloat16),
    (32, 65536, 10, 2, torch.float16),
    (7, 4099, 10, 2, torch.bfloat16),
    (9, 300, 4, 2, torch.float16),
]


@pytest.mark.parametrize("B,K,ncrops,n_teacher,dtype", LOSS_CASES)
def test_loss_kernels_on_gpu_match_float64(B, K, ncrops, n_teacher, dtype):
    S, T, c = (t.to(DEV) for t in make_inputs(B, K, ncrops, n_teacher, dtype))
    g, upstream = check_kernels_against_float64(S, T, c, ncrops, n_teacher, TOL[dtype])  # NaN-poisoned out
    assert g.device.type == "cuda"
    if K == 1:  # one column: p = q = 1, the gradient is zero up to the GPU's exp rounding
        scale = upstream / (0.1 * B * (n_teacher * ncrops - n_teacher))  # tau_s = 0.1
        assert g.float().abs().max().item() < 1e-5 * scale


def test_loss_in_place_gradient_on_gpu():
    from dino_fast.ops.soft_ce.function import dino_loss

    S, T, c = (t.to(DEV) for t in make_inputs(16, 65536, 10))
    _, ref_g = reference64(S, T, c, 10, 2, 0.1, 0.04)
    leaf = S.clone().requires_grad_()
    s = leaf * 1.0
    loss = dino_loss(s, T, c, ncrops=10, student_temp=0.1, teacher_temp=0.04, backend="triton", inplace_grad=True)
    loss.backward()
    assert rel(leaf.grad, ref_g) < 1e-5


def test_dinoloss_auto_picks_triton_on_gpu_and_matches_the_reference_module():
    from dino_fast.losses.dino import DINOLoss
    from dino_fast.reference.loss import DINOLossReference

    B, K, ncrops = 8, 65536, 10
    ours = DINOLoss(K, ncrops, 0.04, 0.07, 3, 5).to(DEV)
    ref = DINOLossReference(K, ncrops, 0.04, 0.07, 3, 5).to(DEV)
    for epoch in range(4):
        S, T, _ = (t.to(DEV) for t in make_inputs(B, K, ncrops))
        sa, sb = S.clone().requires_grad_(), S.clone().requires_grad_()
        la, lb = ours(sa, T, epoch), ref(sb, T, epoch)
        la.backward()
        lb.backward()
        assert rel(la.detach(), lb.detach()) < 1e-5
        assert rel(sa.grad, sb.grad) < 1e-5
        assert rel(ours.center, ref.center) < 1e-6


def test_dinoloss_under_torch_compile_fullgraph_on_gpu():
    from dino_fast.losses.dino import DINOLoss

    B, K, ncrops = 8, 8192, 6
    crit = DINOLoss(K, ncrops, 0.04, 0.04, 0, 10, backend="triton").to(DEV)
    head = torch.nn.Linear(32, K).to(DEV)

    def step(x, t):
        return crit(head(x), t, 0)

    import torch._inductor.config as inductor_config

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(ncrops * B, 32, device=DEV)
    t = torch.randn(2 * B, K, device=DEV)
    center0 = crit.center.clone()
    with inductor_config.patch(force_disable_caches=True):
        loss_c = compiled(x, t)
    loss_c.backward()
    g_c = head.weight.grad.clone()
    head.weight.grad = None
    crit.center.copy_(center0)
    loss_e = step(x, t)
    loss_e.backward()
    assert rel(loss_c.detach(), loss_e.detach()) < 1e-5
    assert rel(g_c, head.weight.grad) < 1e-4


# ------------------------------------------------------------------------- EMA kernel
@pytest.mark.parametrize("n", [1, 127, 4096 + 3, (1 << 22) + 5, 44_000_011])
@pytest.mark.parametrize("m", [0.0, 0.5, 0.996, 0.9999, 1.0])
def test_ema_kernel_on_gpu_matches_float64(n, m):
    from dino_fast.ops.ema.kernels import ema_flat_

    t = torch.randn(n, device=DEV)
    s = torch.randn(n, device=DEV)
    want = t.double() * m + s.double() * (1.0 - m)
    out = ema_flat_(t, s, m)
    assert out is t
    err = (t.double() - want).abs().max().item()
    assert err <= 1e-6 * max(1.0, want.abs().max().item()), err


def test_teacher_ema_on_gpu_matches_the_official_loop():
    from dino_fast.models import DINOHead, MultiCropWrapper, vit_small
    from dino_fast.ops.ema.teacher import TeacherEMA
    from dino_fast.reference.ema import reference_ema_update_

    def model():
        return MultiCropWrapper(vit_small(16), DINOHead(384, 65536)).to(DEV)

    student, teacher = model(), model()
    ref_teacher = model()
    ref_teacher.load_state_dict(teacher.state_dict())
    ema = TeacherEMA(teacher, student)
    for m in (0.996, 0.9, 0.5):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        ema.update(m)
        reference_ema_update_(list(ref_teacher.parameters()), list(student.parameters()), m)
        for (name, a), b in zip(teacher.named_parameters(), ref_teacher.parameters()):
            assert (a - b).abs().max().item() <= 1e-6, name


# ------------------------------------------------------------------------- augmentation on the device
def test_augmentation_on_gpu_equals_the_cpu():
    from dino_fast.data import MultiCropAugment

    aug = MultiCropAugment(local_crops_number=4)
    g = torch.randint(0, 256, (6, 2, 3, 64, 64), dtype=torch.uint8)
    loc = torch.randint(0, 256, (6, 4, 3, 32, 32), dtype=torch.uint8)
    ids = np.arange(100, 106)
    cpu = aug(g, loc, sample_ids=ids, seed=3, epoch=2)
    gpu = aug(g.to(DEV), loc.to(DEV), sample_ids=ids, seed=3, epoch=2)
    assert len(cpu) == len(gpu) == 6
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and b.shape == a.shape
        d = (a - b.cpu()).abs()
        # thresholds (solarize at 128) may flip for values within float rounding of the edge
        assert (d > 1e-3).float().mean().item() < 1e-3, d.max().item()
        assert d.median().item() < 1e-5


# ------------------------------------------------------------------------- ViT attention backends
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vit_attention_backends_on_gpu_match_math(backend, dtype):
    from dino_fast.models import vit_small

    model = vit_small(16, attn_backend="math").to(DEV).eval()
    x = torch.randn(4, 3, 224, 224, device=DEV)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        want = model(x).float()
        model.set_attn_backend(backend)
        got = model(x).float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert rel(got, want) < tol


# ------------------------------------------------------------------------- the trainer on the GPU
def test_trainer_on_gpu_bf16_by_default_and_resumes(data_root, tmp_path):
    from dino_fast.train.loop import Trainer
    from tests._train_utils import read_losses, tiny_config

    tr = Trainer(tiny_config(data_root, tmp_path / "a", "train.max_iters=12", "train.precision=auto"))
    assert tr.device.type == "cuda" and tr.precision == "bf16"
    s = tr.fit()
    assert s["iterations"] == 12 and math.isfinite(s["last_loss"])
    assert (tmp_path / "a" / "checkpoint.pth").exists()
    first = read_losses(tmp_path / "a")
    del tr
    tr2 = Trainer(tiny_config(data_root, tmp_path / "a", "train.max_iters=20", "train.resume=auto",
                              "train.precision=auto"))
    s2 = tr2.fit()
    assert s2["iterations"] == 20 and math.isfinite(s2["last_loss"])
    losses = read_losses(tmp_path / "a")
    assert set(first) <= set(losses) and max(losses) == 19
    assert all(math.isfinite(v) for v in losses.values())


def test_koleo_on_gpu_matches_float64_and_trains(data_root, tmp_path):
    from dino_fast.losses.koleo import koleo_loss
    from dino_fast.reference.loss import koleo_loss_reference
    from dino_fast.train.loop import Trainer
    from tests._train_utils import tiny_config

    g = torch.Generator().manual_seed(0)
    for n, d in [(2, 3), (64, 192), (512, 384)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, d, generator=g).to(dtype)
            got = koleo_loss(x.to(DEV))
            assert got.dtype == torch.float32
            assert abs(got.item() - koleo_loss_reference(x.double()).item()) <= 1e-5 * max(1.0, abs(got.item()))
    s = Trainer(tiny_config(data_root, tmp_path, "train.max_iters=6", "train.precision=auto",
                            "loss.koleo_weight=0.1")).fit()
    assert s["iterations"] == 6 and math.isfinite(s["last_loss"])

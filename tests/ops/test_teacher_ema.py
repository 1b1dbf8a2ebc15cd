"""TeacherEMA and ema_update_: the update equals the official per-parameter loop run in float64.

Covers the issue's proof list: momenta 0.5 / 0.996 / 0.9999 / 1.0, a model with mixed parameter
shapes (patch conv, tokens, LayerNorms, attention and MLP Linears, a 0-d and a 1-element tensor,
an odd-sized tensor, a weight-normalised last layer), DDP with gloo at world size 1 and 2,
state_dict / load_state_dict round trips (in place and assign=True), ``.to()``-style parameter
replacement, optimizer steps in between, buffers, and the errors on mismatched architectures.
"""
from __future__ import annotations

import gc
import io
import math
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino_fast.ops.ema.teacher import TeacherEMA, ema_update_
from dino_fast.reference.ema import reference_ema_update_
from tests._dist_utils import free_port, spawn_ranks

MOMENTA = [0.5, 0.996, 0.9999, 1.0]
TOL = 1e-6


# --------------------------------------------------------------------------------------------
# a small model with the parameter shapes of a ViT + DINO head (plus awkward ones)
# --------------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, hidden)
        self.mlp.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        x = x + self.attn.proj(a)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class MiniViT(nn.Module):
    """ViT-like backbone + DINO-like head on 8x8 images, every parameter used in forward."""

    def __init__(self, d: int = 24, depth: int = 2, hidden: int = 53, out_dim: int = 97,
                 bottleneck: int = 17, batchnorm: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 4, 4)  # (d, 3, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)  # (1, 1, d)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d) * 0.02)  # (1, 5, d)
        self.blocks = nn.ModuleList(_Block(d, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.gamma = nn.Parameter(torch.ones(1))  # 1-element tensor
        self.scale = nn.Parameter(torch.tensor(0.5))  # 0-d tensor
        self.odd = nn.Parameter(torch.randn(7, 13))  # odd-sized tensor
        self.bn = nn.BatchNorm1d(d) if batchnorm else None
        self.head = nn.Module()
        self.head.mlp = nn.Sequential(nn.Linear(d, 33), nn.GELU(), nn.Linear(33, bottleneck))
        self.head.last_layer = nn.Module()
        self.head.last_layer.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=False)
        self.head.last_layer.weight_v = nn.Parameter(torch.randn(out_dim, bottleneck))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tok = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, 4, d)
        tok = torch.cat([self.cls_token.expand(tok.shape[0], -1, -1), tok], dim=1) + self.pos_embed
        for blk in self.blocks:
            tok = blk(tok)
        feat = self.norm(tok)[:, 0] * self.gamma + self.scale * self.odd.mean()
        if self.bn is not None:
            feat = self.bn(feat)
        z = F.normalize(self.head.mlp(feat), dim=-1)
        lw = self.head.last_layer
        w = lw.weight_v * (lw.weight_g / lw.weight_v.norm(dim=1, keepdim=True))
        return F.linear(z, w)


def make_pair(**kw) -> tuple[nn.Module, nn.Module]:
    """Student and teacher (the official set-up: teacher loads the student's weights, no grads),
    then the teacher is perturbed so that the EMA is not trivially the identity."""
    student = MiniViT(**kw)
    teacher = MiniViT(**kw)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
            p.requires_grad_(False)
    return teacher, student


def snapshot64(module: nn.Module, buffers: bool = False) -> list[torch.Tensor]:
    ts = [p.detach().double().clone() for p in module.parameters()]
    if buffers:
        ts += [b.detach().double().clone() for b in module.buffers() if b.is_floating_point()]
    return ts


def expected64(teacher: nn.Module, student: nn.Module, m: float,
               buffers: bool = False) -> list[tuple[torch.Tensor, float]]:
    """The official per-parameter loop run on float64 copies, with each tensor's error scale.

    The scale is ``max(m |t| + (1 - m) |s|)``: the magnitude of the two terms. Relative to it, an
    fp32 update errs by a few ulps; relative to the result alone it would not be bounded where the
    two terms cancel (a 1-element tensor whose teacher and student have opposite signs).
    """
    t64, s64 = snapshot64(teacher, buffers), snapshot64(student, buffers)
    scales = [(m * t.abs() + (1 - m) * s.abs()).max().item() if t.numel() else 0.0 for t, s in zip(t64, s64)]
    reference_ema_update_(t64, s64, m)
    return list(zip(t64, scales))


def assert_matches(teacher: nn.Module, ref: list[tuple[torch.Tensor, float]], buffers: bool = False,
                   tol: float = TOL) -> None:
    names = [n for n, _ in teacher.named_parameters()]
    got = list(teacher.parameters())
    if buffers:
        bn = [(n, b) for n, b in teacher.named_buffers() if b.is_floating_point()]
        names += [n for n, _ in bn]
        got += [b for _, b in bn]
    assert len(got) == len(ref)
    for name, g, (r, scale) in zip(names, got, ref):
        assert g.dtype == torch.float32, name
        err = (g.double() - r).abs().max().item()
        assert err <= tol * scale, f"{name}: max abs err {err:.3e}, scale max(m|t|+(1-m)|s|) {scale:.3e}"


def perturb_(module: nn.Module) -> None:
    """Stand-in for an optimizer step: change every student value in place."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)


# --------------------------------------------------------------------------------------------
# correctness against the float64 reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("m", MOMENTA)
def test_update_matches_float64_reference(backend: str, m: float) -> None:
    teacher, student = make_pair()
    ema = TeacherEMA(teacher, student, backend=backend)
    for _ in range(3):
        perturb_(student)
        ref = expected64(teacher, student, m)
        before = [p.detach().clone() for p in teacher.parameters()]
        ema.update(m)
        assert_matches(teacher, ref)
        if m == 1.0:  # the teacher must be bit-identical
            for a, b in zip(before, teacher.parameters()):
                assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_momentum_zero_copies_student(backend: str) -> None:
    teacher, student = make_pair()
    ema = TeacherEMA(teacher, student, backend=backend)
    ema.update(0.0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_random_momentum_and_many_steps() -> None:
    teacher, student = make_pair(depth=3)
    ema = TeacherEMA(teacher, student)
    for _ in range(5):
        m = float(torch.rand(()).item())
        perturb_(student)
        ref = expected64(teacher, student, m)
        ema.update(m)
        assert_matches(teacher, ref)


def test_construction_packs_views_and_keeps_values() -> None:
    teacher, student = make_pair()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    ema = TeacherEMA(teacher, student)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k
    for k, v in student.state_dict().items():
        assert torch.equal(v, s_before[k]), k
    n = sum(p.numel() for p in teacher.parameters())
    assert ema.numel == n and ema.num_tensors == len(list(teacher.parameters()))
    assert ema.teacher_buffer.shape == (n,) and ema.teacher_buffer.dtype == torch.float32
    assert ema.student_buffer.shape == (n,)
    for flat, mod in ((ema.teacher_buffer, teacher), (ema.student_buffer, student)):
        off = 0
        for p in mod.parameters():
            assert p.data_ptr() == flat.data_ptr() + 4 * off
            assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            off += p.numel()
    # requires_grad flags survive packing
    assert all(not p.requires_grad for p in teacher.parameters())
    assert student.head.last_layer.weight_g.requires_grad is False
    assert student.odd.requires_grad is True


def test_repeated_construction_on_same_modules() -> None:
    teacher, student = make_pair()
    ema1 = TeacherEMA(teacher, student)
    ema2 = TeacherEMA(teacher, student)  # already packed: adopted without a copy
    assert ema2.teacher_buffer.data_ptr() == ema1.teacher_buffer.data_ptr()
    perturb_(student)
    ref = expected64(teacher, student, 0.9)
    ema1.update(0.9)
    assert_matches(teacher, ref)


def test_real_models_vit_tiny_and_dino_head() -> None:
    from dino_fast.models import DINOHead, MultiCropWrapper, vit_tiny

    def build() -> nn.Module:
        return MultiCropWrapper(vit_tiny(depth=2, img_size=32), DINOHead(192, 131, hidden_dim=64, bottleneck_dim=32))

    student, teacher = build(), build()
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5).add_(torch.randn_like(p))
    ema = TeacherEMA(teacher, student)
    assert ema.num_tensors == len(list(student.parameters()))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 32, 32)
    out = student(x)
    out.square().mean().backward()
    opt.step()
    ref = expected64(teacher, student, 0.996)
    ema.update(0.996)
    assert_matches(teacher, ref)


# --------------------------------------------------------------------------------------------
# training-loop interplay: optimizer, state dicts, parameter replacement, buffers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_first", [True, False])
@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_steps_write_through_to_flat_buffer(opt_first: bool, foreach: bool) -> None:
    teacher, student = make_pair()
    mk = lambda: torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.04, foreach=foreach)  # noqa: E731
    opt = mk() if opt_first else None
    ema = TeacherEMA(teacher, student)
    opt = opt or mk()
    for _ in range(2):
        x = torch.randn(3, 3, 8, 8)
        opt.zero_grad()
        student(x).logsumexp(-1).mean().backward()
        s_before = ema.student_buffer.clone()
        opt.step()
        assert not torch.equal(s_before, ema.student_buffer)  # the step wrote through the views
        ref = expected64(teacher, student, 0.996)
        ema.update(0.996)
        assert_matches(teacher, ref)
    assert ema.rebind_count == 0


def test_teacher_stays_fp32_under_bf16_autocast() -> None:
    teacher, student = make_pair()
    ema = TeacherEMA(teacher, student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(torch.randn(2, 3, 8, 8))
        with torch.no_grad():
            teacher(torch.randn(2, 3, 8, 8))
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(-1).mean().backward()
    opt.step()
    ref = expected64(teacher, student, 0.9999)
    ema.update(0.9999)
    assert_matches(teacher, ref)  # also asserts every teacher tensor is float32
    assert ema.teacher_buffer.dtype == torch.float32


@pytest.mark.parametrize("side", ["teacher", "student", "both"])
def test_state_dict_round_trip_in_place(side: str) -> None:
    teacher, student = make_pair()
    ema = TeacherEMA(teacher, student)
    ema.update(0.99)
    # checkpoint: serialise both, change everything, resume by loading
    buf_t, buf_s = io.BytesIO(), io.BytesIO()
    torch.save(teacher.state_dict(), buf_t)
    torch.save(student.state_dict(), buf_s)
    saved_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    perturb_(teacher)
    perturb_(student)
    buf_t.seek(0)
    buf_s.seek(0)
    if side in ("teacher", "both"):
        teacher.load_state_dict(torch.load(buf_t, weights_only=True))
        for k, v in teacher.state_dict().items():
            assert torch.equal(v, saved_t[k])
    if side in ("student", "both"):
        student.load_state_dict(torch.load(buf_s, weights_only=True))
    ref = expected64(teacher, student, 0.996)
    ema.update(0.996)
    assert_matches(teacher, ref)
    assert ema.rebind_count == 0  # in-place loads keep the views


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_load_state_dict_assign_rebinds(side: str) -> None:
    teacher, student = make_pair()
    ema = TeacherEMA(teacher, student)
    mod = teacher if side == "teacher" else student
    new_state = {k: v.clone() + 1.0 for k, v in mod.state_dict().items()}
    mod.load_state_dict(new_state, assign=True)  # replaces the Parameter objects
    ref = expected64(teacher, student, 0.996)
    ema.update(0.996)
    assert_matches(teacher, ref)
    assert ema.rebind_count == 1
    flat = ema.teacher_buffer if side == "teacher" else ema.student_buffer
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in mod.parameters())
    # the teacher is really the thing the update writes: a second update moves it again
    perturb_(student)
    ref = expected64(teacher, student, 0.5)
    ema.update(0.5)
    assert_matches(teacher, ref)
    assert ema.rebind_count == 1


def test_to_style_replacement_and_new_parameter_rebind() -> None:
    teacher, student = make_pair()
    ema = TeacherEMA(teacher, student)
    # what .to(other_device) does to every parameter: param.data = converted copy
    teacher._apply(lambda t: t.clone())
    student._apply(lambda t: t.clone())
    assert teacher.odd.untyped_storage().data_ptr() != ema.teacher_buffer.untyped_storage().data_ptr()
    perturb_(student)
    ref = expected64(teacher, student, 0.996)
    ema.update(0.996)
    assert_matches(teacher, ref)
    assert teacher.odd.untyped_storage().data_ptr() == ema.teacher_buffer.untyped_storage().data_ptr()
    # a whole Parameter replaced by assignment
    student.gamma = nn.Parameter(torch.full((1,), 3.0))
    teacher.head.mlp[0].weight = nn.Parameter(torch.randn(33, 24), requires_grad=False)
    ref = expected64(teacher, student, 0.9)
    ema.update(0.9)
    assert_matches(teacher, ref)
    # no-op .to() keeps everything
    count = ema.rebind_count
    teacher.to("cpu")
    student.to(torch.float32)
    ema.update(0.9)
    assert ema.rebind_count == count


def test_dtype_change_after_construction_raises() -> None:
    teacher, student = make_pair()
    ema = TeacherEMA(teacher, student)
    teacher.to(torch.float64)
    with pytest.raises(ValueError, match="float32"):
        ema.update(0.9)


@pytest.mark.parametrize("include_buffers", [False, True])
def test_buffers(include_buffers: bool) -> None:
    teacher, student = make_pair(batchnorm=True)
    with torch.no_grad():
        student.bn.running_mean.normal_()
        student.bn.running_var.uniform_(0.5, 2.0)
        teacher.bn.running_mean.normal_()
    student.bn.num_batches_tracked.fill_(7)
    t_buf_before = [b.clone() for b in teacher.buffers()]
    ema = TeacherEMA(teacher, student, include_buffers=include_buffers)
    ref = expected64(teacher, student, 0.9, buffers=include_buffers)
    ema.update(0.9)
    assert_matches(teacher, ref, buffers=include_buffers)
    assert teacher.bn.num_batches_tracked.item() == 0  # integer buffers are never averaged
    if not include_buffers:
        for a, b in zip(t_buf_before, teacher.buffers()):
            assert torch.equal(a, b)
    else:
        assert ema.num_tensors == len(list(teacher.parameters())) + 2


# --------------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------------

def _random_lists() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shapes = [(), (1,), (7, 13), (3, 5, 2), (129,), (2, 3, 4, 4)]
    return [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("m", MOMENTA)
def test_functional_separate_tensors(backend: str, m: float) -> None:
    t, s = _random_lists()
    ref = [x.double() for x in t]
    scales = [(m * a.double().abs() + (1 - m) * b.double().abs()).max().item() for a, b in zip(t, s)]
    reference_ema_update_(ref, [x.double() for x in s], m)
    ema_update_(t, s, m, backend=backend)
    for i, (g, r, sc) in enumerate(zip(t, ref, scales)):
        assert (g.double() - r).abs().max().item() <= TOL * sc, i


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_functional_packed_tensors(backend: str) -> None:
    shapes = [(), (1,), (7, 13), (129,), (4, 4)]
    n = sum(math.prod(sh) for sh in shapes)
    t_flat, s_flat = torch.randn(n), torch.randn(n)
    ref = t_flat.double() * 0.996 + 0.004 * s_flat.double()
    scale = (t_flat.double().abs() * 0.996 + 0.004 * s_flat.double().abs()).max().item()
    t_views, s_views, off = [], [], 0
    for sh in shapes:
        k = math.prod(sh)
        t_views.append(t_flat[off:off + k].view(sh))
        s_views.append(s_flat[off:off + k].view(sh))
        off += k
    ema_update_(t_views, s_views, 0.996, backend=backend)
    assert (t_flat.double() - ref).abs().max().item() <= TOL * scale


def test_functional_triton_needs_packed_tensors() -> None:
    t, s = _random_lists()
    with pytest.raises(ValueError, match="packed"):
        ema_update_(t, s, 0.9, backend="triton")


def test_functional_errors_name_the_tensor() -> None:
    t, s = _random_lists()
    s[3] = torch.randn(3, 5, 3)
    with pytest.raises(ValueError, match=r"shape mismatch.*\[3\]"):
        ema_update_(t, s, 0.9)
    t, s = _random_lists()
    with pytest.raises(ValueError, match="count mismatch"):
        ema_update_(t, s[:-1], 0.9)
    t, s = _random_lists()
    s[2] = s[2].double()
    with pytest.raises(ValueError, match=r"dtype mismatch.*\[2\]"):
        ema_update_(t, s, 0.9)
    t, s = _random_lists()
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="momentum"):
            ema_update_(t, s, bad)
    with pytest.raises(TypeError, match="momentum"):
        ema_update_(t, s, torch.tensor(0.9))
    with pytest.raises(ValueError, match="backend"):
        ema_update_(t, s, 0.9, backend="cuda")
    with pytest.raises(ValueError, match="same memory"):
        ema_update_(t, t, 0.9)


# --------------------------------------------------------------------------------------------
# errors at construction
# --------------------------------------------------------------------------------------------

def test_mismatched_architectures_raise_naming_the_parameter() -> None:
    teacher, student = make_pair()
    with pytest.raises(ValueError, match=r"mismatch.*names first differ.*'blocks\.2\.norm1\.weight'"):
        TeacherEMA(MiniViT(depth=2), MiniViT(depth=3))
    longer = MiniViT()
    longer.head.last_layer.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"count mismatch.*student 'head\.last_layer\.extra'"):
        TeacherEMA(MiniViT(), longer)
    with pytest.raises(ValueError, match=r"shape mismatch.*'head\.last_layer\.weight_g'"):
        TeacherEMA(MiniViT(out_dim=97), MiniViT(out_dim=98))
    with pytest.raises(ValueError, match=r"shape mismatch.*'blocks\.0\.mlp\.fc1\.weight'"):
        TeacherEMA(MiniViT(hidden=53), MiniViT(hidden=54))
    s64 = MiniViT()
    s64.blocks[1].mlp.double()
    with pytest.raises(ValueError, match=r"dtype mismatch.*'blocks\.1\.mlp\.fc1\.weight'"):
        TeacherEMA(MiniViT(), s64)
    with pytest.raises(ValueError, match=r"float32.*bfloat16|bfloat16.*float32"):
        TeacherEMA(MiniViT().bfloat16(), MiniViT().bfloat16())
    with pytest.raises(ValueError, match="same module"):
        TeacherEMA(student, student)
    with pytest.raises(TypeError, match="nn.Module"):
        TeacherEMA(teacher, list(student.parameters()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        TeacherEMA(teacher, student, backend="fast")
    with pytest.raises(ValueError, match="no parameters"):
        TeacherEMA(nn.ReLU(), nn.ReLU())
    # a failed construction leaves the modules usable and unpacked
    ema = TeacherEMA(teacher, student)
    with pytest.raises(ValueError, match="momentum"):
        ema.update(1.0001)
    with pytest.raises(TypeError, match="momentum"):
        ema.update(True)  # type: ignore[arg-type]


def test_shared_memory_rejected() -> None:
    student = MiniViT()
    teacher = MiniViT()
    teacher.odd = student.odd  # the same Parameter in both
    with pytest.raises(ValueError, match="same memory"):
        TeacherEMA(teacher, student)


# --------------------------------------------------------------------------------------------
# DistributedDataParallel (gloo, CPU), world size 1 and 2
# --------------------------------------------------------------------------------------------

def _ddp_worker(rank: int, world_size: int, port: int, wrap: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        _ddp_checks(rank, world_size, wrap)
        # every rank has finished its last collective before any rank tears the group down
        dist.barrier()
    finally:
        # DDP's reducer holds the process group: it must be gone (with the module, optimizer and
        # EMA, all locals of _ddp_checks) before the group is destroyed, or gloo's threads are
        # torn down at interpreter exit and abort the process ("terminate called ...").
        gc.collect()
        dist.destroy_process_group()


def _ddp_checks(rank: int, world_size: int, wrap: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(1234)  # identical initial weights on every rank
    teacher, student = make_pair()
    if wrap == "ema_first":  # pack first, wrap in DDP afterwards
        ema = TeacherEMA(teacher, student)
        ddp = DDP(student)
    else:
        ddp = DDP(student)
        ema = TeacherEMA(teacher, ddp if wrap == "wrapper" else ddp.module)
    assert ema.student is student
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, foreach=True)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        opt.zero_grad()
        ddp(x).logsumexp(-1).mean().backward()
        # gradients were all-reduced through DDP's hooks on the packed parameters
        g = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        gs = [torch.empty_like(g) for _ in range(world_size)]
        dist.all_gather(gs, g)
        assert all(torch.equal(gs[0], gi) for gi in gs), "gradients differ across ranks"
        opt.step()
        ref = expected64(teacher, student, 0.996)
        ema.update(0.996)
        assert_matches(teacher, ref)
        if step == 1:  # checkpoint round trip mid-run on both modules
            sd_t = {k: v.clone() for k, v in teacher.state_dict().items()}
            sd_s = {k: v.clone() for k, v in ddp.module.state_dict().items()}
            perturb_(teacher)
            teacher.load_state_dict(sd_t)
            ddp.module.load_state_dict(sd_s)
    assert ema.rebind_count == 0
    # every rank holds the same student and the same teacher
    for flat in (ema.student_buffer, ema.teacher_buffer):
        fs = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(fs, flat)
        assert all(torch.equal(fs[0], f) for f in fs), "ranks diverged"
    assert all(p.untyped_storage().data_ptr() == ema.student_buffer.untyped_storage().data_ptr()
               for p in ddp.module.parameters())


@pytest.mark.parametrize("world_size,wrap", [(1, "wrapper"), (2, "wrapper"), (2, "module"), (2, "ema_first")])
def test_ddp_gloo(world_size: int, wrap: str) -> None:
    spawn_ranks(_ddp_worker, (world_size, free_port(), wrap), world_size, 120,
                f"DDP test with world size {world_size}")


def test_update_walks_the_modules_only_after_a_registration(monkeypatch):
    """The per-update check is an address check of the bound tensors; the modules are walked again
    only after some module registered or replaced a parameter (or buffer, or submodule)."""
    import dino_fast.ops.ema.teacher as ema_mod

    student = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    teacher = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    ema = TeacherEMA(teacher, student, backend="torch")
    walks = []
    real = ema_mod._tensors
    monkeypatch.setattr(ema_mod, "_tensors", lambda *a: walks.append(1) or real(*a))
    for _ in range(3):
        ema.update(0.9)
    assert walks == [] and ema.rebind_count == 0
    with torch.no_grad():  # .data replaced: same objects, new storage -> caught by the address check
        student[1].bias.data = student[1].bias.data.clone() + 1.0
    ema.update(0.0)
    assert walks == [] and ema.rebind_count == 1
    assert torch.equal(teacher[1].bias, student[1].bias)
    student[0].weight = nn.Parameter(student[0].weight.detach() * 2)  # a new Parameter object
    ema.update(0.0)
    assert len(walks) == 2 and ema.rebind_count == 2
    assert torch.equal(teacher[0].weight, student[0].weight)
    ema.update(0.5)  # walked once, then back to address checks
    assert len(walks) == 2


def test_registration_hook_does_not_recompile_users_compiled_modules() -> None:
    """TeacherEMA's process-wide registration counter must not become a torch.compile guard: a
    compiled module that reassigns a buffer on every call (the official DINOLoss's center update)
    compiles once, and the counter still sees the (eagerly replayed) registrations."""
    import torch._dynamo

    from dino_fast.ops.ema import teacher as teacher_mod

    class CenterLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("center", torch.zeros(1, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = (x - self.center).sum()
            self.center = self.center * 0.9 + 0.1 * x.mean(0, keepdim=True)
            return out

    torch._dynamo.reset()
    m = CenterLike()
    compiled = torch.compile(m, backend="eager")
    before = teacher_mod._REGISTRATIONS[0]
    torch._dynamo.utils.counters.clear()
    for _ in range(12):
        compiled(torch.randn(4, 8))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 2, f"{frames} graphs: the registration counter became a guard"
    assert teacher_mod._REGISTRATIONS[0] >= before + 12  # every call's buffer reassignment was counted
    torch._dynamo.reset()

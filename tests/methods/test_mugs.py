"""The Mugs method against the references of reference/mugs.py: one step's three losses on its own
network outputs (float64 recomputation), the queue and memory writes that follow, the memory itself,
the relation block's gradient paths, the EMA pairing, and the gated total."""
from __future__ import annotations

import pytest
import torch

from dino_fast.methods import build_method
from dino_fast.models.mugs import MugsMemory
from dino_fast.reference.loss import koleo_loss_reference
from dino_fast.reference.mugs import (
    group_loss_reference,
    infonce_queue_loss_reference,
    memory_topk_reference,
    memory_write_reference,
    mugs_total_reference,
    ring_enqueue_reference,
)
from dino_fast.reference.sinkhorn import sinkhorn_knopp_reference
from tests._train_utils import tiny_config

B = 4


def _crops(g: int = 32, l: int = 16, n_local: int = 2) -> list[torch.Tensor]:
    return [torch.randn(B, 3, g, g) for _ in range(4)] + [torch.randn(B, 3, l, l) for _ in range(n_local)]


@pytest.fixture()
def method(tmp_path):
    return build_method(tiny_config(tmp_path, tmp_path / "out", "method.name=mugs"))


@pytest.mark.parametrize("faithful", [False, True])
def test_memory_writes_and_lookup_match_the_reference(faithful):
    mem = MugsMemory(13, 5, 3, faithful_pointer=faithful)
    ref, ptr = mem.memory.clone(), 0
    for n in (4, 4, 2, 6, 5, 3, 1):
        rows = torch.randn(n, 5)
        keep = torch.rand(n) < 0.7
        wrote = mem.write(rows, keep)
        ref, ptr = memory_write_reference(ref, ptr, rows, keep, faithful_pointer=faithful)
        assert wrote == int(keep.sum()) and torch.equal(mem.memory, ref) and int(mem.ptr) == ptr
    q = torch.randn(6, 5)
    assert torch.equal(mem.lookup(q), memory_topk_reference(q, mem.memory, 3)[1])
    with pytest.raises(ValueError, match=r"rows: expected \[n, 5\] with n <= 13, got \(14, 5\)"):
        mem.write(torch.randn(14, 5))


def test_one_step_equals_the_reference_and_updates_queues_and_memories(method):
    crops = _crops()
    before = {k: v.clone() for k, v in method.method_state_dict().items()}
    torch.manual_seed(7)
    out = method.forward_step(crops, 0, 0)
    after = {k: v.clone() for k, v in method.method_state_dict().items()}
    # the same outputs again, from the state the step started with
    method.load_method_state_dict(before)
    torch.manual_seed(7)
    with torch.no_grad():
        t = method.teacher(crops[:2], method.teacher_memory)
        s = method.student(crops[2:], method.student_memory)
    nc = method.ncrops
    d = lambda x: x.detach().double()  # noqa: E731
    want = {
        "instance": infonce_queue_loss_reference(d(s["instance"]), d(t["instance"]), d(before["instance_loss.queue"]),
                                                 ncrops=nc, temperature=0.2),
        "local_group": infonce_queue_loss_reference(d(s["local_group"]), d(t["local_group"]),
                                                    d(before["local_group_loss.queue"]), ncrops=nc, temperature=0.2),
        "group": group_loss_reference(d(s["group"]), d(t["group"]), d(before["group_loss.center"]), ncrops=nc,
                                      student_temp=0.1, teacher_temp=0.04),
    }
    assert list(out.terms) == ["instance", "local_group", "group"]
    for k, v in want.items():
        assert abs(out.terms[k].value.item() - v.item()) <= 1e-5 * abs(v.item()), k
    total = mugs_total_reference([out.terms[k].value for k in want], [1, 1, 1])
    assert torch.allclose(out.total(), total, rtol=1e-6)
    # queues: this step's teacher keys, crop 0 then crop 1, after the snapshot the loss read
    for name, key in (("instance_loss", "instance"), ("local_group_loss", "local_group")):
        q, p = ring_enqueue_reference(before[f"{name}.queue"], int(before[f"{name}.queue_ptr"]), t[key].float())
        assert torch.allclose(after[f"{name}.queue"], q, atol=1e-6) and int(after[f"{name}.queue_ptr"]) == p
    # memories: teacher crop 0's and student global crop 0's mean patch tokens
    for name, net in (("teacher_memory", t), ("student_memory", s)):
        m, p = memory_write_reference(before[f"{name}.memory"], int(before[f"{name}.ptr"]), net["mean_patch"])
        assert torch.allclose(after[f"{name}.memory"], m, atol=1e-6) and int(after[f"{name}.ptr"]) == p
    assert not torch.equal(after["group_loss.center"], before["group_loss.center"])


def test_sinkhorn_group_targets_and_koleo(tmp_path):
    """loss.centering=sinkhorn_knopp: the group term is the Mugs-weighted cross-entropy to DINOv2's
    Sinkhorn-Knopp targets of the teacher's group logits (float64 reference), and the center is
    neither read nor written; loss.koleo_weight: a ``koleo`` term, KoLeo of each student global
    crop's backbone CLS summed, weighted by koleo_weight on top of the normalised Mugs sum."""
    m = build_method(tiny_config(tmp_path, tmp_path / "o", "method.name=mugs", "loss.centering=sinkhorn_knopp",
                                 "loss.teacher_temp=0.02", "loss.warmup_teacher_temp=0.02", "loss.koleo_weight=0.1"))
    crops = _crops()
    before = {k: v.clone() for k, v in m.method_state_dict().items()}
    torch.manual_seed(7)
    out = m.forward_step(crops, 0, 0)
    assert list(out.terms) == ["instance", "local_group", "group", "koleo"]
    assert [t.weight for t in out.terms.values()] == [1 / 3, 1 / 3, 1 / 3, 0.1]
    assert torch.count_nonzero(m.group_loss.center) == 0
    assert m.collapse_inputs(out, 0)["features"].shape == (2 * B, m.student.backbone.embed_dim)
    m.load_method_state_dict(before)
    torch.manual_seed(7)
    with torch.no_grad():
        t = m.teacher(crops[:2], m.teacher_memory)
        s = m.student(crops[2:], m.student_memory)
    nc = m.ncrops
    q = sinkhorn_knopp_reference(t["group"].double(), 0.02).chunk(2)
    logp = torch.log_softmax(s["group"].double() / 0.1, dim=-1).chunk(nc)
    pairs = {(i, v): -(q[i] * logp[v]).sum(-1).mean() for i in range(2) for v in range(nc) if v != i}
    large = [x for (i, v), x in pairs.items() if v < 2]
    small = [x for (i, v), x in pairs.items() if v >= 2]
    want_group = 0.5 * (sum(large) / len(large) + sum(small) / len(small))
    assert abs(out.terms["group"].value.item() - want_group.item()) <= 1e-5 * abs(want_group.item())
    want_koleo = sum(koleo_loss_reference(f) for f in s["cls"].double()[: 2 * B].chunk(2))
    assert abs(out.terms["koleo"].value.item() - want_koleo.item()) <= 1e-5 * abs(want_koleo.item())
    v = {k: out.terms[k].value for k in out.terms}
    total = mugs_total_reference([v["instance"], v["local_group"], v["group"]], [1, 1, 1]) + 0.1 * v["koleo"]
    assert torch.allclose(out.total(), total, rtol=1e-6)


def test_weak_flags_filter_the_student_memory_only(method):
    weak = torch.tensor([True, False, True, False])
    method.forward_step(_crops(), 0, 0, weak=weak)
    assert int(method.student_memory.ptr) == 2 and int(method.teacher_memory.ptr) == B


def test_relation_block_gradient_paths(method):
    """The local-group token reaches the shared final norm, the relation block and the backbone
    (through the pre-norm mean); the memory gets none and the relation block sees 1 + topk tokens."""
    net = method.student
    seen = {}
    def record(module, inputs, output) -> None:
        seen.setdefault("shape", tuple(inputs[0].shape))

    hook = net.relation_blocks[0].register_forward_hook(record)
    out = net(_crops()[2:], method.student_memory)
    hook.remove()
    assert seen["shape"] == (2 * B, 1 + method.mcfg.topk, net.backbone.embed_dim)   # first resolution group
    out["local_group"].sum().backward()
    assert net.backbone.norm.weight.grad is not None and net.backbone.norm.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.relation_blocks.parameters())
    assert net.backbone.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert net.head["instance"].mlp[0].weight.grad is None          # the instance path was not used
    assert not method.student_memory.memory.requires_grad


def test_ema_pairs_backbone_relation_and_projectors_only(method):
    teacher, student_side = method.ema_modules()
    t_names = [n for n, _ in teacher.named_parameters()]
    assert t_names == [n for n, _ in student_side.named_parameters()]
    assert not any("predictor" in n for n in t_names) and any(n.startswith("relation_blocks.") for n in t_names)
    own = {id(p) for p in method.student.parameters()}
    assert {id(p) for p in student_side.parameters()} < own
    pred = {n for n, _ in method.student.named_parameters() if n.startswith("predictor.")}
    assert pred and all(not p.requires_grad for p in method.teacher.parameters())
    for (n, a), (_, b) in zip(teacher.state_dict().items(), student_side.state_dict().items()):
        assert torch.equal(a, b), n                                  # the teacher starts as the student


def test_loss_weights_gate_and_normalise(tmp_path):
    m = build_method(tiny_config(tmp_path, tmp_path / "o", "method.name=mugs", "mugs.group_weight=2",
                                 "mugs.instance_weight=0"))
    out = m.forward_step(_crops(), 0, 0)
    assert list(out.terms) == ["local_group", "group"]
    assert [t.weight for t in out.terms.values()] == [1 / 3, 1 / 3]


def test_wrong_crop_count_is_refused(method):
    with pytest.raises(ValueError, match=r"mugs expects 2 teacher \+ 2 student global \+ 2 local crops = 6, got 5"):
        method.forward_step(_crops()[:5], 0, 0)


def test_config_checks(tmp_path):
    from dino_fast.config import ConfigError

    with pytest.raises(ConfigError, match=r"mugs.queue_size \(6\) must hold one step's teacher keys"):
        tiny_config(tmp_path, tmp_path, "method.name=mugs", "mugs.queue_size=6")
    with pytest.raises(ConfigError, match=r"needs data.local_crops_number >= 1"):
        tiny_config(tmp_path, tmp_path, "method.name=mugs", "data.local_crops_number=0")
    with pytest.raises(ConfigError, match="at least one of instance_weight"):
        tiny_config(tmp_path, tmp_path, "method.name=mugs", "mugs.instance_weight=0", "mugs.local_group_weight=0",
                    "mugs.group_weight=0")

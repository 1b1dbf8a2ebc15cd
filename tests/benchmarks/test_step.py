"""bench/step.py: both sides compute the same step (same loss, same updated weights), the official
clipping loop matches a float64 computation, and the quick path's measurement runs end to end on
a tiny model."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bench import step as bstep
from dino_fast.reference.optim import clip_gradients_reference

TINY = bstep.StepSetup(arch="vit_tiny", batch=2, n_local=2, global_size=32, local_size=16, out_dim=384,
                       hidden_dim=48, bottleneck_dim=24, depth=1)


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed())).item())


def test_both_sides_same_step() -> None:
    """Same weights, crops and seed: equal first losses and (after clip, AdamW, EMA) equal weights."""
    seed = _fresh_seed()
    ref, ours = bstep.build_pair(TINY, seed=seed, ours_optimizer="foreach")
    crops = bstep.make_crops(TINY, seed=seed)
    # the student's forward in float64 through the reference's modules gives the exact loss
    import copy

    from dino_fast.reference.loss import dino_loss_reference

    s64, t64 = copy.deepcopy(ref.student).double(), copy.deepcopy(ref.teacher).double()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        t_out = t64([c.double() for c in crops[:2]])
        s_out = s64([c.double() for c in crops])
    exact = dino_loss_reference(s_out, t_out, torch.zeros(1, TINY.out_dim, dtype=torch.float64), ncrops=TINY.ncrops,
                                student_temp=0.1, teacher_temp=float(ref.loss.teacher_temp_schedule[bstep.EPOCH])).item()

    l_ref, t_ref = ref.step(crops, seed=seed + 1)
    l_ours, t_ours = ours.step(crops, seed=seed + 1)
    assert math.isfinite(l_ref) and l_ref > 0
    assert l_ref == pytest.approx(exact, rel=1e-5)
    assert l_ours == pytest.approx(exact, rel=1e-5)
    for name in ("student", "teacher"):
        a = dict(getattr(ref, name).named_parameters())
        b = dict(getattr(ours, name).named_parameters())
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k].detach(), a[k].detach(), rtol=1e-4, atol=2e-5, msg=f"{name}.{k}")
    # the step moved the weights (so the comparison above compares updated tensors)
    moved = max((p.detach() - q).abs().max().item()
                for p, q in zip(ours.student.parameters(), bstep.build_pair(TINY, seed=seed)[0].student.parameters()))
    assert moved > 1e-6
    assert set(t_ref) == set(bstep.PHASES) | {"total"}
    assert t_ref["total"] == pytest.approx(sum(t_ref[p] for p in bstep.PHASES))
    assert all(v >= 0 for v in t_ours.values())


def test_reference_clip_matches_float64() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    grads = [torch.randn_like(p) * s for p, s in zip(model.parameters(), (10.0, 0.01, 5.0, 0.1))]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    clip = 1.5
    norms = clip_gradients_reference(model.parameters(), clip)
    for p, g, n in zip(model.parameters(), grads, norms):
        g64 = g.double()
        n64 = g64.norm().item()
        assert n == pytest.approx(n64, rel=1e-6)
        coef = clip / (n64 + 1e-6)
        want = g64 * coef if coef < 1 else g64
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=1e-7)


def test_bench_setup_quick_row() -> None:
    peaks = {"float32": 1e11, "bfloat16": 2e11}
    row = bstep.bench_setup(TINY, rounds=2, warmup=1, optimizer_repeats=1, compiled_reference=False, peaks=peaks,
                            trainer_variants=[("trainer_global_clip", ["optim.clip_mode=global"])])
    # FLOPs per step: counted once, the achieved rate per side is flops / median total
    assert row["flops_per_step"] > 0 and row["peak_flops_dtype"] == "float32"
    for side in ("reference", "ours", "trainer"):
        rate = row["achieved"][side]["flops_per_s"]
        assert rate == pytest.approx(row["flops_per_step"] / row[side]["total"])
        assert row["achieved"][side]["of_peak"] == pytest.approx(rate / 1e11)
    assert row["loss_rel_diff_first_step"] < 1e-5
    for side in ("reference", "ours"):
        assert row[side]["total"] == pytest.approx(sum(row[side][p] for p in bstep.PHASES), rel=1e-9)
        assert row[f"images_per_s_{side}"] == pytest.approx(TINY.batch / row[side]["total"])
    assert row["ours_optimizer"] in ("AdamW foreach", "AdamW fused", "AdamW default")
    assert row["optimizer_variants_s"]["apex"] in ("apex not installed", "apex: CUDA only, not timed on CPU")
    assert min(row["speedup_min_max"]) <= row["speedup"] <= max(row["speedup_min_max"])
    assert row["params"] == sum(p.numel() for p in bstep.build_models(TINY, "math")[0].parameters())
    # the Trainer's own step on the same crops and weights computes the same first loss
    assert row["loss_rel_diff_first_step_trainer"] < 1e-5
    assert row["trainer"]["total"] > 0 and row["images_per_s_trainer"] == pytest.approx(TINY.batch / row["trainer"]["total"])
    assert min(row["trainer_speedup_min_max"]) <= row["trainer_speedup"] <= max(row["trainer_speedup_min_max"])
    # a lever measured on and off: another Trainer with the override, from the same weights
    v = row["trainer_variants"]["trainer_global_clip"]
    assert v["overrides"] == ["optim.clip_mode=global"] and v["loss_rel_diff_first_step"] < 1e-6
    assert v["min"] <= v["total"] and v["images_per_s"] == pytest.approx(TINY.batch / v["total"])
    assert min(v["speedup_vs_trainer_min_max"]) <= v["speedup_vs_trainer"] <= max(v["speedup_vs_trainer_min_max"])
    assert "speedup_vs_compiled_reference" not in v
    assert row["achieved"]["trainer_global_clip"]["flops_per_s"] == pytest.approx(row["flops_per_step"] / v["total"])


def test_count_flops_and_peak() -> None:
    """count_flops counts a known matmul chain (forward and backward); the measured peak is a
    positive rate per dtype."""
    a = torch.randn(64, 32, requires_grad=True)
    b = torch.randn(32, 16)
    assert bstep.count_flops(lambda: (a @ b).sum().backward()) == 2 * 64 * 32 * 16 * 2  # fwd + grad of a
    peaks = bstep.peak_matmul_flops("cpu", n=128, repeats=1)
    assert set(peaks) == {"float32", "bfloat16"} and all(v > 0 for v in peaks.values())


def test_count_host_syncs_is_none_on_cpu_and_leaves_fn_uncalled() -> None:
    """On CPU there is no device for the host to wait on: the count is None, and the step is not
    run for nothing."""
    calls: list[int] = []
    assert bstep.count_host_syncs(lambda: calls.append(1), "cpu") is None
    assert calls == []


@pytest.mark.slow
def test_compiled_reference_side_computes_the_same_step() -> None:
    """The official step under torch.compile (the row a user would pick instead) gives the eager
    reference's first loss."""
    row = bstep.bench_setup(TINY, rounds=1, warmup=1, optimizer_repeats=1, compiled_reference=True)
    assert row["first_loss_reference_compiled"] == pytest.approx(row["first_loss_reference"], rel=1e-5)
    assert row["reference_compiled"]["total"] > 0 and row["trainer_speedup_vs_compiled_reference"] > 0


def test_trainer_side_is_the_trainers_step(monkeypatch, tmp_path) -> None:
    """TrainerSide.step runs Trainer.step_on_crops, not a copy of it."""
    from dino_fast.train.loop import Trainer

    calls = []
    real = Trainer.step_on_crops

    def spy(self, crops, epoch, it):
        calls.append((len(crops), epoch, it))
        return real(self, crops, epoch, it)

    monkeypatch.setattr(Trainer, "step_on_crops", spy)
    torch.manual_seed(0)
    sd = bstep.build_models(TINY, "sdpa")[0].state_dict()
    side = bstep.TrainerSide(TINY, sd, str(tmp_path))
    loss, secs = side.step(bstep.make_crops(TINY), seed=1)
    assert calls == [(TINY.ncrops, bstep.EPOCH, 0)] and loss > 0 and secs["total"] > 0


@pytest.mark.parametrize("kw, match", [
    ({"arch": "vit_huge"}, "arch must be"),
    ({"batch": 0}, "batch must be a positive int"),
    ({"n_local": -1}, "n_local must be"),
    ({"autocast": "fp16"}, "autocast must be"),
    ({"device": "tpu"}, "device must be"),
])
def test_setup_validation(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **kw)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind must be"):
        bstep.StepSide(TINY, "fast", {})
    with pytest.raises(ValueError, match="optimizer variant"):
        bstep.make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], "lion")
    with pytest.raises(ValueError, match="rounds must be"):
        bstep.bench_setup(TINY, rounds=0, warmup=0)
    with pytest.raises(ValueError, match="trainer variant names must start with 'trainer_'.*got 'compile'"):
        bstep.bench_setup(TINY, rounds=1, warmup=0, optimizer_repeats=1, compiled_reference=False,
                          trainer_variants=[("compile", ["model.compile=true"])])


def test_gpu_step_levers_are_valid_configs() -> None:
    """bench.gpu's Trainer levers load as configs (a typo would only show on a lent GPU)."""
    from bench import gpu
    from dino_fast.config import load_config

    names = [n for n, _ in gpu.TRAINER_LEVERS]
    assert len(set(names)) == len(names) and all(n.startswith("trainer_") for n in names)
    for _, overrides in gpu.TRAINER_LEVERS:
        load_config(None, list(overrides))

"""FSDP (``train.sharding=fsdp``, torch's ``fully_shard``) on 2 CPU ranks (gloo).

torch 2.13's FSDP2 runs on CPU with gloo (all-gather and reduce-scatter of the sharded
parameters and gradients, fp32 and bf16 parameters; measured), so everything here runs for real:

- a sharded run gives the losses, student, teacher and optimizer state of the DDP run on the
  same data (fp32; the gradients are reduced by a reduce-scatter instead of an all-reduce and the
  clipping norms are sums of shard norms: a few ulps per step, compared at rtol 1e-5);
- exact resume: N iterations straight == N/2, a fresh trainer resuming from the checkpoint, N/2
  (bitwise: weights, teacher, optimizer state, loss center);
- the checkpoint of a sharded run has the format of a DDP run (keys, shapes, dtypes, integer
  optimizer ids) and a DDP run resumes from it, an FSDP run from a DDP checkpoint;
- the EMA on the local shards equals the flat-buffer EMA bitwise, and a NaN on one rank's shard
  stops both ranks;
- the config and build-time errors.

All the multi-rank work of a module runs in one spawn of 2 ranks (the machine has 2 cores); the
tests then read what it wrote.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dino_fast.config import ConfigError
from dino_fast.utils import checkpoint as ck
from tests._dist_utils import free_port, spawn_ranks
from tests._train_utils import read_losses, tiny_config

ITERS = 6
# 24 images, batch 4 per rank at world size 2: 3 iterations per epoch
# drop path off: it draws per rank, so only then does 1 process at batch 8 train as 2 ranks at 4
COMMON = ("train.epochs=2", "train.threads=1", "train.dist_backend=gloo", "optim.clip_grad=0.3",
          "optim.freeze_last_layer=1", "optim.layerwise_decay=0.9", "model.drop_path_rate=0")


def _cfg(data_root: Path, out: Path, *extra: str):
    return tiny_config(data_root, out, *COMMON, *extra)


def _body(rank: int, data_root: Path, root: Path) -> dict:
    from dino_fast.train.loop import Trainer

    res: dict = {}
    fsdp = ("train.sharding=fsdp",)
    # (1) FSDP vs DDP on the same data
    Trainer(_cfg(data_root, root / "fsdp", *fsdp, f"train.max_iters={ITERS}")).fit()
    Trainer(_cfg(data_root, root / "ddp", f"train.max_iters={ITERS}")).fit()
    # (2) exact resume under FSDP: half, then a fresh trainer resumes
    Trainer(_cfg(data_root, root / "resume", *fsdp, f"train.max_iters={ITERS // 2}")).fit()
    if rank == 0:
        shutil.copytree(root / "resume", root / "fsdp_half")
        shutil.copytree(root / "resume", root / "fsdp_half_single")  # resumed by one process, in the test
    _barrier()
    Trainer(_cfg(data_root, root / "resume", *fsdp, f"train.max_iters={ITERS}", "train.resume=auto")).fit()
    # (3) checkpoints across shardings: DDP resumes from the FSDP half-way checkpoint; FSDP from DDP's
    Trainer(_cfg(data_root, root / "fsdp_half", f"train.max_iters={ITERS}", "train.resume=auto")).fit()
    Trainer(_cfg(data_root, root / "ddp_half", f"train.max_iters={ITERS // 2}")).fit()
    _barrier()
    Trainer(_cfg(data_root, root / "ddp_half", *fsdp, f"train.max_iters={ITERS}", "train.resume=auto")).fit()
    # bf16 parameters (fp32 head reduction), blocks reduced in bf16
    Trainer(_cfg(data_root, root / "bf16", *fsdp, "train.fsdp_param_dtype=bf16", "train.fsdp_block_reduce_dtype=bf16",
                 f"train.max_iters={ITERS}")).fit()
    # (4) the other methods under FSDP
    for name, extra in (("dinov2", ("method.name=dinov2", "optim.layerwise_decay=1.0")),
                        ("mugs", ("method.name=mugs", "mugs.queue_size=32", "mugs.memory_size=24",
                                  "optim.layerwise_decay=1.0"))):
        try:
            Trainer(_cfg(data_root, root / f"{name}_fsdp", *fsdp, *extra, "train.max_iters=2")).fit()
            Trainer(_cfg(data_root, root / f"{name}_ddp", *extra, "train.max_iters=2")).fit()
            res[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test
            res[name] = f"{type(e).__name__}: {e}"
    res["ema"] = _ema_checks(rank)
    return res


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _ema_checks(rank: int) -> dict:
    """The sharded EMA against the flat EMA on unsharded copies, and the NaN check on one rank."""
    import copy

    from dino_fast.config import load_config
    from dino_fast.methods.dino import build_student_teacher
    from dino_fast.ops.ema import NonFiniteEMAError, TeacherEMA
    from dino_fast.train.fsdp import build_mesh, shard_module

    cfg = load_config(None, ["model.arch=vit_tiny", "model.patch_size=8", "model.depth=2", "model.out_dim=64",
                             "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "data.global_crops_size=32",
                             "data.local_crops_size=16"])
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    with torch.no_grad():  # a student that differs from the teacher
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    flat_s, flat_t = copy.deepcopy(student), copy.deepcopy(teacher)
    mesh = build_mesh(torch.device("cpu"))
    shard_module(student, mesh)
    shard_module(teacher, mesh, reshard_root=True)
    sharded = TeacherEMA(teacher, student, check_finite=True)
    flat = TeacherEMA(flat_t, flat_s, check_finite=True)
    out: dict = {"sharded": sharded.sharded, "flat_sharded": flat.sharded, "numel_equal": sharded.numel == flat.numel}
    for m in (0.996, 0.9, 0.5):
        sharded.update(m)
        flat.update(m)
    full = {n: p.full_tensor() for n, p in teacher.named_parameters()}
    out["equal"] = all(torch.equal(full[n], p) for n, p in flat_t.named_parameters())
    try:
        _ = sharded.teacher_buffer
        out["buffer_error"] = ""
    except RuntimeError as e:
        out["buffer_error"] = str(e)
    before = {n: p.to_local().clone() for n, p in teacher.named_parameters()}
    if rank == 1:  # a NaN in rank 1's shard of one student tensor only
        with torch.no_grad():
            student.head.last_layer.weight_v.to_local()[0, 0] = float("nan")
    try:
        sharded.update(0.9)
        out["nan"] = "no error"
    except NonFiniteEMAError as e:
        out["nan"] = str(e)
    out["teacher_unchanged"] = all(torch.equal(before[n], p.to_local()) for n, p in teacher.named_parameters())
    with pytest.raises(ValueError, match="one side is sharded"):
        TeacherEMA(flat_t, student)
    with pytest.raises(ValueError, match="backend='triton' needs one flat buffer per side"):
        TeacherEMA(teacher, student, backend="triton")
    out["mixed_error"] = True
    return out


def _worker(rank: int, world: int, port: int, data_root: str, root: str) -> None:
    import gc

    from dino_fast.utils.distributed import cleanup, init_distributed

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    res: dict = {}
    try:
        init_distributed("gloo")
        res = _body(rank, Path(data_root), Path(root))
    except Exception as e:  # noqa: BLE001 - written for the test to show
        import traceback

        res = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    finally:
        Path(root, f"rank{rank}.json").write_text(json.dumps(res))
        gc.collect()
        cleanup()


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """Every 2-rank run of this module, in one spawn; returns (root, rank 0's result dict)."""
    root = tmp_path_factory.mktemp("fsdp")
    spawn_ranks(_worker, (2, free_port(), str(data_root), str(root)), 2, 600, "the FSDP ranks")
    res = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in res:
        assert "error" not in r, r["error"]
    return root, res


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: max |diff| {(a - b).abs().max().item()}"


def _tensors(state) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's student, teacher, optimizer and method state, by path."""
    out = {}
    for part in ("student", "teacher"):
        out.update({f"{part}.{k}": v for k, v in state[part].items()})
    for i, st in state["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in st.items()})
    out.update({f"method.{k}": v for k, v in state["method"]["state"].items()})
    return out


@pytest.mark.slow
def test_fsdp_matches_ddp(runs):
    root, _ = runs
    a, b = read_losses(root / "fsdp"), read_losses(root / "ddp")
    assert sorted(a) == list(range(ITERS))
    for i in range(ITERS):
        assert abs(a[i] - b[i]) <= 1e-5 * abs(b[i]), f"iteration {i}: fsdp {a[i]!r}, ddp {b[i]!r}"
    fa, fb = ck.load_checkpoint(root / "fsdp" / "checkpoint.pth"), ck.load_checkpoint(root / "ddp" / "checkpoint.pth")
    ta, tb = _tensors(fa), _tensors(fb)
    assert sorted(ta) == sorted(tb)
    # the DDP wrapper is not method state (it held the student a second time, _student_forward.*)
    assert sorted(fb["method"]["state"]) == sorted(fa["method"]["state"]) == ["dino_loss.center"]
    for k in tb:
        _close(ta[k].float(), tb[k].float(), k)
    assert fa["iteration"] == fb["iteration"] == ITERS
    # the same checkpoint format: plain tensors, integer optimizer ids, the same groups
    assert all(type(v) is torch.Tensor for v in ta.values())
    assert [g["params"] for g in fa["optimizer"]["param_groups"]] == [g["params"] for g in fb["optimizer"]["param_groups"]]
    assert [g["name"] for g in fa["optimizer"]["param_groups"]] == [g["name"] for g in fb["optimizer"]["param_groups"]]
    exp_a = torch.load(root / "fsdp" / "teacher_backbone.pth", weights_only=True)
    exp_b = torch.load(root / "ddp" / "teacher_backbone.pth", weights_only=True)
    assert sorted(exp_a) == sorted(exp_b)
    for k in exp_b:
        _close(exp_a[k], exp_b[k], f"teacher_backbone.{k}")


@pytest.mark.slow
def test_fsdp_exact_resume(runs):
    root, _ = runs
    straight = ck.load_checkpoint(root / "fsdp" / "checkpoint.pth")
    resumed = ck.load_checkpoint(root / "resume" / "checkpoint.pth")
    assert resumed["iteration"] == ITERS
    a, b = _tensors(straight), _tensors(resumed)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = read_losses(root / "fsdp"), read_losses(root / "resume")
    assert all(la[i] == lb[i] for i in range(ITERS))


@pytest.mark.slow
def test_checkpoints_move_between_fsdp_and_ddp(runs):
    root, _ = runs
    ddp, fsdp = ck.load_checkpoint(root / "ddp" / "checkpoint.pth"), ck.load_checkpoint(root / "fsdp" / "checkpoint.pth")
    # DDP resumed from the FSDP half-way checkpoint; FSDP from DDP's: both end where the straight runs do
    for path, ref in ((root / "fsdp_half", ddp), (root / "ddp_half", fsdp)):
        got = ck.load_checkpoint(path / "checkpoint.pth")
        assert got["iteration"] == ITERS
        ta, tb = _tensors(got), _tensors(ref)
        for k in tb:
            _close(ta[k].float(), tb[k].float(), f"{path.name}: {k}")


@pytest.mark.slow
def test_one_process_resumes_from_an_fsdp_checkpoint(runs, data_root):
    """A sharded run's checkpoint in a single, unsharded process at the global batch (8): the
    remaining iterations give the sharded run's losses (2 ranks at b = 1 process at 2b)."""
    from dino_fast.train.loop import Trainer

    root, _ = runs
    out = root / "fsdp_half_single"
    assert ck.load_checkpoint(out / "checkpoint.pth")["iteration"] == ITERS // 2
    Trainer(tiny_config(data_root, out, *COMMON, "data.batch_size_per_gpu=8", f"train.max_iters={ITERS}",
                        "train.resume=auto")).fit()
    a, b = read_losses(root / "fsdp"), read_losses(out)
    for i in range(ITERS):
        assert abs(a[i] - b[i]) <= 1e-5 * abs(a[i]), f"iteration {i}: fsdp {a[i]!r}, one process {b[i]!r}"


@pytest.mark.slow
def test_bf16_parameters_train(runs):
    """bf16 parameters (fp32 shards, optimizer and EMA; fp32 head reduction, bf16 block reduction):
    finite and near the fp32 run (bf16 rounding: 2 % of the loss), checkpoint in fp32."""
    root, _ = runs
    a, b = read_losses(root / "fsdp"), read_losses(root / "bf16")
    for i in range(ITERS):
        assert abs(a[i] - b[i]) <= 0.02 * abs(a[i]), f"iteration {i}: fp32 {a[i]!r}, bf16 {b[i]!r}"
    st = ck.load_checkpoint(root / "bf16" / "checkpoint.pth")
    assert all(v.dtype == torch.float32 for v in st["student"].values())
    assert all(v.dtype == torch.float32 for v in st["teacher"].values())


@pytest.mark.slow
def test_sharded_ema_equals_flat_ema_and_nan_stops_every_rank(runs):
    _, res = runs
    r0, r1 = res[0]["ema"], res[1]["ema"]
    for r in (r0, r1):
        assert r["sharded"] and not r["flat_sharded"] and r["numel_equal"]
        assert r["equal"], "the sharded EMA differs from the flat EMA"
        assert "sharded (FSDP) path" in r["buffer_error"]
        assert r["teacher_unchanged"] and r["mixed_error"]
    assert "'head.last_layer.weight_v'" in r1["nan"] and "on rank 1" in r1["nan"] and "not applied" in r1["nan"]
    assert "another rank's student shard holds a non-finite value" in r0["nan"]


@pytest.mark.slow
def test_other_methods_under_fsdp(runs):
    root, res = runs
    assert res[0]["dinov2"] == "ok", res[0]["dinov2"]
    assert res[0]["mugs"] == "ok", res[0]["mugs"]
    for name in ("dinov2", "mugs"):
        a, b = read_losses(root / f"{name}_fsdp"), read_losses(root / f"{name}_ddp")
        for i in range(2):
            assert abs(a[i] - b[i]) <= 1e-5 * abs(b[i]), f"{name} iteration {i}: fsdp {a[i]!r}, ddp {b[i]!r}"


# ------------------------------------------------------------------------------------ errors

def test_bad_sharding_config_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(ConfigError, match=r"train.sharding must be one of \['none', 'fsdp'\], got 'zero3'"):
        tiny_config(data_root, tmp_path, "train.sharding=zero3")
    with pytest.raises(ConfigError, match=r"train.fsdp_param_dtype must be one of \['auto', 'bf16', 'fp32'\], got 'fp16'"):
        tiny_config(data_root, tmp_path, "train.fsdp_param_dtype=fp16")
    with pytest.raises(ConfigError, match=r"train.fsdp_block_reduce_dtype must be one of"):
        tiny_config(data_root, tmp_path, "train.fsdp_block_reduce_dtype=fp64")
    with pytest.raises(ConfigError, match=r"train.sharding=fsdp supports train.precision auto, bf16 or fp32, got 'fp16'"):
        tiny_config(data_root, tmp_path, "train.sharding=fsdp", "train.precision=fp16")
    with pytest.raises(ConfigError, match=r"model.fused_multicrop_attention=true is not supported with train.sharding=fsdp"):
        tiny_config(data_root, tmp_path, "train.sharding=fsdp", "model.fused_multicrop_attention=true")
    assert tiny_config(data_root, tmp_path).train.sharding == "none"


def test_fsdp_without_a_process_group_is_a_clear_error(data_root, tmp_path):
    from dino_fast.train.loop import Trainer

    with pytest.raises(ValueError, match=r"train.sharding=fsdp needs torch.distributed initialised: launch with torchrun"):
        Trainer(tiny_config(data_root, tmp_path / "o", "train.sharding=fsdp"))


def test_a_method_without_fsdp_support_is_named(data_root, tmp_path, monkeypatch):
    from dino_fast.methods.dino import DINO
    from dino_fast.train.loop import Trainer

    monkeypatch.setattr(DINO, "fsdp_unsupported", "its queue is per rank")
    with pytest.raises(ValueError, match=r"method 'dino' does not support train.sharding=fsdp: its queue is per rank"):
        Trainer(tiny_config(data_root, tmp_path / "o", "train.sharding=fsdp"))


def test_fsdp_param_dtype():
    from dino_fast.train.fsdp import fsdp_param_dtype

    assert fsdp_param_dtype("auto", "bf16") is torch.bfloat16
    assert fsdp_param_dtype("auto", "fp32") is None
    assert fsdp_param_dtype("bf16", "fp32") is torch.bfloat16
    assert fsdp_param_dtype("fp32", "bf16") is None
    with pytest.raises(ValueError, match="got 'fp16'"):
        fsdp_param_dtype("fp16", "bf16")


@pytest.mark.slow
def test_torchrun_fsdp_with_knn_evaluation(data_root, tmp_path):
    """The command line under torchrun with train.sharding=fsdp: training, the gathered teacher
    export, and rank 0's k-NN evaluation on the unsharded copy (Trainer.eval_backbone)."""
    from tests._train_utils import write_config
    from tests.reliability.test_distributed import run, torchrun

    out = tmp_path / "cli"
    cfg = write_config(_cfg(data_root, out, "train.sharding=fsdp", "train.max_iters=3", "eval.knn_after_training=true",
                            f"data.val_root={data_root}", "eval.linear_after_training=false", "eval.image_size=32",
                            "eval.resize_size=36", "eval.knn_k=[5]", "eval.batch_size=8",
                            "eval.compare_random_init=false"), tmp_path / "cli.yaml")
    proc = run(torchrun(["--standalone", "--nproc_per_node", "2"], cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP: student and teacher sharded over 2 ranks" in proc.stderr
    knn = json.loads((out / "knn.json").read_text())
    assert 0 <= knn["teacher"]["5"]["top1"] <= 100
    exported = torch.load(out / "teacher_backbone.pth", weights_only=True)
    final = ck.load_checkpoint(out / "checkpoint.pth")["teacher"]
    assert sorted(exported) == sorted(k[len("backbone."):] for k in final if k.startswith("backbone."))
    assert all(torch.equal(v, final[f"backbone.{k}"]) for k, v in exported.items())

"""Basic checks every registered method gets for free: one CPU step, named terms in the
metrics, exact resume, and a method-state round trip. A new method is added to the list by
registering it (see docs/DESIGN.md, "Adding a method"); the toy method of tests/methods/toy.py
is the worked example."""
from __future__ import annotations

import json
import math

import pytest
import torch

import tests.methods.toy  # noqa: F401  (registers "toy")
from dino_fast.config import ConfigError
from dino_fast.methods import METHODS, Method, build_method, get_method, method_names, register_method
from dino_fast.train.loop import Trainer
from dino_fast.utils import checkpoint as ck
from tests._train_utils import read_losses, tiny_config

NAMES = method_names()


def test_builtin_and_toy_methods_are_registered() -> None:
    assert {"dino", "toy"} <= set(NAMES)
    assert get_method("dino").name == "dino"


def test_unknown_method_is_a_config_error(data_root, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"method.name must be one of \[.*'dino'.*\], got 'nope'"):
        Trainer(tiny_config(data_root, tmp_path, "method.name=nope"))


def test_register_refuses_a_second_class_and_non_methods() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method("toy")(type("Other", (Method,), {}))
    with pytest.raises(TypeError, match="Method subclass"):
        register_method("not_a_method")(int)
    assert "not_a_method" not in METHODS


@pytest.mark.parametrize("name", NAMES)
def test_one_cpu_step_logs_every_term(name, data_root, tmp_path) -> None:
    out = tmp_path / name
    summary = Trainer(tiny_config(data_root, out, f"method.name={name}", "train.max_iters=2")).fit()
    assert summary["iterations"] == 2 and math.isfinite(summary["last_loss"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    terms = [k for k in records[0] if k.startswith("loss/")]
    assert terms, records[0]
    for rec in records:
        assert all(math.isfinite(rec[k]) for k in terms)
    state = ck.load_checkpoint(out / "checkpoint.pth")
    assert state["method"]["name"] == name and {"student", "teacher"} <= set(state)


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_exact(name, data_root, tmp_path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(tiny_config(data_root, full, f"method.name={name}", "train.max_iters=4")).fit()
    Trainer(tiny_config(data_root, part, f"method.name={name}", "train.max_iters=2")).fit()
    Trainer(tiny_config(data_root, part, f"method.name={name}", "train.max_iters=4")).fit()
    a, b = read_losses(full), read_losses(part)
    assert [a[i] for i in range(4)] == [b[i] for i in range(4)]
    ca, cb = ck.load_checkpoint(full / "checkpoint.pth"), ck.load_checkpoint(part / "checkpoint.pth")
    for key in ("student", "teacher"):
        for k, v in ca[key].items():
            assert torch.equal(v, cb[key][k]), (key, k)
    for k, v in ca["method"]["state"].items():
        assert torch.equal(v, cb["method"]["state"][k]), k


@pytest.mark.parametrize("name", NAMES)
def test_method_state_round_trip(name, data_root, tmp_path) -> None:
    cfg = tiny_config(data_root, tmp_path, f"method.name={name}")
    torch.manual_seed(0)
    a = build_method(cfg)
    for v in a.method_state_dict().values():
        if v.is_floating_point():
            v.add_(torch.randn_like(v))
        else:
            v.add_(3)
    torch.manual_seed(1)
    b = build_method(cfg)
    b.load_method_state_dict(a.method_state_dict())
    for k, v in a.method_state_dict().items():
        assert torch.equal(v, b.method_state_dict()[k]), k
    with pytest.raises(KeyError, match="missing keys"):
        b.load_method_state_dict({})
    assert not any(k.startswith(("student.", "teacher.")) for k in a.method_state_dict())


def test_checkpoint_of_another_method_is_refused(data_root, tmp_path) -> None:
    Trainer(tiny_config(data_root, tmp_path, "method.name=toy", "train.max_iters=1")).fit()
    with pytest.raises(ck.CheckpointError, match="written by method 'toy'"):
        Trainer(tiny_config(data_root, tmp_path, "method.name=dino", "train.max_iters=2")).fit()


def test_old_format_dino_checkpoint_resumes(data_root, tmp_path) -> None:
    """A checkpoint of the format before methods (the center under 'dino_loss') still resumes."""
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(tiny_config(data_root, full, "train.max_iters=4")).fit()
    Trainer(tiny_config(data_root, part, "train.max_iters=2")).fit()
    state = ck.load_checkpoint(part / "checkpoint.pth")
    method = state.pop("method")
    state["dino_loss"] = {"center": method["state"]["dino_loss.center"]}
    ck.atomic_save(state, part / "checkpoint.pth")
    Trainer(tiny_config(data_root, part, "train.max_iters=4")).fit()
    a, b = read_losses(full), read_losses(part)
    assert [a[i] for i in range(4)] == [b[i] for i in range(4)]

"""Backend dispatch rules and the CLI dispatcher."""
import pytest
import torch

from dino_fast import cli
from dino_fast.ops import backend as _backend


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_auto_on_cuda_is_triton(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_cpu_alias_and_explicit_choices():
    cpu = torch.device("cpu")
    assert _backend.resolve_backend("cpu", cpu) == "torch"
    assert _backend.resolve_backend("reference", cpu) == "reference"
    # conftest sets TRITON_INTERPRET=1: explicit triton on CPU tensors is honoured.
    assert _backend.resolve_backend("triton", cpu) == "triton"


def test_env_var_overrides_auto_only(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.resolve_backend("auto", cpu) == "reference"
    assert _backend.resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        _backend.resolve_backend("auto", cpu)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _backend.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("bad", ["fast", "", None, 3])
def test_unknown_backend_names_the_choices(bad):
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.check_backend(bad)


def test_cli_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_cli_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err

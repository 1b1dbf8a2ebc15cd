"""Test configuration: Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported anywhere, hence here, at the top.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    """Fresh random inputs every run (seed printed on failure through the test id is not needed:
    a failing input is reported with its shapes and error); torch's global RNG is reseeded from
    the OS so runs differ."""
    torch.seed()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A small labelled image folder, one per test module (tests/_train_utils.make_image_folder)."""
    from tests._train_utils import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("imgs"))


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def pytest_report_header(config):  # noqa: D103
    versions = ", ".join(f"{m} {_version(m)}" for m in ("triton", "numpy", "ffcv", "numba", "opencv-python"))
    return (f"torch {torch.__version__}, {versions}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")

"""Test configuration: Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported anywhere, hence here, at the top.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SEED_ENV = "DINO_FAST_TEST_SEED"
# Fresh random inputs every run, reproducible on demand: the session seed comes from the OS (or
# from DINO_FAST_TEST_SEED), is printed in the header and beside every failure, and each test
# reseeds torch, numpy and random from (session seed, test id).
SESSION_SEED = int(os.environ.get(SEED_ENV) or int.from_bytes(os.urandom(4), "little"))


@pytest.fixture(autouse=True)
def _fresh_seed(request) -> None:
    import random
    import zlib

    import numpy as np

    seed = (SESSION_SEED * 1_000_003 + zlib.crc32(request.node.nodeid.encode())) % (2**32)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def pytest_runtest_makereport(item, call):  # noqa: D103
    if call.excinfo is not None and call.when == "call":
        item.add_report_section("call", "seed", f"{SEED_ENV}={SESSION_SEED} reproduces this run's inputs")


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
    return [f"torch {torch.__version__}, {versions}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
            f"test seed {SESSION_SEED} (set {SEED_ENV}={SESSION_SEED} to repeat this run's random inputs)"]

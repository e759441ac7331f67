import contextlib
import os

import pytest
import torch

# Tests run on 2 cores; keep torch from oversubscribing them when xdist or subprocesses run too: one
# thread per xdist worker (two workers on two cores), else up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """The MNIST demo shards (train/ and val/), built once per test session."""
    from gspn_lightning.data.mnist_demo import build_mnist_demo

    out = tmp_path_factory.mktemp("mnist") / "demo_mnist"
    build_mnist_demo(out)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A complete tiny SD-XL folder in the diffusers layout (random weights, seed 0), built once per
    session by gspn_lightning.testing.make_tiny_sdxl. Treat it as read-only (copy it to
    change it)."""
    from gspn_lightning.testing import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", seed=0)


@contextlib.contextmanager
def torch_threads(n: int):
    """``n`` torch threads inside the block, the previous number restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def two_torch_threads():
    """Two torch threads for one test that needs the kernels' multi-task paths, whatever the worker's
    default (one under xdist)."""
    with torch_threads(2):
        yield


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module of tiny-model tests: OpenMP barriers between two threads cost more
    than such work (measured 100x slower on a loaded 2-core machine). Use with
    ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    with torch_threads(1):
        yield

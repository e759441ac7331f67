import os

import pytest
import torch

# Tests run on 2 cores; keep torch from oversubscribing them when xdist or subprocesses run too.
torch.set_num_threads(min(2, os.cpu_count() or 1))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """The MNIST demo shards (train/ and val/), built once per test session."""
    from gspn_lightning.data.mnist_demo import build_mnist_demo

    out = tmp_path_factory.mktemp("mnist") / "demo_mnist"
    build_mnist_demo(out)
    return out

import os

import pytest
import torch

# Tests run on 2 cores; keep torch from oversubscribing them when xdist or subprocesses run too.
torch.set_num_threads(min(2, os.cpu_count() or 1))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords or "[cuda" in item.name:
            item.add_marker(skip)

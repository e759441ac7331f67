import os

import torch

# Tests run on 2 cores; keep torch from oversubscribing them when xdist or subprocesses run too.
torch.set_num_threads(min(2, os.cpu_count() or 1))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

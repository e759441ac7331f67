"""env: what the machine is (GPU, driver, compiler, package versions)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import torch

from benchmarks.gpu_check.harness import GIB, Record

PACKAGES = ("lightning", "torchmetrics", "torchvision", "triton", "webdataset", "jsonargparse", "diffusers")


def run(args, rec: Record) -> None:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "hostname_kind": platform.machine(),
    }
    if torch.cuda.is_available() and not args.rehearsal:
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            memory_gib=round(p.total_memory / GIB, 1),
        )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
        info["nvcc"] = nvcc.stdout.strip().splitlines()[-1] if nvcc.stdout.strip() else "?"
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvcc"] = f"unavailable ({type(exc).__name__})"
    for mod in PACKAGES:  # installed versions, read from the metadata: importing them takes seconds
        try:
            info[f"pkg_{mod}"] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:  # absent is an answer
            info[f"pkg_{mod}"] = None
    rec.set(info=info)

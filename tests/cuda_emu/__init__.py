"""Host emulation of the CUDA kernels: csrc/cuda's kernel bodies executed on the CPU in the tests.

``cuda_host_emu.h`` emulates the CUDA execution model on the host (one std::thread per CUDA thread,
a std::barrier for ``__syncthreads``, warp shuffles through a per-warp exchange); ``emu_ops.cpp``
compiles the kernel headers (``csrc/cuda/*_kernels.h``) with it and registers
``torch.ops.gspn_cuda_emu.*``: the scan and the fused propagations, forward and backward, launched
with the same plan as the CUDA launchers (``csrc/cuda/gspn_cuda_plan.h``), on CPU tensors of float32
or float64 (``propagate_proj``: also bfloat16 and float16).  :func:`load` builds that library with ``torch.utils.cpp_extension.load`` (C++20) into the
kernels' cache folder, keyed by a hash of every source it compiles, like the kernels' own builds: the
first build takes half a minute to a minute on a loaded 2-core machine, later processes load it at
once.  ``race_check.cpp`` runs the same kernels in a plain program for ThreadSanitizer.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import threading
from pathlib import Path

import torch

from gspn_lightning.ops import _build

HERE = Path(__file__).resolve().parent
NAME = "gspn_cuda_emu"
_SOURCES = ["emu_ops.cpp"]
_CFLAGS = ["-O2", "-std=c++20", "-pthread"]
_LDFLAGS = ["-pthread"]
_lock = threading.Lock()
_loaded = False


def _inputs() -> list[Path]:
    """Every file the library is compiled from: this folder's C++ and the kernel sources' headers."""
    local = sorted(p for p in HERE.iterdir() if p.suffix in (".h", ".cpp"))
    csrc = sorted(p for p in _build.CSRC.rglob("*.h"))
    return local + csrc


def fingerprint() -> str:
    h = hashlib.sha256()
    for path in _inputs():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    meta = [NAME, torch.__version__, sys.version.split()[0], sys.platform, _CFLAGS, _LDFLAGS]
    h.update(repr(meta).encode())
    return h.hexdigest()[:16]


def load() -> None:
    """Build (first use, under a file lock) and load ``torch.ops.gspn_cuda_emu``."""
    global _loaded
    with _lock:
        if _loaded:
            return
        tag = fingerprint()
        root = _build.cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        build_dir = root / f"{NAME}-{tag}"
        build_dir.mkdir(exist_ok=True)
        library, done = build_dir / f"{NAME}.so", build_dir / "DONE"
        with open(root / f"{NAME}-{tag}.lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                if done.exists() and library.exists():
                    torch.ops.load_library(str(library))
                else:
                    (build_dir / "lock").unlink(missing_ok=True)  # a killed build's baton
                    from torch.utils import cpp_extension

                    cpp_extension.load(
                        name=NAME,
                        sources=[str(HERE / s) for s in _SOURCES],
                        extra_cflags=list(_CFLAGS),
                        extra_ldflags=list(_LDFLAGS),
                        extra_include_paths=[str(_build.CSRC), str(HERE)],
                        build_directory=str(build_dir),
                        is_python_module=False,
                        with_cuda=False,
                        verbose=bool(os.environ.get("GSPN_VERBOSE_BUILD")),
                    )
                    done.write_text(tag + "\n")
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
        _loaded = True

"""JIT build and loading of the compiled GSPN scan kernels.

The C++ (CPU) and C++/CUDA extensions are built with ``torch.utils.cpp_extension.load`` into a cache
folder, ``$GSPN_EXTENSIONS_DIR`` or ``~/.cache/gspn_lightning``.  Each build lives in a folder named
after a hash of its sources, flags, the CPU instruction set it targets (:func:`cpu_isa`) and the
torch/CUDA/Python versions, so a changed source or a new
torch never loads a stale library.  The first use builds (about a minute for the CPU kernels, a few
for CUDA); later processes find the finished library and load it directly, without running ninja.

Several processes starting together (the ranks of one DDP job) serialise on an ``fcntl`` lock next to
the build folder, so only one compiles and the others load its result.  A library is marked done only
after it loaded once, so a build killed half-way is simply redone.

A library is verified before every load: the build records its size and sha256 in
``<name>.so.json`` beside it (written atomically, before ``DONE``), and a library that does not match
its record — truncated or overwritten by a disk-full copy, a killed ``rsync`` of a home folder — is
rebuilt with a warning instead of being loaded (loading a truncated shared library kills the process
with SIGBUS, without a message).  A finished build without a record (a cache written before records
existed) cannot be verified and is rebuilt once, with a warning, the same way.  Hashing the library
costs a few milliseconds per process.

The CPU extension defines the operator schemas and must load first; the CUDA extension only adds the
CUDA kernels.  The CUDA one is built only when CUDA is usable, or when ``GSPN_BUILD_CUDA=1`` (CI
compiles and links it on a machine without a GPU).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _registry


def _find_csrc() -> Path:
    """The kernel sources: the checkout's top-level ``csrc/`` (editable installs, the repository), else
    the copy a wheel ships as ``gspn_lightning/csrc``."""
    here = Path(__file__).resolve()
    for root in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if (root / "gspn_ops.cpp").is_file():
            return root
    return here.parents[2] / "csrc"  # missing: the build reports the absent file


CSRC = _find_csrc()

_CPU_SOURCES = [
    "gspn_ops.cpp",
    "cpu/gspn_cpu.cpp",
    "cpu/gspn_propagate_cpu.cpp",
    "cpu/gspn_propagate_proj_cpu.cpp",
    "cpu/gspn_attention_cpu.cpp",
    "cpu/gspn_norm_cpu.cpp",
]
_CUDA_SOURCES = [
    "cuda/gspn_cuda.cpp",
    "cuda/gspn_cuda.cu",
    "cuda/gspn_propagate_cuda.cu",
    "cuda/gspn_lanes_cuda.cu",
    "cuda/gspn_norm_cuda.cu",
]
_HEADERS = [
    "gspn_step.h",
    "gspn_layout.h",
    "gspn_norm.h",
    "gspn_norm_args.h",
    "cpu/gspn_propagate_common.h",
    "cpu/gspn_transpose.h",
    "cuda/gspn_cuda.h",
]
# -fno-trapping-math lets GCC if-convert the float clamps and selects of the fused kernel's loops
# (so they vectorise); the kernels never rely on floating-point exceptions.
_CPU_CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
# Extra flags per CPU instruction set; the set is part of the build's cache key (see cpu_isa).  On
# AVX-512 machines the compiler's own loop vectorisation stays 256 bits wide (short lines and masked
# tails lose with 16 lanes; measured slower), but every loop gets 32 vector registers (fewer spills in
# the fused kernel's wide loops) and AVX-512 instructions, and the hand-blocked gate projection uses
# 512-bit vectors (csrc/cpu/gspn_propagate_proj_cpu.cpp, Vec).
_ISA_CFLAGS = {
    "base": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": [
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-mavx512f",
        "-mavx512dq",
        "-mavx512bw",
        "-mavx512vl",
        "-mprefer-vector-width=256",
    ],
}
_CPU_LDFLAGS = ["-fopenmp"]
_CUDA_CFLAGS = ["-O3"]
_CUDA_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
# The CUDA kernels' headers (hashed into the CUDA build's key only; the test suite's host emulation,
# tests/cuda_emu/, compiles them too).
_CUDA_HEADERS = [
    "cuda/gspn_kernel_common.h",
    "cuda/gspn_scan_kernels.h",
    "cuda/gspn_propagate_kernels.h",
    "cuda/gspn_lanes_kernels.h",
    "cuda/gspn_attention_kernels.h",
    "cuda/gspn_tile_kernels.h",
    "cuda/gspn_cuda_plan.h",
    "cuda/gspn_cuda_launch.h",
    "cuda/gspn_norm_kernels.h",
    "cuda/gspn_norm_plan.h",
]


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    cpu: bool | None = None  # None: not tried yet
    cuda: bool | None = None
    errors: dict = field(default_factory=dict)


_STATE = _State()


def cache_dir() -> Path:
    """Where built extensions live: ``$GSPN_EXTENSIONS_DIR`` or ``~/.cache/gspn_lightning``."""
    root = os.environ.get("GSPN_EXTENSIONS_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gspn_lightning"


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: ``$CUDA_HOME``/``$CUDA_PATH``, else a ``/usr/local/cuda*`` holding nvcc.

    torch guesses the root from ``which nvcc``, which is wrong where nvcc on PATH is a wrapper script
    (``/usr/local/bin/nvcc`` gives ``/usr/local``), so a real toolkit folder is looked for first.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and Path(root, "bin", "nvcc").exists():
            return root
    for root in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if Path(root, "bin", "nvcc").exists():
            return str(Path(root).resolve())
    return None


def _torch_cuda_include() -> list[str]:
    """torch's bundled CUDA headers (``nvidia/cu*/include``), for toolkits that lack some (cusparse.h)."""
    paths = []
    for sp in {sysconfig.get_paths()["purelib"], str(Path(torch.__file__).parents[1])}:
        paths += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "include")))
    return list(dict.fromkeys(paths))


def cpu_isa() -> str:
    """The instruction set the CPU kernels are built for on this machine: ``"avx512"`` (AVX-512 F, DQ,
    BW and VL with AVX2 + FMA) where PyTorch's own runtime detection reports AVX512, ``"avx2"`` (AVX2
    + FMA) where it reports AVX2, else ``"base"``.

    ``$GSPN_CPU_ISA`` (``base`` / ``avx2`` / ``avx512``) overrides it.  The ISA is part of the build
    folder's hash, so a cache shared between machines (a home folder on a cluster) holds one build per
    ISA and never hands a node a library it cannot run.
    """
    forced = os.environ.get("GSPN_CPU_ISA", "")
    if forced:
        if forced not in _ISA_CFLAGS:
            raise ValueError(f"GSPN_CPU_ISA must be one of {sorted(_ISA_CFLAGS)}, got {forced!r}")
        return forced
    # ATen's AVX2 level requires FMA as well, its AVX512 level AVX-512 F, BW, VL and DQ
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "base")


def _fingerprint(name: str, sources: list[str], flags: list) -> str:
    h = hashlib.sha256()
    for rel in sorted(set(sources + _HEADERS)):
        h.update(rel.encode())
        h.update((CSRC / rel).read_bytes())
    meta = [name, torch.__version__, str(torch.version.cuda), sys.version.split()[0], sys.platform, flags]
    h.update(repr(meta).encode())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_record(library: Path) -> Path:
    """Where the size and sha256 of a built ``library`` are recorded: ``<library>.json`` beside it."""
    return library.with_name(library.name + ".json")


def record_library(library: Path) -> None:
    """Record ``library``'s size and sha256 beside it, atomically (a temporary file renamed)."""
    record = library_record(library)
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"size": library.stat().st_size, "sha256": _sha256(library)}) + "\n")
    os.replace(tmp, record)


def library_problem(library: Path) -> str | None:
    """``None`` when ``library`` matches the size and sha256 its build recorded, else what is wrong
    (no record, a different size or content): such a library must not be loaded."""
    record = library_record(library)
    try:
        expected = json.loads(record.read_text())
        size, digest = int(expected["size"]), str(expected["sha256"])
    except FileNotFoundError:
        return f"has no record of its size and hash ({record.name}; a cache older than these records)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"has an unreadable record {record.name} ({type(exc).__name__}: {exc})"
    actual = library.stat().st_size
    if actual != size:
        return f"is {actual} bytes but was built with {size} (truncated or overwritten)"
    if _sha256(library) != digest:
        return "does not match the sha256 recorded at its build (overwritten or corrupted)"
    return None


def _load(name: str, sources: list[str], cuda: bool, verbose: bool) -> None:
    """Build (if needed, under a file lock) and load one extension into ``torch.ops``."""
    extra_include = [str(CSRC)]
    cuda_home = find_cuda_home()
    if cuda:
        if cuda_home is None:
            raise RuntimeError("no CUDA toolkit found: set CUDA_HOME to the folder holding bin/nvcc")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # load() cannot detect an architecture without a GPU; this build only has to compile.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        extra_include += _torch_cuda_include()
    cpu_cflags = _CPU_CFLAGS + _ISA_CFLAGS[cpu_isa()]
    flags = [
        cpu_cflags,
        _CPU_LDFLAGS,
        _CUDA_CFLAGS,
        _CUDA_NVCC_FLAGS,
        os.environ.get("TORCH_CUDA_ARCH_LIST"),
    ]
    tag = _fingerprint(name, sources + (_CUDA_HEADERS if cuda else []), flags if cuda else flags[:2])
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    build_dir = root / f"{name}-{tag}"
    build_dir.mkdir(exist_ok=True)
    library = build_dir / f"{name}.so"
    done = build_dir / "DONE"
    if done.exists() and library.exists() and library_problem(library) is None:
        torch.ops.load_library(str(library))
        return
    with open(root / f"{name}-{tag}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released by the OS if this process dies
        try:
            problem = library_problem(library) if done.exists() and library.exists() else None
            if problem is not None:
                warnings.warn(
                    f"gspn_lightning: the cached kernel library {library} {problem}; rebuilding it",
                    RuntimeWarning,
                    stacklevel=2,
                )
                # start from an empty folder: ninja would take a damaged library (or object) that is
                # newer than its sources for up to date
                shutil.rmtree(build_dir, ignore_errors=True)
                build_dir.mkdir(exist_ok=True)
            if problem is not None or not (done.exists() and library.exists()):
                # A 'lock' baton left by a killed torch build would block load() forever; no other
                # process can be building here while this one holds the flock.
                (build_dir / "lock").unlink(missing_ok=True)
                if cuda_home is not None:
                    # cpp_extension reads CUDA_HOME once, on import; its own guess can be wrong.
                    os.environ.setdefault("CUDA_HOME", cuda_home)
                from torch.utils import cpp_extension

                if cuda:
                    cpp_extension.CUDA_HOME = cuda_home
                if verbose or os.environ.get("GSPN_VERBOSE_BUILD"):
                    print(f"gspn_lightning: building {name} in {build_dir} (first use only)", file=sys.stderr)
                # Copies: load() appends to the lists it is given, and these module-level ones are
                # part of the next build's cache key (a CPU build used to change the CUDA build's
                # key in the same process, so CI's tests rebuilt what its set-up had just built).
                cpp_extension.load(
                    name=name,
                    sources=[str(CSRC / s) for s in sources],
                    extra_cflags=list(_CUDA_CFLAGS if cuda else cpu_cflags),
                    extra_cuda_cflags=list(_CUDA_NVCC_FLAGS),
                    extra_ldflags=[] if cuda else list(_CPU_LDFLAGS),
                    extra_include_paths=extra_include,
                    build_directory=str(build_dir),
                    is_python_module=False,
                    with_cuda=cuda,
                    verbose=bool(os.environ.get("GSPN_VERBOSE_BUILD")),
                )
                record_library(library)
                done.write_text(tag + "\n")
            else:
                torch.ops.load_library(str(library))
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _load_once(kind: str, load: Callable[[], None]) -> bool:
    """Run ``load`` for the ``"cpu"`` or ``"cuda"`` extension unless this process already tried (under
    the state's lock); whether it is loaded. A failure is kept for :func:`build_error`."""
    with _STATE.lock:
        if getattr(_STATE, kind) is None:
            try:
                load()
                setattr(_STATE, kind, True)
            except Exception as exc:  # noqa: BLE001 - any build/load failure means "use the reference"
                _STATE.errors[kind] = f"{type(exc).__name__}: {exc}"
                setattr(_STATE, kind, False)
    return getattr(_STATE, kind)


def load_cpu(verbose: bool = False) -> bool:
    """Load (building on first use) the CPU kernels and register the op; False if that failed."""
    if _STATE.cpu is not None:
        return _STATE.cpu

    def load() -> None:
        _load("gspn_lightning_cpu", _CPU_SOURCES, cuda=False, verbose=verbose)
        _registry.register()

    return _load_once("cpu", load)


def cuda_wanted() -> bool:
    return torch.cuda.is_available() or os.environ.get("GSPN_BUILD_CUDA", "") not in ("", "0")


def load_cuda(verbose: bool = False, force: bool = False) -> bool:
    """Load (building on first use) the CUDA kernels; needs the CPU extension (the schemas)."""
    if _STATE.cuda is not None:
        return _STATE.cuda
    if not (force or cuda_wanted()):
        return False
    if not load_cpu(verbose):
        _STATE.errors["cuda"] = "the CPU extension, which defines the op, is unavailable"
        _STATE.cuda = False
        return False
    return _load_once("cuda", lambda: _load("gspn_lightning_cuda", _CUDA_SOURCES, cuda=True, verbose=verbose))


def build_error(kind: str) -> str | None:
    """Why the ``"cpu"`` or ``"cuda"`` extension is unavailable (None if it loaded or was not tried)."""
    return _STATE.errors.get(kind)

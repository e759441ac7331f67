"""build: the extensions for the visible GPU only, timed."""

from __future__ import annotations

import os
import time

from benchmarks.gpu_check.harness import Record


def _timed(rec: Record, extension: str, load) -> bool:
    """``load()`` of one extension, recorded with its time and its build error (if any)."""
    from gspn_lightning.ops import _build

    t0 = time.perf_counter()
    ok = load()
    rec.add(extension=extension, ok=ok, seconds=round(time.perf_counter() - t0, 1),
            error=_build.build_error(extension))  # fmt: skip
    return ok


def run(args, rec: Record) -> None:
    from gspn_lightning.ops import _build

    rec.set(
        cache=str(_build.cache_dir()),
        cuda_home=_build.find_cuda_home(),
        arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"),
    )
    if not _timed(rec, "cpu", lambda: _build.load_cpu(verbose=True)):  # the ops' schemas live there
        raise RuntimeError(f"CPU extension failed: {_build.build_error('cpu')}")
    if args.rehearsal:
        rec.skip("cuda extension", "CPU rehearsal: no GPU (CI compiles it with GSPN_BUILD_CUDA=1)")
        return
    if not _timed(rec, "cuda", lambda: _build.load_cuda(verbose=True, force=True)):
        raise RuntimeError(f"CUDA extension failed: {_build.build_error('cuda')}")


def table(data: dict) -> list[str]:
    """The report's line for this section's record."""
    build = data.get("results", [])
    if not build:
        return []
    return ["", "**Build**: " + ", ".join(f"{r['extension']} {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s"
                                          for r in build)]  # fmt: skip

"""Shared helpers of the benchmarks: machine description, interleaved timing rounds, copy bandwidth,
summaries (median and range) and result files that never overwrite earlier ones unless asked.

Every benchmark here times its variants in *interleaved rounds* (round r times variant A, then B,
then C, ..., then round r + 1), so that a slow spell of a shared machine hits all variants alike;
ratios are formed per round and reported as median and range over the rounds.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["name"] = info["gpu"].replace(" ", "-")
    else:
        info["name"] = (
            f"{info['cores']}core-" + "".join(c if c.isalnum() else "-" for c in cpu).strip("-")[:40]
        )
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(
    variants: dict[str, Callable[[], object]], device: torch.device, rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each variant per round, the variants run one after another within each round."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(time_once(fn, device))
    return times


def copy_fn(device: torch.device, nbytes: int) -> tuple[Callable[[], object], int]:
    """A copy of ``nbytes`` (float32) into preallocated memory, and the bytes it moves (read + write)."""
    src = torch.randn(max(1, nbytes // 4), device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * 4


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratios(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num/den, summarised."""
    return summary([a / b for a, b in zip(num, den)])


def fmt(s: dict, digits: int = 2, unit: str = "") -> str:
    """``median [min-max]``."""
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def new_result_path(out_dir: Path, stem: str, replace: bool) -> Path:
    """``out_dir/stem`` (suffix added by the caller), or, if a file of that stem exists and ``replace``
    is false, ``stem-2``, ``stem-3``, ... so that earlier results are never overwritten."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if replace or not any(out_dir.glob(f"{stem}.*")):
        return out_dir / stem
    n = 2
    while any(out_dir.glob(f"{stem}-{n}.*")):
        n += 1
    return out_dir / f"{stem}-{n}"


def write_results(path_stem: Path, result: dict, markdown: list[str]) -> None:
    path_stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    path_stem.with_suffix(".md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {path_stem}.json and .md")


def log_slope(xs, ys) -> float | None:
    """Least-squares slope p of log(y) against log(x), y ~ x ** p; None for fewer than two points."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def fit_exponent(sizes, times) -> float:
    """Least-squares slope p of log(time) against log(size ** 2): time ~ pixels ** p for square sizes."""
    return log_slope([s * s for s in sizes], times)


# Peak memory on the CPU: the growth of a fresh process's resident set over one step, with glibc serving
# every block above 64 KiB by mmap so that freed memory leaves the resident set and what the step
# allocates shows in it.  The benchmark re-runs itself with its own child flag; the child calls
# ``reset_peak_rss()`` after a warm-up step and ``print_peak_rss(base)`` after the measured one.


def rss_kb(field: str) -> int:
    """``VmRSS:`` / ``VmHWM:`` of this process from ``/proc/self/status``, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset ``VmHWM`` to the current resident set (where the kernel allows) and return ``VmRSS`` (KiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss_kb("VmRSS:")


def print_peak_rss(base_kb: int) -> None:
    print(f"PEAK {(rss_kb('VmHWM:') - base_kb) * 1024}")


def run_peak_child(script: str, args: list[str]) -> int:
    """Run ``python script args`` in a fresh process under the mmap threshold and return the bytes it
    printed with :func:`print_peak_rss`."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"peak-memory child {args} failed: {r.stderr[-2000:]}")
    return int(r.stdout.split("PEAK")[-1])

"""Speed of the GSPN scan: the compiled kernel against the pure-PyTorch reference, side by side.

    python benchmarks/scan.py [--sizes 64 128 256 512] [--directions t2b l2r] [--device cpu]

For each square size (B=2, C=64, float32 by default) it times the forward and the forward+backward
(all five input gradients, via torch.autograd.grad) of both backends, interleaved in one run, and
reports the kernel's speed-up and its effective bandwidth: the bytes the op must move (forward: five
inputs read, one output written; backward: the incoming gradient, the five inputs and the saved
output read, five gradients written) over the time, set against this machine's own copy bandwidth
measured in the same run.  Results go to benchmarks/results/scan_<device>_<machine>[-thp].{json,md}.

On the CPU the timings include the page faults of fresh outputs: PyTorch's CPU allocator returns
large blocks to the OS, so every new 33 MB gradient is faulted in again, which at 512x512 costs as
much as the scan itself.  ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's transparent-huge-page allocation)
cuts that cost; run the benchmark with and without it (the file name records which).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gspn_lightning.ops import gspn_scan, kernel_available  # noqa: E402

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
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 256 * 2**20, reps: int = 5) -> float:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / t  # read + write


def time_backend(ins, go, direction, chunk_size, backend, device, reps) -> tuple[float, float]:
    """Median milliseconds of the forward (no grad) and of forward + all five input gradients."""

    def fwd():
        return gspn_scan(*ins, direction=direction, chunk_size=chunk_size, backend=backend)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), ins, go)

    with torch.no_grad():
        t_fwd = timeit(fwd, device, reps)
    return 1e3 * t_fwd, 1e3 * timeit(fwd_bwd, device, reps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--directions", nargs="+", default=["t2b", "l2r"])
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if not kernel_available(device):
        print(f"the compiled kernel is unavailable for {device}; nothing to compare", file=sys.stderr)
        return 1
    info = machine_info(device)
    bw_copy = copy_bandwidth(device)
    print(
        f"machine: {info['cpu'] if device.type == 'cpu' else info['gpu']}, torch threads "
        f"{info['torch_threads']}, copy bandwidth {bw_copy / 1e9:.1f} GB/s"
    )
    rows = []
    for size in args.sizes:
        for direction in args.directions:
            shape = (args.batch, args.channels, size, size)
            g = torch.Generator().manual_seed(0)
            ins = [torch.randn(shape, generator=g).to(device).requires_grad_() for _ in range(5)]
            go = torch.randn(shape, generator=g).to(device)
            numel, elt = ins[0].numel(), ins[0].element_size()
            reps = args.reps if size <= 256 else max(3, args.reps // 2)
            row = {
                "size": size,
                "direction": direction,
                "shape": list(shape),
                "dtype": "float32",
                "chunk_size": args.chunk_size,
            }
            for backend in ("kernel", "reference"):
                fwd_ms, fwd_bwd_ms = time_backend(ins, go, direction, args.chunk_size, backend, device, reps)
                row[f"{backend}_fwd_ms"], row[f"{backend}_fwd_bwd_ms"] = fwd_ms, fwd_bwd_ms
            row["speedup_fwd"] = row["reference_fwd_ms"] / row["kernel_fwd_ms"]
            row["speedup_fwd_bwd"] = row["reference_fwd_bwd_ms"] / row["kernel_fwd_bwd_ms"]
            bytes_fwd, bytes_fwd_bwd = 6 * numel * elt, 18 * numel * elt
            row["kernel_fwd_GBps"] = bytes_fwd / (row["kernel_fwd_ms"] / 1e3) / 1e9
            row["kernel_fwd_bwd_GBps"] = bytes_fwd_bwd / (row["kernel_fwd_bwd_ms"] / 1e3) / 1e9
            row["kernel_fwd_bw_vs_copy"] = row["kernel_fwd_GBps"] * 1e9 / bw_copy
            row["kernel_fwd_bwd_bw_vs_copy"] = row["kernel_fwd_bwd_GBps"] * 1e9 / bw_copy
            rows.append(row)
            print(
                f"{size:4d} {direction}: fwd kernel {row['kernel_fwd_ms']:8.1f} ms, reference "
                f"{row['reference_fwd_ms']:8.1f} ms (x{row['speedup_fwd']:.1f}); fwd+bwd kernel "
                f"{row['kernel_fwd_bwd_ms']:8.1f} ms, reference {row['reference_fwd_bwd_ms']:8.1f} ms "
                f"(x{row['speedup_fwd_bwd']:.1f}); kernel bandwidth {row['kernel_fwd_bwd_bw_vs_copy']:.2f} of copy",
                flush=True,
            )

    result = {
        "benchmark": "gspn_scan",
        "machine": info,
        "copy_bandwidth_GBps": bw_copy / 1e9,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"scan_{device.type}_{info['name']}" + ("-thp" if info["THP_MEM_ALLOC_ENABLE"] == "1" else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# gspn_scan: kernel vs reference on {info.get('gpu', info['cpu'])} ({info['torch_threads']} threads)",
        "",
        f"B={args.batch}, C={args.channels}, float32, chunk_size={args.chunk_size}; torch {info['torch']}; "
        f"copy bandwidth {bw_copy / 1e9:.1f} GB/s; THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE'] or 'unset'}; "
        f"{result['date']}.",
        "",
        "| H=W | dir | fwd kernel ms | fwd ref ms | fwd speed-up | fwd+bwd kernel ms | fwd+bwd ref ms "
        "| fwd+bwd speed-up | kernel GB/s (fwd+bwd) | of copy bw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['direction']} | {r['kernel_fwd_ms']:.1f} | {r['reference_fwd_ms']:.1f} | "
            f"{r['speedup_fwd']:.1f}x | {r['kernel_fwd_bwd_ms']:.1f} | {r['reference_fwd_bwd_ms']:.1f} | "
            f"{r['speedup_fwd_bwd']:.1f}x | {r['kernel_fwd_bwd_GBps']:.1f} | {r['kernel_fwd_bwd_bw_vs_copy']:.2f} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

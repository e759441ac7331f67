"""Speed of the GSPN scan: the compiled kernel against the pure-PyTorch reference, side by side.

    python benchmarks/scan.py [--sizes 64 128 256 512] [--directions t2b b2t l2r r2l] [--device cpu]

For each square size (B=2, C=64, float32 by default) and direction it times the forward and the
forward+backward (all five input gradients, via torch.autograd.grad) of both backends and a plain
copy of one input, in interleaved rounds (see ``common.py``): the copy bandwidth is measured in every
round, next to the kernel.  Reported per round and summarised as median [min-max]: the kernel's
speed-up over the reference and its effective bandwidth -- the bytes the op must move (forward: five
inputs read, one output written; backward: the incoming gradient, the five inputs and the saved
output read, five gradients written) over its time -- as a fraction of that round's copy bandwidth.

Inputs are what the mixer feeds the op: ``lam = sigmoid(.)`` and taps from ``normalize_gates`` of
random logits (so outputs stay bounded); every output is checked finite and the kernel's forward and
gradients are compared with the reference's.  Outputs are fresh tensors, as a user's call gets them,
so on the CPU the timings include their page faults (``THP_MEM_ALLOC_ENABLE=1`` lets PyTorch use
transparent huge pages for them; the file name records it).  Results go to a new file
``benchmarks/results/scan_<device>_<machine>[-thp][-N].{json,md}`` unless ``--replace``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    RESULTS,
    copy_fn,
    fmt,
    interleaved,
    machine_info,
    new_result_path,
    ratios,
    summary,
    write_results,
)
from gspn_lightning.ops import gspn_scan, kernel_available, normalize_gates  # noqa: E402


def mixer_like_inputs(shape, direction, device, seed=0):
    """x, sigmoid(lam) and normalised taps of random logits, as the mixer makes them; leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    lam = torch.sigmoid(torch.randn(shape, generator=g))
    taps = normalize_gates(*(torch.randn(shape, generator=g) * 2 for _ in range(3)), direction)
    return [t.to(device).requires_grad_() for t in (x, lam, *taps)]


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(ins, go, direction, chunk_size) -> float:
    """Largest relative error of the kernel's output and five gradients against the reference's."""
    outs = {}
    for backend in ("kernel", "reference"):
        h = gspn_scan(*ins, direction=direction, chunk_size=chunk_size, backend=backend)
        gs = torch.autograd.grad(h, ins, go)
        if not all(torch.isfinite(t).all() for t in (h, *gs)):
            raise RuntimeError(f"{backend} {direction}: non-finite output or gradient")
        outs[backend] = (h, *gs)
    return max(max_rel_err(a, b) for a, b in zip(outs["kernel"], outs["reference"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--directions", nargs="+", default=["t2b", "b2t", "l2r", "r2l"])
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replace", action="store_true", help="overwrite this machine's results file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if not kernel_available(device):
        print(f"the compiled kernel is unavailable for {device}; nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    info = machine_info(device)
    info["torch_threads"] = torch.get_num_threads()
    print(f"machine: {info.get('gpu', info['cpu'])}, torch threads {info['torch_threads']}")
    rows = []
    for size in args.sizes:
        shape = (args.batch, args.channels, size, size)
        for direction in args.directions:
            ins = mixer_like_inputs(shape, direction, device)
            go = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
            err = check(ins, go, direction, args.chunk_size)
            numel, elt = ins[0].numel(), ins[0].element_size()

            def fwd(backend, ins=ins, direction=direction):
                with torch.no_grad():
                    return gspn_scan(*ins, direction=direction, chunk_size=args.chunk_size, backend=backend)

            def fwd_bwd(backend, ins=ins, direction=direction, go=go):
                h = gspn_scan(*ins, direction=direction, chunk_size=args.chunk_size, backend=backend)
                return torch.autograd.grad(h, ins, go)

            copy, copy_bytes = copy_fn(device, max(numel * elt, 64 * 2**20))
            rounds = args.rounds if size <= 256 else max(3, args.rounds // 2)
            t = interleaved(
                {
                    "copy": copy,
                    "kernel_fwd": lambda: fwd("kernel"),
                    "reference_fwd": lambda: fwd("reference"),
                    "kernel_fwd_bwd": lambda: fwd_bwd("kernel"),
                    "reference_fwd_bwd": lambda: fwd_bwd("reference"),
                },
                device,
                rounds,
            )
            copy_bw = [copy_bytes / c for c in t["copy"]]
            bytes_fwd, bytes_fwd_bwd = 6 * numel * elt, 18 * numel * elt
            row = {
                "size": size,
                "direction": direction,
                "shape": list(shape),
                "dtype": "float32",
                "chunk_size": args.chunk_size,
                "rounds": rounds,
                "max_rel_err_vs_reference": err,
                "copy_GBps": summary([b / 1e9 for b in copy_bw]),
            }
            for name in ("kernel_fwd", "reference_fwd", "kernel_fwd_bwd", "reference_fwd_bwd"):
                row[f"{name}_ms"] = summary([1e3 * x for x in t[name]])
            row["speedup_fwd"] = ratios(t["reference_fwd"], t["kernel_fwd"])
            row["speedup_fwd_bwd"] = ratios(t["reference_fwd_bwd"], t["kernel_fwd_bwd"])
            row["kernel_fwd_of_copy"] = summary([bytes_fwd / k / b for k, b in zip(t["kernel_fwd"], copy_bw)])
            row["kernel_fwd_bwd_of_copy"] = summary(
                [bytes_fwd_bwd / k / b for k, b in zip(t["kernel_fwd_bwd"], copy_bw)]
            )
            rows.append(row)
            print(
                f"{size:4d} {direction}: fwd kernel {fmt(row['kernel_fwd_ms'], 1)} ms (x{fmt(row['speedup_fwd'], 1)} "
                f"vs reference, {fmt(row['kernel_fwd_of_copy'])} of copy bw); fwd+bwd kernel "
                f"{fmt(row['kernel_fwd_bwd_ms'], 1)} ms (x{fmt(row['speedup_fwd_bwd'], 1)}, "
                f"{fmt(row['kernel_fwd_bwd_of_copy'])} of copy); copy {fmt(row['copy_GBps'], 1)} GB/s; "
                f"max rel err {err:.1e}",
                flush=True,
            )

    result = {
        "benchmark": "gspn_scan",
        "machine": info,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    stem = f"scan_{device.type}_{info['name']}" + ("-thp" if info["THP_MEM_ALLOC_ENABLE"] == "1" else "")
    lines = [
        f"# gspn_scan: kernel vs reference on {info.get('gpu', info['cpu'])} ({info['torch_threads']} threads)",
        "",
        f"B={args.batch}, C={args.channels}, float32, chunk_size={args.chunk_size}, mixer-like normalised gates; "
        f"torch {info['torch']}; THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE'] or 'unset'}; {result['date']}. "
        "Median [min-max] over interleaved rounds; bandwidth as a fraction of the copy bandwidth of the same round.",
        "",
        "| H=W | dir | fwd kernel ms | fwd speed-up | fwd of copy bw | fwd+bwd kernel ms | fwd+bwd speed-up "
        "| fwd+bwd of copy bw | copy GB/s | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['direction']} | {fmt(r['kernel_fwd_ms'], 1)} | {fmt(r['speedup_fwd'], 1)} | "
            f"{fmt(r['kernel_fwd_of_copy'])} | {fmt(r['kernel_fwd_bwd_ms'], 1)} | {fmt(r['speedup_fwd_bwd'], 1)} | "
            f"{fmt(r['kernel_fwd_bwd_of_copy'])} | {fmt(r['copy_GBps'], 1)} | {r['max_rel_err_vs_reference']:.1e} |"
        )
    write_results(new_result_path(args.out, stem, args.replace), result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

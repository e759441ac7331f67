"""What reading a plane by column tiles costs on this machine, next to the scan kernels that do it.

    python benchmarks/strided_reads.py [--size 512] [--planes 128] [--widths 16 32 64 128] [--threads 1]

A column scan (l2r / r2l) on the image layout walks a plane's columns; the CPU kernel gathers them in
tiles of 16 columns: for every row, 64 bytes out of a 2 KB row (at 512 columns), one input array after
another.  This benchmark times plain reads (a sum, no stores) of five float32 arrays of ``--planes``
planes of ``--size``² in that pattern, for tiles of each ``--width`` columns, one array at a time and
the five arrays interleaved row by row, against reading the same arrays a whole row at a time
(streaming), and, in the same interleaved rounds, the scan kernel's t2b and l2r forward on the same
data.  The ratios say how much of the column scans' gap to the row scans is the memory system's
answer to the access pattern (DRAM pages, hardware prefetchers, translation), which no arithmetic in
the kernel changes.

The reads are a small C function compiled with the system's C compiler (``cc``, ``-O3`` and the CPU
kernels' instruction-set flags) and called through ctypes; it sums the arrays' 32-bit words as
integers and is checked against the exact sum.  Results go to a
new ``benchmarks/results/strided_reads_<machine>[-thp][-N].{json,md}`` unless ``--replace``.  The
kernels' outputs are fresh, so their times include page faults, whose cost varies with the process's
memory history (``THP_MEM_ALLOC_ENABLE=1`` makes them few; the file name records it).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    RESULTS,
    fmt,
    interleaved,
    machine_info,
    new_result_path,
    ratios,
    summary,
    write_results,
)
from gspn_lightning.ops import _build, gspn_scan, kernel_available, normalize_gates  # noqa: E402

C_SOURCE = r"""
#include <stdint.h>
/* Sum (of the bits, as unsigned 32-bit integers, wrapping) of n arrays of `planes` planes (rows x cols
   float32), read by tiles of `width` columns: per tile,
   row by row, the width floats of the row; with `interleave` the arrays take turns per row, else
   each array is read through the whole tile before the next.  width == cols is a streaming read;
   tiles prefetch their cache lines 32 rows ahead, as the kernel's gathers do.
   The words go into 64 running sums (vector registers or L1), so the loop is bound by the reads;
   integer sums need no fast-math flags to vectorise and match an exact expected value. */
uint32_t read_tiles(const uint32_t* const* arrays, int n, int64_t planes, int64_t rows, int64_t cols,
                  int64_t width, int interleave) {
  uint32_t total = 0;
  for (int64_t p = 0; p < planes; ++p) {
    uint32_t acc[64] = {0};
    for (int64_t c0 = 0; c0 < cols; c0 += width) {
      const int64_t w = c0 + width <= cols ? width : cols - c0;
      for (int a0 = 0; a0 < (interleave ? 1 : n); ++a0) {
        for (int64_t j = 0; j < rows; ++j) {
          for (int a = interleave ? 0 : a0; a < (interleave ? n : a0 + 1); ++a) {
            const uint32_t* row = arrays[a] + (p * rows + j) * cols + c0;
            if (width < cols && j + 32 < rows) {
              for (int64_t b = 0; b < w; b += 16) __builtin_prefetch(row + 32 * cols + b, 0, 3);
            }
            for (int64_t b = 0; b < w; b += 64) {
              const int64_t m = w - b < 64 ? w - b : 64;
              for (int64_t c = 0; c < m; ++c) acc[c] += row[b + c];
            }
          }
        }
      }
    }
    for (int c = 0; c < 64; ++c) total += acc[c];
  }
  return total;
}
"""


def compile_reader() -> ctypes.CDLL:
    """Build the C reader into a temporary shared library and load it."""
    flags = ["-O3", "-fPIC", "-shared", *_build._ISA_CFLAGS[_build.cpu_isa()]]
    tmp = Path(tempfile.mkdtemp(prefix="gspn_strided_reads_"))
    src, lib = tmp / "reads.c", tmp / "reads.so"
    src.write_text(C_SOURCE)
    subprocess.run([os.environ.get("CC", "cc"), *flags, str(src), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.read_tiles.restype = ctypes.c_uint32
    dll.read_tiles.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,
    ]
    return dll


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument(
        "--planes", type=int, default=128, help="planes per array (B*C; 128 = the scan benchmark's)"
    )
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the scan kernels")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replace", action="store_true")
    args = p.parse_args(argv)

    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    dll = compile_reader()
    S, N = args.size, args.planes
    shape = (1, N, S, S)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    lam = torch.sigmoid(torch.randn(shape, generator=g))
    taps = normalize_gates(*(torch.randn(shape, generator=g) * 2 for _ in range(3)), "t2b")
    arrays = [x, lam, *taps]
    ptrs = (ctypes.c_void_p * 5)(*[t.data_ptr() for t in arrays])
    nbytes = 5 * x.numel() * 4
    expect = sum(int(t.view(torch.int32).to(torch.int64).sum()) for t in arrays) % 2**32

    def reader(width, interleave):
        def fn():
            got = dll.read_tiles(ptrs, 5, N, S, S, width, int(interleave))
            if got != expect:  # every element read, once
                raise RuntimeError(f"read_tiles(width={width}) summed {got}, expected {expect}")

        return fn

    variants = {}
    for mode in ("one", "five"):
        for width in [*args.widths, S]:
            variants[f"{mode}_{width}"] = reader(width, mode == "five")
    have_kernel = kernel_available(device)
    if have_kernel:
        for direction in ("t2b", "l2r"):

            def fwd(direction=direction):
                with torch.no_grad():
                    return gspn_scan(*arrays, direction=direction, backend="kernel")

            variants[f"scan_{direction}"] = fwd
    info = machine_info(device)
    info["torch_threads"] = torch.get_num_threads()
    print(f"machine: {info['cpu']}; {len(variants)} variants x {args.rounds} rounds", flush=True)
    t = interleaved(variants, device, args.rounds)

    rows = []
    for mode in ("one", "five"):
        for width in [*args.widths, S]:  # the last, whole rows: the streaming read itself
            key, full = f"{mode}_{width}", f"{mode}_{S}"
            rows.append(
                {
                    "mode": mode,
                    "width": width,
                    "GBps": summary([nbytes / s / 1e9 for s in t[key]]),
                    "of_streaming": ratios(t[full], t[key]),
                }
            )
    result = {
        "benchmark": "strided_reads",
        "machine": info,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "size": S,
        "planes": N,
        "rounds": args.rounds,
        "reads": rows,
    }
    lines = [
        f"# Column-tile reads on {info['cpu']}",
        "",
        f"Five float32 arrays of {N} planes of {S}x{S} ({nbytes / 2**20:.0f} MiB), summed by tiles of W columns "
        f"(per row, W floats of a {4 * S}-byte row); 'one': one array at a time through each tile (as the "
        f"column scan's gathers read), 'five': the five arrays in turn per row. {result['date']}, torch threads "
        f"{info['torch_threads']} (scan kernels only; the reads are one thread), THP_MEM_ALLOC_ENABLE="
        f"{info['THP_MEM_ALLOC_ENABLE'] or 'unset'}. Median [min-max] over "
        f"{args.rounds} interleaved rounds; 'of streaming' is the whole-row read's time over the tile read's, "
        "per round.",
        "",
        "| arrays | W | GB/s | of streaming |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['width']} | {fmt(r['GBps'], 1)} | {fmt(r['of_streaming'])} |")
    if have_kernel:
        result["scan_fwd_ms"] = {d: summary([1e3 * s for s in t[f"scan_{d}"]]) for d in ("t2b", "l2r")}
        result["scan_l2r_over_t2b"] = ratios(t["scan_l2r"], t["scan_t2b"])
        result["tile16_one_over_streaming_five"] = ratios(t["one_16"], t[f"five_{S}"])
        lines += [
            "",
            f"Scan kernel forward on the same arrays (fresh outputs): t2b {fmt(result['scan_fwd_ms']['t2b'], 1)} ms, "
            f"l2r {fmt(result['scan_fwd_ms']['l2r'], 1)} ms; l2r / t2b time {fmt(result['scan_l2r_over_t2b'])}. "
            f"Reading the inputs as the column scan does (W=16, one array at a time) against as the row scan does "
            f"(whole rows, five arrays in turn): {fmt(result['tile16_one_over_streaming_five'])}x the time.",
        ]
    for line in lines[-(len(rows) + 3) :]:
        print(line)
    stem = f"strided_reads_{info['name']}" + ("-thp" if info["THP_MEM_ALLOC_ENABLE"] == "1" else "")
    write_results(new_result_path(args.out, stem, args.replace), result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

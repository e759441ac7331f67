"""baseline: the release kernel as the paper describes it (one launch per line of the scan, one thread
per pixel of that line, the previous line read back from global memory: nothing kept on chip), in
Triton, against our kernel on the t2b forward; eagerly and, on a GPU, as a replayed CUDA graph (no
Python launch cost: the fairest, fastest baseline).  The CPU rehearsal runs it in Triton's
interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import math
import os

import torch

from benchmarks.gpu_check.harness import GIB, Record, copy_bandwidth, pick_device, time_ms
from benchmarks.gpu_check.scan import scan_inputs


def _baseline_kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["s", "prev_s"])
    def line_step(x, lam, wn, wm, wp, h, s, prev_s, L, M, total, FIRST: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < total
        n = idx // M
        j = idx - n * M
        off = (n * L + s) * M + j
        v = tl.load(lam + off, mask=mask, other=0.0).to(tl.float32) * tl.load(
            x + off, mask=mask, other=0.0
        ).to(tl.float32)
        if not FIRST:
            p = (n * L + prev_s) * M + j
            hn = tl.load(h + p - 1, mask=mask & (j > 0), other=0.0).to(tl.float32)
            hm = tl.load(h + p, mask=mask, other=0.0).to(tl.float32)
            hp = tl.load(h + p + 1, mask=mask & (j + 1 < M), other=0.0).to(tl.float32)
            v += tl.load(wn + off, mask=mask, other=0.0).to(tl.float32) * hn
            v += tl.load(wm + off, mask=mask, other=0.0).to(tl.float32) * hm
            v += tl.load(wp + off, mask=mask, other=0.0).to(tl.float32) * hp
        tl.store(h + off, v.to(h.dtype.element_ty), mask=mask)

    return line_step


def baseline_t2b(x, lam, wn, wm, wp, h, kernel, block: int = 1024) -> None:
    """The t2b forward scan with one launch per row (``h`` is written in place)."""
    B, C, H, W = x.shape
    total = B * C * W
    grid = (triton_cdiv(total, block),)
    for s in range(H):
        kernel[grid](x, lam, wn, wm, wp, h, s, max(s - 1, 0), H, W, total, FIRST=s == 0, BLOCK=block)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def run(args, rec: Record) -> None:
    from gspn_lightning.ops import gspn_scan, scan_reference

    device = pick_device(args.rehearsal)
    if args.rehearsal and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the CPU rehearsal runs the Triton baseline in the interpreter: set TRITON_INTERPRET=1"
        )
    kernel = _baseline_kernel()
    shape = (1, 2, 6, 5) if args.rehearsal else (16, 8, 1024, 1024)
    reps = 2 if args.rehearsal else 10
    ins = scan_inputs(shape, torch.float32, device, "t2b")
    h = torch.empty_like(ins[0])
    run = lambda: baseline_t2b(*ins, h, kernel, block=64 if args.rehearsal else 1024)
    run()
    ours = gspn_scan(*ins, direction="t2b", backend="kernel")
    ref = scan_reference(*(t.double() for t in ins), "t2b")
    errs = {
        name: ((out.double() - ref).norm() / ref.norm()).item()
        for name, out in (("baseline", h), ("kernel", ours))
    }
    del ref
    rec.add(kind="check", shape=list(shape), rel_err_vs_float64_reference=errs, ok=max(errs.values()) < 1e-5)
    if errs["baseline"] >= 1e-5:
        raise RuntimeError(f"the baseline does not compute the scan (relative error {errs['baseline']:.3g})")
    numel = math.prod(shape)
    t_ours = time_ms(lambda: gspn_scan(*ins, direction="t2b", backend="kernel"), device, reps)
    t_eager = time_ms(run, device, reps, warmup=1)
    rows = {"kernel": t_ours, "baseline (launch per line)": t_eager}
    if device.type == "cuda":
        # replaying a captured graph removes the Python launch cost: the fairest (fastest) baseline
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            run()
        rows["baseline (launch per line, CUDA graph)"] = time_ms(graph.replay, device, reps)
    bw = copy_bandwidth(device, 16 * 2**20 if args.rehearsal else 2 * GIB, reps)
    best_baseline = min(v["ms"] for k, v in rows.items() if k != "kernel")
    for name, t in rows.items():
        gbs = 6 * numel * 4 / (t["ms"] * 1e-3) / 1e9
        rec.add(kind="timing", impl=name, shape=list(shape), direction="t2b", phase="fwd", dtype="float32", **t,
                gb_s=gbs, frac_of_copy=gbs / bw, copy_gb_s=bw)  # fmt: skip
    rec.set(speedup_vs_best_baseline=best_baseline / t_ours["ms"])


def table(data: dict) -> list[str]:
    """The report's lines for this section's record."""
    if not data.get("results"):
        return []
    lines = ["", "**Per-line baseline** (t2b forward, float32)", "", "| impl | ms | GB/s | of copy |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for r in data["results"]:
        if r.get("kind") == "timing":
            lines.append(f"| {r['impl']} | {r['ms']:.3g} | {r['gb_s']:.0f} | {r['frac_of_copy']:.0%} |")
    if "speedup_vs_best_baseline" in data:
        lines.append(f"\nkernel speed-up over the fastest baseline: {data['speedup_vs_best_baseline']:.1f}x")
    return lines

"""scan: the kernel against the float64 reference on realistic gates, then forward and forward+backward
timed against the copy roofline.

Achieved bandwidth of the scan is the bytes the op must move over its time: the forward reads the
five inputs and writes the output (6 tensors); the backward reads the incoming gradient, the five
inputs and the saved output and writes five gradients (12 tensors), so forward+backward moves 18.
It is set against a device-to-device copy (bytes read + written) measured in the same process, once
per case group, interleaved with the cases.
"""

from __future__ import annotations

import math
import statistics

import torch

from benchmarks.gpu_check.harness import (
    GIB,
    Record,
    copy_bandwidth,
    peak_mib,
    peak_reset,
    pick_device,
    recorded,
    time_ms,
)


def scan_inputs(shape, dtype, device, direction, seed=0, requires_grad=False):
    """x ~ N(0,1), lam = sigmoid(N(0,1)), gates normalised as the mixer makes them: finite outputs."""
    from gspn_lightning.ops import normalize_gates

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)
    lam = torch.sigmoid(torch.randn(shape, generator=g, device=device, dtype=dtype))
    logits = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3)]
    ins = [x, lam, *normalize_gates(*logits, direction)]
    return [t.detach().requires_grad_(requires_grad) for t in ins]


def scan_cases(rehearsal: bool) -> list[tuple[str, tuple, torch.dtype]]:
    """(label, shape, dtype): the GSPN-2 paper's case first, then B=2, C=64 at growing sizes."""
    if rehearsal:
        return [("paper", (2, 2, 24, 24), torch.float32), ("grid", (1, 4, 16, 20), torch.float32),
                ("grid", (1, 4, 16, 20), torch.bfloat16)]  # fmt: skip
    cases = [("paper", (16, 8, 1024, 1024), torch.float32)]
    for dtype in (torch.float32, torch.bfloat16):
        for s in (256, 512, 1024, 2048):
            cases.append(("grid", (2, 64, s, s), dtype))
    return cases


def _time_scan(gspn_scan, shape, dtype, device, direction, chunk, reps):
    """(output finite, forward timing, forward+backward timing) of one scan case, on fresh outputs."""
    ins = scan_inputs(shape, dtype, device, direction, requires_grad=True)
    go = torch.randn(shape, device=device, dtype=dtype)

    def fwd():
        return gspn_scan(*ins, direction=direction, chunk_size=chunk, backend="kernel")

    finite = bool(torch.isfinite(fwd()).all())
    peak_reset(device)
    t_f = time_ms(lambda: fwd().detach(), device, reps)
    t_fb = time_ms(lambda: torch.autograd.grad(fwd(), ins, go), device, reps)
    return finite, t_f, t_fb


def run(args, rec: Record) -> None:
    from gspn_lightning.ops import DIRECTIONS, gspn_scan, kernel_available, scan_reference

    device = pick_device(args.rehearsal)
    if not kernel_available(device):
        raise RuntimeError(f"no compiled GSPN kernel for {device}")
    reps = 3 if args.rehearsal else 10
    copy_bytes = 16 * 2**20 if args.rehearsal else 2 * GIB

    # correctness on realistic gates first: kernel against the reference, every direction
    check_shape = (1, 3, 9, 13) if args.rehearsal else (2, 16, 128, 96)
    for direction in DIRECTIONS:
        for chunk in (None, 2):
            ins = scan_inputs(check_shape, torch.float32, device, direction, seed=1)
            out = gspn_scan(*ins, direction=direction, chunk_size=chunk, backend="kernel")
            ref = scan_reference(*(t.double() for t in ins), direction, chunk)
            rel = ((out.double() - ref).norm() / ref.norm()).item()
            rec.add(kind="check", direction=direction, chunk=chunk, shape=list(check_shape), rel_err=rel,
                    finite=bool(torch.isfinite(out).all()), ok=rel < 1e-5)  # fmt: skip

    for label, shape, dtype in scan_cases(args.rehearsal):
        name = f"{label} {tuple(shape)} {str(dtype).replace('torch.', '')}"
        if rec.out_of_time(name, reserve=2.0):
            continue
        with recorded(rec, name, device):
            bw = copy_bandwidth(device, copy_bytes, reps)
            numel = math.prod(shape)
            elt = torch.tensor([], dtype=dtype).element_size()
            for direction in DIRECTIONS:
                if rec.out_of_time(f"{name} {direction}", reserve=2.0):
                    continue
                for chunk in (None, 2):
                    finite, t_f, t_fb = _time_scan(gspn_scan, shape, dtype, device, direction, chunk, reps)
                    for phase, t, tensors in (("fwd", t_f, 6), ("fwd+bwd", t_fb, 18)):
                        gbs = tensors * numel * elt / (t["ms"] * 1e-3) / 1e9
                        rec.add(kind="scan", case=label, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                                direction=direction, chunk=chunk, phase=phase, **t, gb_s=gbs, copy_gb_s=bw,
                                frac_of_copy=gbs / bw, finite=finite, peak_mib=peak_mib(device))  # fmt: skip


def table(data: dict) -> list[str]:
    """The report's lines for this section's record: the checks' worst error, then per case, dtype, chunk
    and phase the fraction of the copy bandwidth (and ms) of each direction."""
    lines = []
    scan = [r for r in data.get("results", []) if r.get("kind") == "scan"]
    checks = [r for r in data.get("results", []) if r.get("kind") == "check"]
    if checks:
        worst = max(r["rel_err"] for r in checks)
        lines += ["", f"**Scan correctness** (kernel vs float64 reference, realistic gates, {len(checks)} cases): "
                      f"worst relative error {worst:.2e}, all finite: {all(r['finite'] for r in checks)}"]  # fmt: skip
    if scan:
        lines += ["", "**Scan** (fraction of the measured copy bandwidth; ms median)", "",
                  "| case | dtype | chunk | phase | t2b | b2t | l2r | r2l |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        keys = []
        for r in scan:
            k = (tuple(r["shape"]), r["dtype"], r["chunk"], r["phase"])
            if k not in keys:
                keys.append(k)
        for shape, dtype, chunk, phase in keys:
            cells = []
            for d in ("t2b", "b2t", "l2r", "r2l"):
                m = [r for r in scan if (tuple(r["shape"]), r["dtype"], r["chunk"], r["phase"], r["direction"])
                     == (shape, dtype, chunk, phase, d)]  # fmt: skip
                cells.append(f"{m[0]['frac_of_copy']:.0%} ({m[0]['ms']:.3g})" if m else "-")
            lines.append(
                f"| {'x'.join(map(str, shape))} | {dtype} | {chunk or 'global'} | {phase} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append(
            f"\ncopy bandwidth: {statistics.median(r['copy_gb_s'] for r in scan):.0f} GB/s (median over groups)"
        )
    return lines

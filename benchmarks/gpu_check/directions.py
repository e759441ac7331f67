"""directions: the op ``gspn_propagate_proj`` alone, forward+backward, at 256², E = 384, batch 2, S = 8,
bf16, channels-last inputs (the layout the mixer hands it), per single direction (t2b, b2t, l2r, r2l)
and with all four, the old path (``backend="planes"``) against the new op (``backend="kernel"``):
median time and peak memory, and each direction's time over t2b's (issue 24: column directions within
1.3x of row directions; the four-direction op <= 4 ms)."""

from __future__ import annotations

import torch

from benchmarks.gpu_check.harness import (
    Record,
    case_failed,
    fmt_value,
    peak_mib,
    peak_reset,
    pick_device,
    time_ms,
)

BACKENDS = ("planes", "kernel")
VARIANTS = ("t2b", "b2t", "l2r", "r2l", "all")
ALL = ("t2b", "b2t", "l2r", "r2l")


def _inputs(batch, E, S, g, K, dtype, device):
    """x, proxy (channels-last), weight, bias, merge as leaves, scaled like a trained mixer's."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    x = randn(batch, g, g, E).permute(0, 3, 1, 2)
    proxy = randn(batch, g, g, S).permute(0, 3, 1, 2)
    weight = randn(K * 6 * E, S, scale=S**-0.5)
    bias = randn(K * 6 * E)
    merge = torch.full((K, E), 1.0 / K, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (x, proxy, weight, bias, merge)]


def run(args, rec: Record) -> None:
    from gspn_lightning.ops import gspn_propagate_proj

    device = pick_device(args.rehearsal)
    batch, E, S, g = (1, 8, 8, 12) if args.rehearsal else (2, 384, 8, 256)
    reps = 2 if args.rehearsal else 10
    dtype = torch.bfloat16
    rec.set(
        batch=batch, E=E, S=S, grid=g, dtype="bfloat16", layout="channels-last x and proxy", phase="fwd+bwd"
    )
    dead: set[str] = set()
    for variant in VARIANTS:
        directions = ALL if variant == "all" else (variant,)
        ins = _inputs(batch, E, S, g, len(directions), dtype, device)
        go = torch.randn(ins[0].shape, device=device, dtype=dtype)
        for backend in BACKENDS:
            case = f"{backend} {variant}"
            if backend in dead:
                rec.skip(case, "ran out of memory before")
                continue
            if rec.out_of_time(case, reserve=2.0):
                continue

            def step(backend=backend, directions=directions, ins=ins, go=go):
                out = gspn_propagate_proj(*ins, directions, None, backend=backend)
                return torch.autograd.grad(out, ins, go)

            try:
                step()
                peak_reset(device)
                t = time_ms(step, device, reps, warmup=1)
                rec.add(kind="op", backend=backend, variant=variant, directions=list(directions), **t,
                        peak_mib=peak_mib(device))  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                case_failed(rec, case, backend, exc, dead, device)
        del ins, go
    ratios = {}
    for backend in BACKENDS:
        t2b = find(rec.data["results"], backend, "t2b")
        for variant in ("b2t", "l2r", "r2l"):
            r = find(rec.data["results"], backend, variant)
            ratios[f"{backend} {variant}/t2b"] = r["ms"] / t2b["ms"] if r and t2b else None
    rec.set(ratios_to_t2b=ratios)


def find(rows, backend: str, variant: str) -> dict | None:
    m = [r for r in rows if (r["backend"], r["variant"]) == (backend, variant)]
    return m[0] if m else None


def table(data: dict) -> list[str]:
    """The report's lines: ms (and over t2b) per direction and backend, and the four-direction op."""
    rows = data.get("results", [])
    if not rows:
        return []
    lines = ["", f"**Op per direction**: `gspn_propagate_proj` fwd+bwd, {data.get('grid')}², E = {data.get('E')}, "
                 f"batch {data.get('batch')}, S = {data.get('S')}, bf16, {data.get('layout')}: ms (x t2b) / peak MiB",
             "", "| directions | planes (old) | kernel (new) |", "|---|---|---|"]  # fmt: skip
    ratios = data.get("ratios_to_t2b", {})
    for variant in VARIANTS:
        cells = []
        for backend in BACKENDS:
            r = find(rows, backend, variant)
            ratio = ratios.get(f"{backend} {variant}/t2b")
            rel = f" ({fmt_value(ratio)}x)" if ratio is not None else ""
            cells.append(f"{r['ms']:.3g}{rel} / {fmt_value(r['peak_mib'], 0)}" if r else "-")
        lines.append(f"| {'all four' if variant == 'all' else variant} | {cells[0]} | {cells[1]} |")
    return lines

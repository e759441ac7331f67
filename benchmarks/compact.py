"""GSPN-2's compact propagation (``MixerOptions.d_prop``) against the full-width propagation: time of one
GSPN-DiT mixer layer's forward + backward (a training step's share) and of its forward alone (a
sampling step's), both blocks (``release``: the release's mixer, whose whole propagation path becomes
``d_prop`` wide; ``compact``: :class:`~gspn_lightning.nn.GSPNMixer` with a 1x1 projection into the
``d_prop`` channels and a 1x1 lift back), hidden 128, ``d_state`` 8:

- ``digits``: the digits demo's grid, 8x8 tokens, batch 32, local chunk 2;
- ``32x32``: batch 8, global;  ``64x64``: batch 2, global.

    python benchmarks/compact.py [--threads 1] [--rounds 7] [--reps 3] [--cases digits 32x32 64x64]
                                 [--d-prop 64 32]

Every variant of a case is timed in interleaved rounds in one process (see ``common.py``), ``--reps``
calls per round; the per-round ratio to the full-width layer of the same block is reported as median
[min-max].  Results: ``benchmarks/results/compact_<machine>[-N].{json,md}``.
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
    fmt,
    interleaved,
    machine_info,
    new_result_path,
    ratios,
    summary,
    write_results,
)
from gspn_lightning.models.gspn_dit import ReleaseMixer  # noqa: E402
from gspn_lightning.nn import GSPNMixer  # noqa: E402

#: name: (batch, grid side, chunk)
CASES = {"digits": (32, 8, 2), "32x32": (8, 32, None), "64x64": (2, 64, None)}
HIDDEN, D_STATE = 128, 8


def build(block: str, d_prop: int | None, chunk: int | None) -> torch.nn.Module:
    opts = dict(d_state=D_STATE, chunk_size=chunk, d_prop=d_prop)
    if block == "release":
        return ReleaseMixer(HIDDEN, **opts)
    return GSPNMixer(HIDDEN, d_inner=HIDDEN, **opts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=3, help="calls per variant and round")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--d-prop", nargs="+", type=int, default=[64, 32])
    p.add_argument("--label", default="", help="a note stored with the results (e.g. the commit)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replace", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    info = machine_info(device)
    result = {
        "benchmark": "compact_propagation",
        "machine": info,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "label": args.label,
        "threads": args.threads,
        "rounds": args.rounds,
        "reps": args.reps,
        "hidden": HIDDEN,
        "d_state": D_STATE,
        "cases": {},
    }
    md = [
        f"# Compact propagation (d_prop) on {info['cpu']} ({result['date']}, {args.threads} thread(s))",
        "",
        f"{args.label}" if args.label else "",
        "",
        f"One mixer layer, hidden {HIDDEN}, d_state {D_STATE}; ms per call, median [min-max] over "
        f"{args.rounds} interleaved rounds of {args.reps} calls; ratio to the same block at full width per round.",
        "",
        "| case | block | d_prop | gate maps/px | params | fwd+bwd ms | / full | fwd ms | / full |",
        "|---|---|---:|---:|---:|---|---|---|---|",
    ]
    widths = [None, *args.d_prop]
    cross: list[str] = []
    for case in args.cases:
        B, S, chunk = CASES[case]
        g = torch.Generator().manual_seed(0)
        # channels-last, as the models feed the mixer
        x = torch.randn(B, HIDDEN, S, S, generator=g).contiguous(memory_format=torch.channels_last)
        go = torch.randn(B, HIDDEN, S, S, generator=g).contiguous(memory_format=torch.channels_last)
        layers, train, infer = {}, {}, {}
        for block in ("release", "compact"):
            for w in widths:
                name = f"{block}/{w or 'full'}"
                torch.manual_seed(0)
                layers[name] = m = build(block, w, chunk)

                def step(m=m, x=x, go=go):
                    for _ in range(args.reps):
                        xi = x.detach().requires_grad_()
                        out = m(xi)
                        out.backward(go)
                    if not torch.isfinite(xi.grad).all():
                        raise RuntimeError("non-finite gradient")

                def fwd(m=m, x=x):
                    with torch.no_grad():
                        for _ in range(args.reps):
                            m(x)

                train[name], infer[name] = step, fwd
        t_train = interleaved(train, device, args.rounds)
        t_infer = interleaved(infer, device, args.rounds)
        rows = {}
        for name, m in layers.items():
            block, w = name.split("/")
            full = f"{block}/full"
            ms_t = [1e3 * s / args.reps for s in t_train[name]]
            ms_i = [1e3 * s / args.reps for s in t_infer[name]]
            rows[name] = {
                "gate_maps_per_pixel": m.gates.out_channels,
                "params": sum(p.numel() for p in m.parameters()),
                "fwd_bwd_ms": summary(ms_t),
                "fwd_ms": summary(ms_i),
                "fwd_bwd_vs_full": ratios(t_train[name], t_train[full]),
                "fwd_vs_full": ratios(t_infer[name], t_infer[full]),
            }
            r = rows[name]
            md.append(
                f"| {case} (B={B}, {S}x{S}, chunk {chunk}) | {block} | {w} | {r['gate_maps_per_pixel']} | "
                f"{r['params']:,} | {fmt(r['fwd_bwd_ms'])} | {fmt(r['fwd_bwd_vs_full'])} | {fmt(r['fwd_ms'])} | "
                f"{fmt(r['fwd_vs_full'])} |"
            )
        # the two blocks against each other at the same width, per round
        blocks = {
            str(w or "full"): {
                "fwd_bwd": ratios(t_train[f"release/{w or 'full'}"], t_train[f"compact/{w or 'full'}"]),
                "fwd": ratios(t_infer[f"release/{w or 'full'}"], t_infer[f"compact/{w or 'full'}"]),
            }
            for w in widths
        }
        result["cases"][case] = {
            "batch": B,
            "grid": S,
            "chunk": chunk,
            "variants": rows,
            "release_vs_compact": blocks,
        }
        cross.extend(f"| {case} | {w} | {fmt(r['fwd_bwd'])} | {fmt(r['fwd'])} |" for w, r in blocks.items())
        print("\n".join(md[-len(rows) :]), flush=True)
    md += ["", "Release block / compact block at the same d_prop (per round):", "",
           "| case | d_prop | fwd+bwd | fwd |", "|---|---:|---|---|", *cross]  # fmt: skip
    print("\n".join(md))
    write_results(new_result_path(args.out, f"compact_{info['name']}", args.replace), result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

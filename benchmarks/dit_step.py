"""Seconds per training step of the digits-demo GSPN-DiT (``gspn_dit_s_4``: hidden 128, depth 8,
d_state 8, local chunk 2, one-channel 32x32 input, batch 64, AdamW), with the GSPN mixers' paths
interleaved in one process on one model:

- ``default``: the mixers as built (in this checkout: the gate projection fused into the op,
  ``gspn_propagate_proj``);
- ``prev``: ``fuse_gates=False``, the previous fused path (logits materialised by the ``gates`` conv,
  then ``gspn_propagate``);
- ``unfused``: ``fused=False`` (per-direction ``normalize_gates`` + ``gspn_scan``).

    python benchmarks/dit_step.py [--threads 2] [--rounds 5] [--steps 3] [--variants default prev]

Each round runs ``--steps`` optimiser steps of every variant in turn (see ``common.py``); the time of a
round's steps divided by their number is one sample.  The loss is the mean squared error of the
model's output against Gaussian noise (the demo's epsilon objective without the schedule, which costs
nothing measurable).  Run from an older checkout (which has no ``fuse_gates``), ``default`` times that
checkout's mixers.  Results: ``benchmarks/results/dit_step_<machine>[-N].{json,md}``.
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
from gspn_lightning.models import create_model  # noqa: E402
from gspn_lightning.nn import GSPNMixer  # noqa: E402

VARIANTS = {"default": {}, "prev": {"fuse_gates": False}, "unfused": {"fused": False}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per variant and round")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["default", "prev"])
    p.add_argument("--label", default="", help="a note stored with the results (e.g. the commit)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replace", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(
        "gspn_dit_s_4",
        in_channels=1,
        num_classes=10,
        learn_sigma=False,
        hidden_size=128,
        depth=8,
        mixer={"d_state": 8, "chunk_size": 2},
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 32, 32, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    noise = torch.randn(args.batch, 1, 32, 32, generator=g)
    mixers = [m for m in model.modules() if isinstance(m, GSPNMixer)]

    def run(variant: str):
        def steps():
            for m in mixers:
                m.fused, m.fuse_gates = True, True
                for key, value in VARIANTS[variant].items():
                    setattr(m, key, value)
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(model(x, t, y), noise)
                loss.backward()
                opt.step()
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{variant}: non-finite loss")

        return steps

    info = machine_info(torch.device("cpu"))
    times = interleaved({v: run(v) for v in args.variants}, torch.device("cpu"), args.rounds)
    per_step = {v: [s / args.steps for s in ts] for v, ts in times.items()}
    result = {
        "benchmark": "gspn_dit_digits_step",
        "machine": info,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "label": args.label,
        "threads": args.threads,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "s_per_step": {v: summary(ts) for v, ts in per_step.items()},
    }
    base = args.variants[0]
    result["ratios_vs_" + base] = {v: ratios(per_step[v], per_step[base]) for v in args.variants[1:]}
    md = [
        f"# Digits GSPN-DiT training step on {info['cpu']} ({result['date']}, {args.threads} threads)",
        "",
        f"{args.label}" if args.label else "",
        "",
        f"| variant | s/step | / {base} (per round) |",
        "|---|---|---|",
    ]
    for v in args.variants:
        r = fmt(result["ratios_vs_" + base][v]) if v != base else "1"
        md.append(f"| {v} | {fmt(result['s_per_step'][v], 3)} | {r} |")
    print("\n".join(md))
    write_results(new_result_path(args.out, f"dit_step_{info['name']}", args.replace), result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

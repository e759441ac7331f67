"""Seconds per training step of the digits demo's GSPN-DiT against its DiT baseline, side by side, and
where each step's time goes (issue 27: a GSPN-DiT step must cost at most 1.2x a DiT step).

Both models are built from the demo's configs as the CLI builds them: ``configs/dit/digits.yaml``
(GSPN-DiT: hidden 128, depth 8, patch 4, d_state 8, 32 propagated channels, local chunk 2, adaLN blocks) and the same file
with ``configs/dit/overlays/digits_dit.yaml`` over it (DiT: hidden 112, depth 4, 4 heads), with the
data facts of the config (32x32 one-channel pixels, 10 classes: an 8x8 token grid) and its batch of
32.  One step is what the demo's training step does: the loss of
:class:`~gspn_lightning.diffusion.GaussianDiffusion` as configured (x0 prediction, Min-SNR-5 weighting,
no learned variance; fixed timesteps, noise and labels), the backward, gradient clipping at the
trainer's ``gradient_clip_val`` and one AdamW step at the config's learning rate.  The demo's
per-step EMA update and logging are left out (the same for both and small).

    python benchmarks/dit_vs_gspn_step.py [--threads 1] [--rounds 7] [--steps 3] [--profile-steps 4] [--clock cpu]

Each round runs ``--steps`` optimiser steps of each model in turn, in one process at ``--threads``
threads (``common.py``'s interleaved rounds: a slow spell of the shared machine hits both); one sample
is a round's time divided by its steps, and the ratio GSPN-DiT / DiT is formed per round.  Then
``torch.profiler`` records ``--profile-steps`` steps of each model and the ``.md`` lists the ops with
the most self CPU time for each.  Results: ``benchmarks/results/dit_vs_gspn_step_<machine>[-N].{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
from gspn_lightning.diffusion import GaussianDiffusion  # noqa: E402
from gspn_lightning.tasks.base import build_model  # noqa: E402

CONFIG = ROOT / "configs" / "dit" / "digits.yaml"
DIT_OVERLAY = ROOT / "configs" / "dit" / "overlays" / "digits_dit.yaml"


def merge_configs(base: dict, over: dict) -> dict:
    """``over`` read over ``base`` as the CLI reads a second ``--config``: nested sections merged key by
    key, except the free-form dict ``model_kwargs``, which the later file replaces as a whole."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "model_kwargs":
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = value
    return out


def load_config(*paths: Path) -> dict:
    cfg: dict = {}
    for path in paths:
        cfg = merge_configs(cfg, yaml.safe_load(path.read_text()))
    return cfg


class Setup:
    """A model of the config, its optimiser and loss, and a fixed batch."""

    def __init__(self, cfg: dict, batch: int | None, seed: int = 0) -> None:
        task = cfg["model"]["init_args"]
        data = cfg["data"]["init_args"]
        self.name = task["model"]
        learn_sigma = task.get("learn_sigma", True)
        torch.manual_seed(seed)
        self.model = build_model(
            task["model"], task.get("model_kwargs"), num_classes=data["num_classes"],
            in_channels=data["in_chans"], input_size=data["image_size"],
            class_dropout=task.get("class_dropout", 0.1), learn_sigma=learn_sigma,
        )  # fmt: skip
        self.params = sum(p.numel() for p in self.model.parameters())
        self.diffusion = GaussianDiffusion(
            learn_sigma=learn_sigma, snr_gamma=task.get("snr_gamma"), prediction=task.get("prediction", "eps")
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=task["optim"]["lr"], weight_decay=0.0)
        self.clip = cfg["trainer"].get("gradient_clip_val")
        self.batch = batch = batch or data["batch_size"]
        g = torch.Generator().manual_seed(seed)
        size, chans = data["image_size"], data["in_chans"]
        self.x = torch.rand(batch, chans, size, size, generator=g) * 2 - 1
        self.y = torch.randint(0, data["num_classes"], (batch,), generator=g)
        self.t = torch.randint(0, self.diffusion.num_timesteps, (batch,), generator=g)
        self.noise = torch.randn(batch, chans, size, size, generator=g)
        self.grid = size // self.model.patch_size

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.diffusion.training_losses(self.model, self.x, self.y, t=self.t, noise=self.noise)["loss"].mean()
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss")


def profile_table(setup: Setup, steps: int, rows: int) -> tuple[list[dict], float]:
    """The ops with the most self CPU time over ``steps`` steps (per step), and the total per step."""
    from torch.profiler import ProfilerActivity, profile

    setup.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            setup.step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    table = [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / steps / 1e3,
            "calls": e.count / steps,
            "share": e.self_cpu_time_total / steps / 1e3 / total,
        }
        for e in events[:rows]
    ]
    return table, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo: 1 per model)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per model and round")
    p.add_argument("--batch", type=int, default=None, help="default: the config's batch size")
    p.add_argument("--profile-steps", type=int, default=4, help="steps profiled per model (0: no profile)")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: common.py's wall-clock rounds; cpu: this process's CPU time (with 1 thread, the time it"
        " ran, not the time other jobs of a shared machine held the core)",
    )
    p.add_argument(
        "--gspn-overlays",
        nargs="*",
        default=[],
        metavar="NAME",
        help="more GSPN-DiT variants, each configs/dit/overlays/digits_<NAME>.yaml over the demo's config"
        " (e.g. full_width block_compact additive), timed in the same rounds",
    )
    p.add_argument("--label", default="", help="a note stored with the results (e.g. the commit)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replace", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    setups = {
        "gspn_dit": Setup(load_config(CONFIG), args.batch),
        "dit": Setup(load_config(CONFIG, DIT_OVERLAY), args.batch),
    }
    for name in args.gspn_overlays:
        overlay = CONFIG.parent / "overlays" / f"digits_{name}.yaml"
        if not overlay.is_file():
            p.error(f"no overlay {overlay}")
        setups[f"gspn_dit+{name}"] = Setup(load_config(CONFIG, overlay), args.batch)

    def run(s: Setup):
        def steps():
            for _ in range(args.steps):
                s.step()

        return steps

    info = machine_info(torch.device("cpu"))
    variants = {k: run(s) for k, s in setups.items()}
    if args.clock == "wall":
        times = interleaved(variants, torch.device("cpu"), args.rounds)
    else:  # the same rounds as common.interleaved, timed by process_time
        for fn in variants.values():
            fn()
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, fn in variants.items():
                t0 = time.process_time()
                fn()
                times[k].append(time.process_time() - t0)
    per_step = {k: [t / args.steps for t in ts] for k, ts in times.items()}
    result = {
        "benchmark": "dit_vs_gspn_digits_step",
        "machine": info,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "label": args.label,
        "threads": args.threads,
        "clock": args.clock,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "models": {
            k: {"model": s.name, "params": s.params, "batch": s.batch, "grid": s.grid} for k, s in setups.items()
        },
        "s_per_step": {k: summary(ts) for k, ts in per_step.items()},
        "ratio_gspn_dit_vs_dit": ratios(per_step["gspn_dit"], per_step["dit"]),
        "ratios_vs_dit": {k: ratios(per_step[k], per_step["dit"]) for k in setups if k != "dit"},
    }
    md = [
        f"# Digits demo step: GSPN-DiT against DiT on {info['cpu']} ({result['date']}, {args.threads} thread(s))",
        "",
        f"{args.label}" if args.label else "",
        "",
        "One optimiser step (x0 / Min-SNR-5 loss, backward, clipping, AdamW) of each model of the demo's"
        f" configs, batch {setups['dit'].batch}, {setups['dit'].grid}x{setups['dit'].grid} token grid;"
        f" median [range] over {args.rounds} interleaved rounds of {args.steps} steps, {args.clock} clock.",
        "",
        "| model | config | params | s/step | / DiT (per round) |",
        "|---|---|---|---|---|",
    ]
    for k, s in setups.items():
        r = fmt(result["ratios_vs_dit"][k]) if k != "dit" else "1"
        overlay = k.partition("+")[2] or ("digits_dit" if k == "dit" else "-")
        md.append(f"| {s.name} | {overlay} | {s.params / 1e6:.2f}M | {fmt(result['s_per_step'][k], 4)} | {r} |")
    if args.profile_steps > 0:
        result["profile"] = {}
        for k, s in setups.items():
            if "+" in k:  # the variants are timed, not profiled
                continue
            table, total = profile_table(s, args.profile_steps, args.profile_rows)
            result["profile"][k] = {"total_self_ms_per_step": total, "top": table}
            md += [
                "",
                f"## Profile of {s.name}: top ops by self CPU time ({total:.1f} ms of self time per step,"
                f" {args.profile_steps} steps)",
                "",
                "| op | self ms/step | share | calls/step |",
                "|---|---|---|---|",
            ]
            md += [f"| `{r['op']}` | {r['self_ms']:.2f} | {100 * r['share']:.1f} % | {r['calls']:g} |" for r in table]
    print("\n".join(md))
    write_results(new_result_path(args.out, f"dit_vs_gspn_step_{info['name']}", args.replace), result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One SD-XL UNet denoising step with GSPN in place of self-attention, side by side with the original
attention and with no self-attention at all.

    python benchmarks/sdxl_step.py [--divisor 10] [--sizes 32 64 128 192] [--rounds 3] [--threads 1]

The UNet is SD-XL's (``configs/sdxl/unet_config.json``: three levels, ``text_time`` conditioning,
transformer depths 0/2/10, 70 self-attention layers) with the channel widths divided by ``--divisor``
(320/640/1280 -> 32/64/128 by default; ``--divisor 1`` is the real width) and ``--head-dim`` channels per
head (SD-XL: 64; narrowed: 16), randomly initialised (seed 0): no pretrained weights can be had here,
and timing does not depend on them.  Four variants of the same weights (:data:`VARIANTS`):

- ``sdpa``: diffusers' attention (``AttnProcessor2_0``: ``scaled_dot_product_attention``), the teacher;
- ``gspn_global``: after :func:`swap_self_attention` with ``chunk_size=None`` (``d_state`` 8);
- ``gspn_local``: the same with ``chunk_size=--local-chunk`` (4, the swap's default, the release's);
- ``no_attn1``: every ``attn1`` replaced by the identity (the block adds its normed input back): the
  rest of the UNet alone, the floor that no replacement of self-attention can beat.

One forward (``inference_mode``: a sampling step without guidance; batch 1, 77 text tokens, random
embeddings and the micro-conditioning of the size) is timed for every variant in interleaved rounds at
each latent size (pixels = 8 x latent), after a warm-up call.

Peak memory is measured apart from the timing, in a fresh process per variant and size: the growth of
its resident set over one forward (see ``common.py``).  The fitted exponent p of time ~ pixels^p is given
per variant.  Each output is checked finite.
Results: ``benchmarks/results/sdxl_step_<machine>[-N].{json,md}`` (a new file unless ``--replace``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    RESULTS,
    fit_exponent,
    fmt,
    interleaved,
    machine_info,
    new_result_path,
    print_peak_rss,
    ratios,
    reset_peak_rss,
    run_peak_child,
    summary,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
SDXL_CONFIG = ROOT / "configs/sdxl/unet_config.json"
VARIANTS = ("sdpa", "gspn_global", "gspn_local", "no_attn1")
LABELS = {"sdpa": "SDPA", "gspn_global": "GSPN global", "gspn_local": "GSPN local", "no_attn1": "no attn1"}


class NoSelfAttention(torch.nn.Module):
    """``attn1`` replaced by the identity: returns the block's normed input, allocates nothing."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def remove_self_attention(unet) -> int:
    """Replace every ``attn1`` of ``unet``'s ``BasicTransformerBlock``s by :class:`NoSelfAttention`; returns
    how many."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    for block in blocks:
        block.attn1 = NoSelfAttention()
    return len(blocks)


def sdxl_config(divisor: int = 1, head_dim: int | None = None, layers=None) -> dict:
    """SD-XL's UNet config with channels divided by ``divisor``, ``head_dim`` channels per head (default
    64 at full width, 16 narrowed) and optionally other ``transformer_layers_per_block``."""
    config = json.loads(SDXL_CONFIG.read_text())
    head_dim = head_dim or (64 if divisor == 1 else 16)
    channels = [c // divisor for c in config["block_out_channels"]]
    groups = config["norm_num_groups"]
    if any(
        c * divisor != c0 or c % groups or c % head_dim
        for c, c0 in zip(channels, config["block_out_channels"])
    ):
        raise ValueError(
            f"divisor {divisor} / head_dim {head_dim}: channels {channels} must divide evenly and be multiples "
            f"of norm_num_groups {groups} and of head_dim"
        )
    config["block_out_channels"] = channels
    config["attention_head_dim"] = [c // head_dim for c in channels]  # diffusers' name for the head count
    if layers is not None:
        config["transformer_layers_per_block"] = list(layers)
    return config


def build_models(
    config: dict, device, dtype, d_state: int = 8, local_chunk: int = 4, seed: int = 0, variants=VARIANTS
) -> dict:
    """``{variant: UNet}`` for the ``variants`` asked for (see :data:`VARIANTS`), all with the teacher's
    weights (seed ``seed``), on ``device`` in ``dtype``, in :data:`VARIANTS` order."""
    from diffusers import UNet2DConditionModel

    from gspn_lightning.models.sdxl import swap_self_attention

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the variants are {list(VARIANTS)}")
    torch.manual_seed(seed)
    with torch.device(device):
        teacher = UNet2DConditionModel.from_config(config).eval()
    if dtype != torch.float32:
        teacher.to(dtype)
    wanted = [v for v in VARIANTS if v in variants]
    models = {}
    for name in wanted:
        unet = teacher if name == "sdpa" or len(wanted) == 1 else copy.deepcopy(teacher)
        if name == "gspn_global":
            swap_self_attention(unet, d_state=d_state, chunk_size=None)
        elif name == "gspn_local":
            swap_self_attention(unet, d_state=d_state, chunk_size=local_chunk)
        elif name == "no_attn1":
            remove_self_attention(unet)
        models[name] = unet
    return models


def step_inputs(unet, size: int, batch: int = 1, seed: int = 0):
    from gspn_lightning.models.sdxl import example_inputs

    gen = torch.Generator(next(unet.parameters()).device).manual_seed(seed)
    return example_inputs(unet, size, size, batch=batch, text_len=77, generator=gen)


def make_step(unet, inputs):
    sample, t, kwargs = inputs

    def step():
        with torch.inference_mode():
            return unet(sample, t, **kwargs).sample

    return step


def peak_child(variant: str, size: int, divisor: int, head_dim: int, chunk: int, layers: str) -> None:
    """In a fresh process (``--peak-child``): build one variant, run a warm-up step, then print how far
    the resident set grew over a second step."""
    torch.set_num_threads(1)
    config = sdxl_config(divisor, head_dim, json.loads(layers))
    unet = build_models(config, "cpu", torch.float32, local_chunk=chunk, variants=(variant,))[variant]
    step = make_step(unet, step_inputs(unet, size))
    step()
    base = reset_peak_rss()
    step()
    print_peak_rss(base)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--divisor", type=int, default=10, help="divide SD-XL's channel widths by this")
    p.add_argument(
        "--head-dim", type=int, default=None, help="channels per head (default 64, or 16 narrowed)"
    )
    p.add_argument(
        "--layers", type=int, nargs=3, default=None, help="transformer layers per level (SD-XL: 1 2 10)"
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="latent sizes (pixels / 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--local-chunk", type=int, default=4, help="chunk of the gspn_local variant (default 4)")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="default: all four"
    )
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--replace", action="store_true")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--peak-child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_child:
        variant, size, divisor, head_dim, chunk, layers = args.peak_child
        peak_child(variant, int(size), int(divisor), int(head_dim), int(chunk), layers)
        return {}
    if args.local_chunk < 1:
        p.error("--local-chunk must be >= 1")

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    config = sdxl_config(args.divisor, args.head_dim, args.layers)
    head_dim = config["block_out_channels"][0] // config["attention_head_dim"][0]
    models = build_models(config, device, torch.float32, local_chunk=args.local_chunk, variants=args.variants)
    names = list(models)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    attn1 = sum(type(m).__name__ == "BasicTransformerBlock" for m in next(iter(models.values())).modules())
    info = machine_info(device)
    print(f"SD-XL UNet / {args.divisor}: channels {config['block_out_channels']}, heads "
          f"{config['attention_head_dim']}, layers {config['transformer_layers_per_block']}, {attn1} attn1, "
          f"params {params}, variants {names}, {args.threads} thread(s), {info['cpu']}")  # fmt: skip
    stem = new_result_path(args.out_dir, f"sdxl_step_{info['name']}", args.replace)

    def report(rows: list[dict]) -> tuple[dict, list[str]]:
        """The result and its table for the sizes measured so far."""
        exponents = {
            name: fit_exponent([r["latent"] for r in rows], [r[name]["median"] for r in rows])
            if len(rows) > 1
            else None
            for name in names
        }
        result = {
            "benchmark": "sdxl_step",
            "machine": info,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "threads": args.threads,
            "rounds": args.rounds,
            "config": {
                k: config[k]
                for k in (
                    "block_out_channels",
                    "attention_head_dim",
                    "transformer_layers_per_block",
                    "cross_attention_dim",
                )
            },  # fmt: skip
            "divisor": args.divisor,
            "head_dim": head_dim,
            "self_attention_layers": attn1,
            "variants": names,
            "gspn": {"d_state": 8, "local_chunk": args.local_chunk},
            "params": params,
            "sizes": args.sizes,
            "rows": rows,
            "time_exponents": exponents,
        }
        md = [
            f"# One SD-XL UNet step: SDPA, GSPN global, GSPN local and no self-attention, on {info['cpu']} "
            f"({result['date']}, torch {torch.__version__}, {args.threads} thread(s))",
            "",
            f"SD-XL's UNet with channels / {args.divisor} ({config['block_out_channels']}, {head_dim} channels per "
            f"head, transformer layers {config['transformer_layers_per_block']}, {attn1} self-attention layers), "
            f"random weights, float32, batch 1, one forward in inference mode. SDPA: diffusers' AttnProcessor2_0; "
            f"GSPN: d_state 8, global or chunk {args.local_chunk}; no attn1: every attn1 replaced by the identity "
            f"(the floor). Parameters: "
            + ", ".join(f"{LABELS[n]} {params[n] / 1e6:.1f}M" for n in names)
            + f". Median [range] over {args.rounds} interleaved rounds, in ms; the ratios per round. "
            "Peak = resident-set growth over one step (fresh process per variant and size).",
            "",
            "| latent | pixels | level-1 tokens | "
            + " | ".join(f"{LABELS[n]} ms" for n in names)
            + " | "
            + " | ".join(f"SDPA / {LABELS[n]}" for n in names if n != "sdpa" and "sdpa" in names)
            + (" | " if "sdpa" in names and len(names) > 1 else "")
            + " | ".join(f"{LABELS[n]} peak MB" for n in names)
            + " |",
        ]
        ncols = 3 + len(names) + (len(names) - 1 if "sdpa" in names else 0) + len(names)
        md.append("|" + "---|" * 3 + "---:|" * (ncols - 3))
        for r in rows:
            cells = [f"{r['latent']}²", f"{r['pixels']}²", str(r["tokens_level1"])]
            cells += [fmt(r[n], 1) for n in names]
            cells += [f"{fmt(r[f'sdpa_over_{n}'])}x" for n in names if n != "sdpa" and "sdpa" in names]
            cells += [f"{r.get(f'{n}_peak_MB', float('nan')):.0f}" for n in names]
            md.append("| " + " | ".join(cells) + " |")
        missing = [s for s in args.sizes if s not in {r["latent"] for r in rows}]
        if missing:
            md += ["", f"Not measured (the run stopped or is still running): latents {missing}."]
        if all(v is not None for v in exponents.values()):
            md += [
                "",
                "Fitted exponent p of time ~ pixels^p: "
                + ", ".join(f"{LABELS[k]} {v:.2f}" for k, v in exponents.items()),
            ]
        return result, md

    rows = []  # the files are written after every size: a run stopped later keeps what it measured
    for size in args.sizes:
        steps = {}
        for name, unet in models.items():
            steps[name] = make_step(unet, step_inputs(unet, size))
            out = steps[name]()
            if not torch.isfinite(out).all():
                raise RuntimeError(f"{name} at {size}x{size}: non-finite output")
            del out
        t0 = time.perf_counter()
        times = interleaved(steps, device, args.rounds, warmup=0)
        row = {
            "latent": size,
            "pixels": 8 * size,
            "tokens_level1": (size // 2) ** 2,
            **{name: summary([1e3 * t for t in ts]) for name, ts in times.items()},
        }
        if "sdpa" in times:  # per-round time of SDPA over each other variant's
            row.update({f"sdpa_over_{n}": ratios(times["sdpa"], times[n]) for n in names if n != "sdpa"})
        if not args.no_peak:
            for name in names:
                child = [name, str(size), str(args.divisor), str(head_dim), str(args.local_chunk),
                         json.dumps(config["transformer_layers_per_block"])]  # fmt: skip
                row[f"{name}_peak_MB"] = run_peak_child(__file__, ["--peak-child", *child]) / 2**20
        rows.append(row)
        result, md = report(rows)
        write_results(stem, result, md)
        print(f"latent {size}x{size} ({8 * size}² px): "
              + ", ".join(f"{LABELS[n]} {fmt(row[n], 1)} ms" for n in names)
              + ("" if args.no_peak else ", peak MB " + " / ".join(f"{row[f'{n}_peak_MB']:.0f}" for n in names))
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()

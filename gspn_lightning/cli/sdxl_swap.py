"""``gspn sdxl-swap --config UNET_CONFIG.json [--d-state 8] [--chunk-size N|none]``: a diffusers UNet built on
the meta device from its config, every self-attention swapped for GSPN
(:func:`gspn_lightning.models.sdxl.swap_self_attention`), and the parameter counts before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gspn_lightning.models.sdxl import DEFAULT_CHUNK_SIZE, swap_self_attention
from gspn_lightning.models.summary import count_params

PROG = "gspn sdxl-swap"


def _chunk(value: str) -> int | None:
    return None if value.lower() in ("none", "null") else int(value)


def main(argv: Sequence[str] | None = None) -> dict:
    """Instantiate a UNet from a diffusers config JSON on the meta device, swap, print the counts."""
    from diffusers import UNet2DConditionModel

    parser = argparse.ArgumentParser(prog=PROG, description=main.__doc__)
    parser.add_argument("--config", required=True, help="a diffusers UNet2DConditionModel config.json")
    parser.add_argument("--d-state", type=int, default=8)
    parser.add_argument(
        "--chunk-size", type=_chunk, default=DEFAULT_CHUNK_SIZE,
        help=f"local chunk (default {DEFAULT_CHUNK_SIZE}, the swap's); 'none': global",
    )  # fmt: skip
    args = parser.parse_args(argv)
    path = Path(args.config)
    if not path.is_file():
        raise SystemExit(f"--config: no such file: {path}")
    config = json.loads(path.read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    before = count_params(unet)
    attn1 = {}
    for name, m in unet.named_modules():
        if name.endswith(".attn1"):
            attn1[name] = count_params(m)
    names = swap_self_attention(unet, d_state=args.d_state, chunk_size=args.chunk_size)
    after = count_params(unet)
    gspn = sum(count_params(unet.get_submodule(n)) for n in names)
    widths: dict[int, int] = {}
    for n in names:
        c = unet.get_submodule(n).query_dim
        widths[c] = widths.get(c, 0) + 1
    result = {
        "replacements": len(names),
        "by_channels": dict(sorted(widths.items())),
        "params_before": before,
        "params_after": after,
        "self_attention_params": sum(attn1.values()),
        "gspn_params": gspn,
        "chunk_size": args.chunk_size,
    }
    print(f"config: {path}")
    print(
        f"replaced {len(names)} self-attention layers: "
        + ", ".join(f"{v} at {c} channels" for c, v in widths.items())
        + (f", local (chunk {args.chunk_size})" if args.chunk_size else ", global")
    )
    print(
        f"parameters before: {before:,} ({before / 1e6:.1f}M), of which self-attention {result['self_attention_params']:,}"
    )
    print(f"parameters after:  {after:,} ({after / 1e6:.1f}M), of which GSPN modules {gspn:,} "
          f"(+{after - before:,} new gate parameters)")  # fmt: skip
    return result


# python -m gspn_lightning.cli.sdxl_swap: the same as gspn sdxl-swap
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))

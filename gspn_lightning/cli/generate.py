"""``gspn generate --sdxl SDXL_FOLDER --prompt TEXT --out DIR [--gspn-weights FILE] ...``: text-to-image
with SD-XL from a local folder, with GSPN in place of self-attention (or the original attention), into
PNGs and ``generation.json`` (:func:`gspn_lightning.models.sdxl_generate.generate`; the options and
the seeding are described there).  ``--progressive 1024,2048,4096 [--strength S] [--stage-steps N,N,N]``
makes very large images by upscale-and-refine stages (:mod:`gspn_lightning.models.sdxl_progressive`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gspn_lightning.models.sdxl_generate import generate, read_prompts
from gspn_lightning.models.sdxl_progressive import DEFAULT_STRENGTH

PROG = "gspn generate"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Text-to-image with SD-XL from a local folder, with GSPN in place of self-attention, into PNGs.",
    )
    p.add_argument("--sdxl", required=True, help="local SD-XL folder (diffusers layout)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument("--out", required=True, type=Path, help="output folder for the PNGs and generation.json")
    p.add_argument("--width", type=int, default=None, help="default 1024 (not with --progressive)")
    p.add_argument("--height", type=int, default=None, help="default 1024 (not with --progressive)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="one seed per image instead")
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gspn-weights", default=None, help="a save_gspn_weights safetensors file")
    p.add_argument(
        "--gspn-options", default=None, help="JSON for swap_self_attention, e.g. '{\"d_state\": 8}'"
    )
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (large sizes)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on cuda, else float32"
    )
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group(
        "progressive generation (very large images: generate at the first size, then upscale and refine)"
    )
    g.add_argument(
        "--progressive",
        default=None,
        metavar="SIZES",
        help="increasing sizes, N or WxH, comma-separated, e.g. 1024,2048,4096 or 1024x768,2048x1536; "
        "the last is the output's; implies VAE tiling",
    )
    g.add_argument(
        "--strength",
        default=None,
        metavar="S",
        help=f"noise level each refinement starts from, in (0, 1] (default {DEFAULT_STRENGTH}): one value, "
        "or one per size after the first, comma-separated",
    )
    g.add_argument(
        "--stage-steps",
        default=None,
        metavar="STEPS",
        help="schedule length per size, comma-separated (default --steps for each); "
        "a refinement runs the last int(steps * strength) of its steps",
    )
    g.add_argument("--save-stages", action="store_true", help="also save each earlier stage's image")
    return p


def _csv(option: str, text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    try:
        return [cast(t) for t in items]
    except ValueError as err:
        raise ValueError(f"{option} takes comma-separated values, got {text!r}") from err


def _strength(text: str | None) -> float | list[float] | None:
    values = _csv("--strength", text, float)
    return values[0] if values is not None and len(values) == 1 else values


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = _parser().parse_args(argv)
    try:
        prompts = read_prompts(args.prompt, args.prompts_file)
        options = None
        if args.gspn_options is not None:
            options = json.loads(args.gspn_options)
            if not isinstance(options, dict):
                raise ValueError(f"--gspn-options must be a JSON object, got {args.gspn_options!r}")
        same = ("width", "height", "steps", "guidance_scale", "negative_prompt", "seed", "seeds",
                "num_images_per_prompt", "batch_size", "gspn_weights", "vae_tiling", "device")  # fmt: skip
        paths = generate(
            args.sdxl,
            prompts,
            args.out,
            gspn_options=options,
            dtype=None if args.dtype is None else _DTYPES[args.dtype],
            progress=not args.no_progress,
            progressive=_csv("--progressive", args.progressive),
            strength=_strength(args.strength),
            stage_steps=_csv("--stage-steps", args.stage_steps, int),
            save_stages=args.save_stages,
            **{k: getattr(args, k) for k in same},
        )
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {len(paths)} images to {args.out}")
    return paths


# python -m gspn_lightning.cli.generate: the same as gspn generate
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))

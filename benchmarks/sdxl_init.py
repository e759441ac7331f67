"""How close the freshly swapped GSPN self-attention starts to the teacher attention (step 0).

    python benchmarks/sdxl_init.py [--config configs/sdxl/tiny_unet_config.json] [--sizes 16x24 24x16 32x32]

A UNet is built from a diffusers config with a fixed seed (no pretrained SD-XL weights can be had here,
so the teacher is randomly initialised), swapped with :func:`swap_self_attention`, and compared with
:func:`attention_errors`: each GSPN module is fed the teacher's own ``attn1`` input of its layer and its
output compared with the teacher's attention output (relative Frobenius error; a zero output scores 1),
beside ``to_out(mean of V)``, the output a perfectly uniform attention would give.  The whole UNet's
noise prediction is compared too, with the UNet whose self-attention is removed as the reference.

Variants: the default init (local, chunk 4, output-gate bias 3), the global variant (``chunk_size``
None), the gate bias at 0 and fully open (40) (global), and "sharp" teachers whose ``to_q`` is scaled by
4 and 16 before the swap (peakier softmax, as trained attention is; the GSPN copy inherits the scaled Q),
global and local.
Results: ``benchmarks/results/sdxl_init_<machine>[-N].{json,md}`` (a new file unless ``--replace``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, machine_info, new_result_path, write_results  # noqa: E402
from gspn_lightning.models.sdxl import (  # noqa: E402
    attention_errors,
    example_inputs,
    relative_error,
    swap_self_attention,
)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "local (chunk 4, the default)": ({}, 1.0),
    "global (chunk_size None)": ({"chunk_size": None}, 1.0),
    "global, u_bias 0": ({"chunk_size": None, "u_bias_init": 0.0}, 1.0),
    "global, u_bias 40 (gate open)": ({"chunk_size": None, "u_bias_init": 40.0}, 1.0),
    "global, sharp teacher (q x4)": ({"chunk_size": None}, 4.0),
    "local, sharp teacher (q x4)": ({}, 4.0),
    "global, sharp teacher (q x16)": ({"chunk_size": None}, 16.0),
    "local, sharp teacher (q x16)": ({}, 16.0),
}


def measure(config: dict, size: tuple[int, int], options: dict, q_scale: float, seed: int) -> dict:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    teacher = UNet2DConditionModel.from_config(config).eval()
    with torch.no_grad():
        for name, m in teacher.named_modules():
            if name.endswith(".attn1"):
                m.to_q.weight.mul_(q_scale)
    student = copy.deepcopy(teacher)
    names = swap_self_attention(student, d_state=4, **options)
    dropped = copy.deepcopy(teacher)
    for n in names:
        dropped.get_submodule(n).register_forward_hook(lambda m, a, out: torch.zeros_like(out))

    def forward(model):
        sample, t, kwargs = example_inputs(
            model, *size, batch=2, generator=torch.Generator().manual_seed(seed)
        )
        return model(sample, t, **kwargs).sample

    per_layer = attention_errors(teacher, student, forward)
    with torch.no_grad():
        target = forward(teacher)
        unet_gspn, unet_dropped = (
            relative_error(forward(student), target),
            relative_error(forward(dropped), target),
        )
    gspn = [e["gspn"] for e in per_layer.values()]
    uniform = [e["uniform_attention"] for e in per_layer.values()]
    return {
        "layers": len(per_layer),
        "gspn_mean": statistics.mean(gspn),
        "gspn_max": max(gspn),
        "uniform_attention_mean": statistics.mean(uniform),
        "unet_gspn": unet_gspn,
        "unet_without_self_attention": unet_dropped,
        "per_layer": per_layer,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs/sdxl/tiny_unet_config.json")
    p.add_argument("--sizes", nargs="+", default=["16x24", "24x16", "32x32"], help="latent HxW")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replace", action="store_true", help="overwrite the results file of this machine")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = json.loads(args.config.read_text())
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    info = machine_info(torch.device("cpu"))
    result = {"machine": info, "config": str(args.config), "seeds": args.seeds, "rows": []}
    md = [
        f"# Step-0 error of the GSPN swap against the teacher attention ({args.config.name}, seeds {args.seeds})",
        "",
        "Relative error, mean over layers (max); seeds averaged. Zero output = 1.",
        "",
        "| variant | latent | GSPN per layer | uniform attention | UNet: GSPN | UNet: no self-attn |",
        "|---|---|---:|---:|---:|---:|",
    ]
    print("\n".join(md), flush=True)
    for variant, (options, q_scale) in VARIANTS.items():
        for size in sizes:
            runs = [measure(config, size, options, q_scale, seed) for seed in args.seeds]

            def avg(key, runs=runs):
                return statistics.mean(r[key] for r in runs)

            row = {
                "variant": variant,
                "options": options,
                "q_scale": q_scale,
                "latent": list(size),
                "runs": runs,
            }
            row.update({k: avg(k) for k in ("gspn_mean", "gspn_max", "uniform_attention_mean")})
            row.update({k: avg(k) for k in ("unet_gspn", "unet_without_self_attention")})
            result["rows"].append(row)
            line = (
                f"| {variant} | {size[0]}x{size[1]} | {row['gspn_mean']:.3f} ({row['gspn_max']:.3f}) | "
                f"{row['uniform_attention_mean']:.3f} | {row['unet_gspn']:.3f} | "
                f"{row['unet_without_self_attention']:.3f} |"
            )
            md.append(line)
            print(line, flush=True)
    stem = new_result_path(args.out, f"sdxl_init_{info['name']}", args.replace)
    write_results(stem, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

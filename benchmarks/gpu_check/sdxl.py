"""sdxl: one SD-XL UNet step (real width, random weights, bf16): SDPA, GSPN global, GSPN local (chunk 4)
and the UNet with ``attn1`` removed, side by side (the variants of ``benchmarks/sdxl_step.py``)."""

from __future__ import annotations

import time

import torch

from benchmarks.gpu_check.harness import (
    Record,
    budgeted_cases,
    case_failed,
    fmt_value,
    peak_mib,
    peak_reset,
    pick_device,
    time_ms,
)
from benchmarks.sdxl_step import LABELS, VARIANTS  # no diffusers at import


def run(args, rec: Record) -> None:
    """The UNet of ``configs/sdxl/unet_config.json`` (2.57B parameters) as four variants of the same
    weights (:data:`benchmarks.sdxl_step.VARIANTS`: SDPA, GSPN global, GSPN local with chunk 4, and every
    ``attn1`` replaced by the identity, the floor no swap can beat), one inference forward each at
    1024² to 4096² pixels (128² to 512² latents), batch 1, bf16, the variants interleaved per size;
    CUDA events, peak allocated memory.  Needs diffusers, which the lent GPU machine lacks: then the
    section records why and measures nothing.  Carry it as a wheel (pure Python; the machine has its
    requirements, transformers among them): here ``pip download diffusers==0.42.1 --no-deps -d
    .whl/``, there ``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site`` before ``GPU_CHECK_SECTIONS=sdxl bash scripts/gpu_check.sh``
    (docs/benchmarks.md)."""
    try:
        import diffusers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing, or failing to import against this transformers
        reason = (f"diffusers cannot be imported here ({type(exc).__name__}: {exc}); the SD-XL UNet is "
                  "diffusers' UNet2DConditionModel, so nothing was measured; carry it as a wheel, see "
                  "docs/benchmarks.md, The GPU check")  # fmt: skip
        rec.set(skipped_reason=reason)
        rec.skip("sdxl", reason)
        print(reason)
        return
    from benchmarks.sdxl_step import build_models, make_step, sdxl_config, step_inputs

    device = pick_device(args.rehearsal)
    if args.rehearsal:
        config, sizes, reps = sdxl_config(divisor=10, layers=[1, 1, 1]), (8, 16), 2
    else:
        config, sizes, reps = sdxl_config(), (128, 192, 256, 384, 512), 3
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    models = build_models(config, device, dtype)
    names = [n for n, _ in models["sdpa"].named_modules() if n.endswith(".attn1")]
    rec.set(channels=config["block_out_channels"], self_attention_layers=len(names), dtype="bfloat16",
            teacher_attention=type(models["sdpa"].get_submodule(names[0]).processor).__name__,
            variants=list(VARIANTS), local_chunk=4,
            params={k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
            build_s=round(time.perf_counter() - t0, 1))  # fmt: skip
    dead: set[str] = set()
    label = lambda n, s: f"{n} latent {s}x{s}"
    for size, name, unet, case in budgeted_cases(rec, sizes, models, label, 5.0, dead):
        try:
            step = make_step(unet, step_inputs(unet, size))
            out = step()
            peak_reset(device)
            t = time_ms(step, device, reps, warmup=0)
            rec.add(kind="sdxl_step", variant=name, latent=size, pixels=8 * size, **t,
                    peak_mib=peak_mib(device), finite=bool(torch.isfinite(out).all()))  # fmt: skip
            del out, step
        except Exception as exc:  # noqa: BLE001
            case_failed(rec, case, name, exc, dead, device)


def table(data: dict) -> list[str]:
    """The report's lines for this section's record: why it measured nothing, or a row per latent size."""
    if data.get("skipped_reason"):
        return ["", f"**SD-XL UNet step**: not measured: {data['skipped_reason']}"]
    rows = data.get("results")
    if not rows:
        return []
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    others = [v for v in variants if v != "sdpa"]
    lines = ["", f"**SD-XL UNet step** (width {data.get('channels')}, {data.get('self_attention_layers')} "
                 f"self-attention layers, bf16, batch 1, inference forward; SDPA = "
                 f"{data.get('teacher_attention')}, GSPN local = chunk {data.get('local_chunk', 4)}, no attn1 = "
                 "attn1 replaced by the identity): ms / peak MiB, and SDPA's time over each", "",
             "| latent | pixels | " + " | ".join(LABELS[v] for v in variants) + " | "
             + " | ".join(f"SDPA / {LABELS[v]}" for v in others) + " |",
             "|---|---|" + "---|" * len(variants) + "---:|" * len(others)]  # fmt: skip
    for size in sorted({r["latent"] for r in rows}):
        m = {r["variant"]: r for r in rows if r["latent"] == size}
        cells = [f"{m[v]['ms']:.4g} / {fmt_value(m[v]['peak_mib'], 0)}" if v in m else "-" for v in variants]
        cells += [f"{m['sdpa']['ms'] / m[v]['ms']:.2f}" if "sdpa" in m and v in m else "-" for v in others]
        lines.append(f"| {size}² | {8 * size}² | " + " | ".join(cells) + " |")
    return lines

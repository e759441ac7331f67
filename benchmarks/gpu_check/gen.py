"""gen: training-step throughput of GSPN-DiT-XL/2 and DiT-XL/2 at 256² and 512² (32² and 64² latents),
bf16 autocast, AdamW, DiT's hybrid loss."""

from __future__ import annotations

from benchmarks.gpu_check.harness import (
    Record,
    budgeted_models,
    diffusion_loss,
    fmt_value,
    pick_device,
    recorded,
    time_training,
)


def run(args, rec: Record) -> None:
    from gspn_lightning.diffusion import GaussianDiffusion

    device = pick_device(args.rehearsal)
    if args.rehearsal:
        cases = [
            (n, dict(hidden_size=32, depth=2), s, 2) for n in ("gspn_dit_xl_2", "dit_xl_2") for s in (8, 16)
        ]
        cases = [
            (n, {**kw, **({"num_heads": 4} if n.startswith("dit") else {})}, s, b) for n, kw, s, b in cases
        ]
    else:
        cases = [(n, {}, s, b) for s, b in ((32, 32), (64, 8)) for n in ("gspn_dit_xl_2", "dit_xl_2")]
    diffusion = GaussianDiffusion()  # DiT's betas; needs no diffusers
    label = lambda name, size, batch: f"{name} latent {size}x{size} batch {batch}"
    for name, _, size, batch, case, model in budgeted_models(rec, cases, label, device):
        loss_fn = None
        with recorded(rec, case, device):
            loss_fn = diffusion_loss(model, diffusion, batch, size, device)  # holds the model and its batch
            row = time_training(model, loss_fn, batch, device, 2 if args.rehearsal else 5)
            rec.add(kind="gen_step", model=name, latent=size, image=8 * size, batch=batch, **row)
        del model, loss_fn


def table(data: dict) -> list[str]:
    """The report's lines for this section's record: a row per model and size."""
    gen = data.get("results", [])
    if not gen:
        return []
    lines = ["", "**Generation training step** (bf16 autocast, AdamW, DiT's hybrid loss)", "",
             "| model | image | batch | ms/step | img/s | peak MiB |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in gen:
        lines.append(f"| {r['model']} ({r['params_m']:.0f}M) | {r['image']}² | {r['batch']} | {r['ms']:.1f} | "
                     f"{r['images_per_s']:.1f} | {fmt_value(r['peak_mib'], 0)} |")  # fmt: skip
    return lines

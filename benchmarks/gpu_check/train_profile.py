"""train_profile: where the time of one training step goes, kernel by kernel (torch.profiler, CUDA time)."""

from __future__ import annotations

from benchmarks.common import sync
from benchmarks.gpu_check.harness import (
    Record,
    adamw_step,
    budgeted_models,
    classification_loss,
    diffusion_loss,
    fmt_value,
    pick_device,
    recorded,
    top_kernels,
)


def run(args, rec: Record) -> None:
    """One GSPN-DiT-XL/2 training step (latent 32², batch 32, as in ``gen``) and one GSPN-T training
    step (batch 64 at 224², as in ``train``), each after a warm-up step: their top kernels."""
    from gspn_lightning.diffusion import GaussianDiffusion

    device = pick_device(args.rehearsal)
    diffusion = GaussianDiffusion()  # DiT's betas; needs no diffusers
    if args.rehearsal:
        cases = [("gspn_dit_xl_2", dict(hidden_size=32, depth=2), 8, 2),
                 ("gspn_t", dict(embed_dim=16, depths=(1, 1, 1, 1), num_classes=10), 64, 2)]  # fmt: skip
    else:
        cases = [("gspn_dit_xl_2", {}, 32, 32), ("gspn_t", {"num_classes": 1000}, 224, 64)]
    label = lambda name, size, batch: f"{name} {size}x{size} batch {batch}"
    for name, kw, size, batch, case, model in budgeted_models(rec, cases, label, device):
        step = None
        with recorded(rec, case, device):
            if name.startswith("gspn_dit"):
                loss_fn = diffusion_loss(model, diffusion, batch, size, device)
            else:
                loss_fn = classification_loss(model, batch, size, kw.get("num_classes", 1000), device)
            step = adamw_step(model, loss_fn, device)
            step()
            sync(device)
            total, launches, rows = top_kernels(step, device, top=15)
            rec.add(kind="profile", case=case, device_ms=total, launches=launches, top=rows)
        del model, step


def table(data: dict) -> list[str]:
    """The report's lines for this section's record: the top kernels of each profiled step."""
    lines = []
    for r in data.get("results", []):
        lines += ["", f"**Profile** of one training step, {r['case']} (bf16 autocast): {r['device_ms']:.1f} ms "
                      "of kernels; the top ones by self time", "", "| kernel | ms | share | calls |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for k in r["top"]:
            lines.append(
                f"| `{k['name']}` | {k['ms']:.2f} | {fmt_value(k['share'] and 100 * k['share'], 1)} % | {k['calls']} |"
            )
    return lines

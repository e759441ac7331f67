"""train: one training step of gspn_t at 224x224, batch 64, bf16 autocast, AdamW."""

from __future__ import annotations

import torch

from benchmarks.gpu_check.harness import Record, classification_loss, fmt_value, pick_device, time_training


def run(args, rec: Record) -> None:
    from gspn_lightning.models import create_model

    device = pick_device(args.rehearsal)
    if args.rehearsal:
        model_kw, batch, size, steps = dict(embed_dim=16, depths=(1, 1, 1, 1)), 2, 64, 2
    else:
        model_kw, batch, size, steps = {}, 64, 224, 8
    torch.manual_seed(0)
    model = create_model("gspn_t", num_classes=1000, **model_kw).to(device)
    row = time_training(model, classification_loss(model, batch, size, 1000, device), batch, device, steps)
    rec.add(kind="train_step", model="gspn_t", batch=batch, image=size, dtype="bf16-autocast", **row)
    if not row["loss_finite"]:
        raise RuntimeError("non-finite training loss")


def table(data: dict) -> list[str]:
    """The report's line for this section's record."""
    if not data.get("results"):
        return []
    r = data["results"][0]
    return ["", f"**Training step** gspn_t ({r['params_m']:.1f}M), batch {r['batch']} at {r['image']}², "
                f"bf16 autocast: {r['images_per_s']:.0f} img/s ({r['ms']:.1f} ms/step), "
                f"peak {fmt_value(r['peak_mib'], 0)} MiB"]  # fmt: skip

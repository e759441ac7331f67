"""train: one training step of gspn_t at 224x224, batch 64, bf16 autocast, AdamW."""

from __future__ import annotations

import torch

from benchmarks.gpu_check.harness import Record, classification_loss, pick_device, time_training


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

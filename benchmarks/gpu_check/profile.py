"""profile: where the time of one training step goes, kernel by kernel (torch.profiler, CUDA time)."""

from __future__ import annotations

import torch

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
)


def _top_kernels(step, device: torch.device, top: int) -> tuple[float, list[dict]]:
    """(total device ms, the ``top`` kernels by self device time) of one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device.type == "cuda":  # kernels and copies only: the CPU-side ops would count their kernels twice
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    total = sum(getattr(e, attr) for e in events) / 1e3
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    rows = [
        {"name": e.key[:110], "ms": getattr(e, attr) / 1e3, "calls": e.count,
         "share": getattr(e, attr) / 1e3 / total if total else None}
        for e in events[:top]
    ]  # fmt: skip
    return total, rows


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
            total, rows = _top_kernels(step, device, top=15)
            rec.add(kind="profile", case=case, device_ms=total, top=rows)
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

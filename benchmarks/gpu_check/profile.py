"""profile: where the time of one GSPN mixer forward+backward goes, kernel by kernel (torch.profiler,
the top 15 device kernels by self time), the old path (``backend="planes"``) against the new op
(``backend="kernel"``), ``GSPNTokenMixer(256)``, batch 2, bf16, at 128² and 256²; with the number of
kernel launches, which the fused layer is meant to cut."""

from __future__ import annotations

import torch

from benchmarks.common import sync
from benchmarks.gpu_check.harness import Record, fmt_value, pick_device, recorded, top_kernels

BACKENDS = ("planes", "kernel")


def _profile(layer, batch: int, g: int, dtype, device) -> tuple[float, int, list[dict]]:
    """:func:`top_kernels` of one fwd+bwd of ``layer`` on a ``g`` x ``g`` token grid, after a warm-up."""
    torch.manual_seed(0)
    layer = layer.to(device, dtype)
    x = torch.randn(batch, g * g, layer.dim, device=device, dtype=dtype, requires_grad=True)
    go = torch.randn_like(x)
    params = [x, *layer.parameters()]

    def step():
        return torch.autograd.grad(layer(x, (g, g)), params, go)

    step()  # warm-up: kernels loaded, allocator primed
    sync(device)
    return top_kernels(step, device, top=15)


def run(args, rec: Record) -> None:
    from gspn_lightning.nn import GSPNTokenMixer

    device = pick_device(args.rehearsal)
    dim, batch, grids = (16, 1, (8, 12)) if args.rehearsal else (256, 2, (128, 256))
    dtype = torch.bfloat16
    rec.set(dim=dim, batch=batch, dtype="bfloat16")
    for g in grids:
        for backend in BACKENDS:
            case = f"{backend} {g}x{g}"
            if rec.out_of_time(case, reserve=3.0):
                continue
            with recorded(rec, case, device):
                total, launches, rows = _profile(GSPNTokenMixer(dim, chunk_size=None, backend=backend),
                                                 batch, g, dtype, device)  # fmt: skip
                rec.add(kind="profile", backend=backend, grid=g, device_ms=total, launches=launches, top=rows)


def table(data: dict) -> list[str]:
    """The report's lines: per grid and backend, the kernel total, the launches and the top kernels."""
    lines = []
    for r in data.get("results", []):
        lines += ["", f"**Profile**, mixer fwd+bwd (width {data.get('dim')}, batch {data.get('batch')}, bf16), "
                      f"{r['grid']}x{r['grid']}, backend={r['backend']}: {r['device_ms']:.2f} ms of kernels, "
                      f"{r['launches']} launches; the top ones by self time", "",
                  "| kernel | ms | share | calls |", "|---|---:|---:|---:|"]  # fmt: skip
        for k in r["top"]:
            lines.append(
                f"| `{k['name']}` | {k['ms']:.3f} | {fmt_value(k['share'] and 100 * k['share'], 1)} % | {k['calls']} |"
            )
    return lines

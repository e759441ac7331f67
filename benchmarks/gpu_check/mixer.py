"""mixer: a GSPN mixer layer, the old path (``backend="planes"``) and the new op (``backend="kernel"``),
against softmax attention of the same width (4 heads, flash backend), width 256, batch 2, bf16, on
token grids 32² to 256²: forward+backward first (every grid), then forward; median time, peak memory
(``torch.cuda.max_memory_allocated``, the inputs included), the time ratio to SDPA, and the fitted
exponent of time ~ tokens^p."""

from __future__ import annotations

import torch

from benchmarks.common import log_slope
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


class AttentionLayer(torch.nn.Module):
    """Multi-head self-attention with its projections, ``(B, N, C) -> (B, N, C)``, through SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


def _time_layer(layer, batch, g, dim, dtype, device, phase, reps):
    """(timing, peak MiB, MiB allocated before the call) of a token layer on a g x g grid."""
    x = torch.randn(batch, g * g, dim, device=device, dtype=dtype, requires_grad=True)
    go = torch.randn_like(x)
    params = [x, *layer.parameters()]
    if phase == "fwd":
        fn = lambda: layer(x, (g, g)).detach()
    else:
        fn = lambda: torch.autograd.grad(layer(x, (g, g)), params, go, allow_unused=True)
    fn()
    peak_reset(device)
    base = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    t = time_ms(fn, device, reps, warmup=1)
    return t, peak_mib(device), base


LAYERS = ("gspn_planes", "gspn_kernel", "sdpa")
PHASES = ("fwd+bwd", "fwd")


def run(args, rec: Record) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gspn_lightning.nn import GSPNTokenMixer

    device = pick_device(args.rehearsal)
    dim, heads, batch = (32, 2, 1) if args.rehearsal else (256, 4, 2)
    dtype = torch.bfloat16
    grids = (8, 12) if args.rehearsal else (32, 64, 128, 256)
    reps = 2 if args.rehearsal else 10
    backend = [SDPBackend.MATH] if device.type == "cpu" else [SDPBackend.FLASH_ATTENTION]
    torch.manual_seed(0)
    gspn = GSPNTokenMixer(dim, chunk_size=None).to(device, dtype)
    layers = {"gspn_planes": gspn, "gspn_kernel": gspn, "sdpa": AttentionLayer(dim, heads).to(device, dtype)}
    rec.set(dim=dim, heads=heads, batch=batch, dtype="bfloat16", sdpa_backend=str(backend[0]),
            params={k: sum(p.numel() for p in m.parameters()) for k, m in layers.items()})  # fmt: skip
    for phase in PHASES:
        dead: set[str] = set()
        label = lambda n, g, p=phase: f"{n} {g}x{g} {p}"  # noqa: E731
        for g, name, layer, case in budgeted_cases(rec, grids, layers, label, 2.0, dead):
            if name.startswith("gspn_"):
                layer.backend = name.removeprefix("gspn_")
            try:
                with sdpa_kernel(backend):
                    t, peak, base = _time_layer(layer, batch, g, dim, dtype, device, phase, reps)
                rec.add(kind="layer", layer=name, grid=g, tokens=g * g, phase=phase, **t, peak_mib=peak,
                        peak_over_inputs_mib=None if peak is None else peak - base)  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                case_failed(rec, case, name, exc, dead, device)
    fits = {}
    for name in layers:
        for phase in PHASES:
            rows = [r for r in rec.data["results"] if r["layer"] == name and r["phase"] == phase]
            fits[f"{name} {phase}"] = log_slope([r["tokens"] for r in rows], [r["ms"] for r in rows])
    rec.set(time_exponents=fits)


def find(rows, layer: str, grid: int, phase: str = "fwd+bwd") -> dict | None:
    m = [r for r in rows if (r["layer"], r["grid"], r["phase"]) == (layer, grid, phase)]
    return m[0] if m else None


def table(data: dict) -> list[str]:
    """The report's lines: per phase and grid, ms / peak MiB of each layer and GSPN's speed-up over SDPA
    (SDPA's time over GSPN's: above 1 is faster than attention)."""
    rows = data.get("results", [])
    if not rows:
        return []
    lines = ["", f"**Mixer vs SDPA** (width {data.get('dim')}, {data.get('heads')} heads, batch {data.get('batch')}, "
                 f"bf16; {data.get('sdpa_backend')}): ms / peak MiB; speed-up = SDPA ms / GSPN ms", "",
             "| phase | grid | planes (old) | kernel (new) | sdpa | old speed-up | new speed-up |",
             "|---|---|---|---|---|---:|---:|"]  # fmt: skip
    for phase in PHASES:
        for g in sorted({r["grid"] for r in rows if r["phase"] == phase}):
            found = {name: find(rows, name, g, phase) for name in LAYERS}
            cells = [f"{r['ms']:.3g} / {fmt_value(r['peak_mib'], 0)}" if r else "-" for r in found.values()]
            sdpa = found["sdpa"]
            speedups = [fmt_value(sdpa["ms"] / found[n]["ms"]) + "x" if sdpa and found[n] else "-"
                        for n in ("gspn_planes", "gspn_kernel")]  # fmt: skip
            lines.append(f"| {phase} | {g}x{g} | " + " | ".join(cells + speedups) + " |")
    fits = data.get("time_exponents", {})
    lines.append("\ntime ~ tokens^p: " + ", ".join(f"{k} p={fmt_value(v)}" for k, v in fits.items()))
    return lines

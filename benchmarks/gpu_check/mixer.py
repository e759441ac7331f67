"""mixer: a GSPN mixer layer against softmax attention of the same width (flash backend), bf16, on
growing token grids: time and peak memory, and the fitted exponent of time ~ tokens^p."""

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


def run(args, rec: Record) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gspn_lightning.nn import GSPNTokenMixer

    device = pick_device(args.rehearsal)
    dim, heads, batch = (32, 2, 1) if args.rehearsal else (256, 4, 2)
    dtype = torch.bfloat16
    grids = (8, 12) if args.rehearsal else (32, 64, 128, 192, 256)
    reps = 2 if args.rehearsal else 10
    backend = [SDPBackend.MATH] if device.type == "cpu" else [SDPBackend.FLASH_ATTENTION]
    torch.manual_seed(0)
    layers = {
        "gspn": GSPNTokenMixer(dim, chunk_size=None).to(device, dtype),
        "sdpa": AttentionLayer(dim, heads).to(device, dtype),
    }
    rec.set(dim=dim, heads=heads, batch=batch, dtype="bfloat16", sdpa_backend=str(backend[0]),
            params={k: sum(p.numel() for p in m.parameters()) for k, m in layers.items()})  # fmt: skip
    dead: set[str] = set()
    for g, name, layer, case in budgeted_cases(rec, grids, layers, lambda n, g: f"{n} {g}x{g}", 2.0, dead):
        try:
            with sdpa_kernel(backend):
                for phase in ("fwd", "fwd+bwd"):
                    t, peak, base = _time_layer(layer, batch, g, dim, dtype, device, phase, reps)
                    rec.add(kind="layer", layer=name, grid=g, tokens=g * g, phase=phase, **t, peak_mib=peak,
                            peak_over_inputs_mib=None if peak is None else peak - base)  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            case_failed(rec, case, name, exc, dead, device)
    fits = {}
    for name in layers:
        for phase in ("fwd", "fwd+bwd"):
            rows = [r for r in rec.data["results"] if r["layer"] == name and r["phase"] == phase]
            fits[f"{name} {phase}"] = log_slope([r["tokens"] for r in rows], [r["ms"] for r in rows])
    rec.set(time_exponents=fits)


def table(data: dict) -> list[str]:
    """The report's lines for this section's record: ms / peak MiB per grid, layer and phase."""
    rows = data.get("results", [])
    if not rows:
        return []
    lines = ["", f"**Mixer vs SDPA** (width {data.get('dim')}, {data.get('heads')} heads, batch {data.get('batch')}, "
                 f"bf16; {data.get('sdpa_backend')}): ms / peak MiB", "",
             "| grid | gspn fwd | sdpa fwd | gspn fwd+bwd | sdpa fwd+bwd |", "|---|---|---|---|---|"]  # fmt: skip
    for g in sorted({r["grid"] for r in rows}):
        cells = []
        for phase in ("fwd", "fwd+bwd"):
            for layer in ("gspn", "sdpa"):
                m = [r for r in rows if (r["grid"], r["layer"], r["phase"]) == (g, layer, phase)]
                cells.append(f"{m[0]['ms']:.3g} / {fmt_value(m[0]['peak_mib'], 0)}" if m else "-")
        lines.append(f"| {g}x{g} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    fits = data.get("time_exponents", {})
    lines.append("\ntime ~ tokens^p: " + ", ".join(f"{k} p={fmt_value(v)}" for k, v in fits.items()))
    return lines

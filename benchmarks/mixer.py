"""The GSPN mixer layer: the fused op against the unfused (per-direction) layer and against 4-head
attention (``scaled_dot_product_attention``) of the same width; time, peak memory and saved bytes of
one forward + backward, at 1 and 2 threads.

    python benchmarks/mixer.py [--sizes 16 32 64 128] [--threads 1 2] [--rounds 5] [--skip-cases]

Two parts, each timed in interleaved rounds (see ``common.py``) with the copy bandwidth measured in
every round:

1. *cases*: ``GSPNMixer`` as built by default (the gate projection fused into the op,
   ``gspn_propagate_proj``), the previous fused path (``fuse_gates=False``: the 24 logit maps per
   channel materialised by the ``gates`` conv, then ``gspn_propagate``) and the unfused layer
   (``fused=False``, per-direction ``normalize_gates`` + ``gspn_scan``), at the issue's two layers,
   GSPN-T stage 1 (dim 96, d_inner 144, B=8, 56x56, chunked as the GSPN-T config does) and a global
   layer (dim 384, B=8, 14x14), and at the digits-demo GSPN-DiT's layer (dim = d_inner = 128,
   d_state 8, B=64, 8x8, chunk 2).
2. *scaling*: at grid sizes S x S (B=1, dim 96), the fused and unfused GSPN mixers and a 4-head
   attention layer (qkv projection, SDPA, output projection) of the same width; the scaling exponent
   p of time ~ N^p (N = S^2 pixels) is fitted by least squares over the sizes.

Peak memory is measured apart from the timing, in a fresh process per layer and size: the growth of
its resident set over one forward + backward (``VmHWM`` after the step minus ``VmRSS`` before), with
glibc serving every block above 64 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``) so that freed memory
leaves the resident set and what the step allocates shows in it (parameter gradients included).  ``saved`` is what autograd keeps for the backward (saved-tensor hooks).
Every output is checked finite, and the fused layer's output against the unfused one's.
Results: ``benchmarks/results/mixer_<machine>[-N].{json,md}`` (a new file unless ``--replace``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    RESULTS,
    copy_fn,
    fit_exponent,
    fmt,
    interleaved,
    machine_info,
    new_result_path,
    print_peak_rss,
    ratios,
    reset_peak_rss,
    run_peak_child,
    summary,
    write_results,
)
from gspn_lightning.nn import GSPNMixer  # noqa: E402
from gspn_lightning.ops import kernel_available  # noqa: E402


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a ``(B, C, H, W)`` map (the baseline)."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).reshape(B, C, H, W)


def peak_child(variant: str, dim: int, batch: int, size: int, chunk: int, d_inner: int) -> None:
    """Run in a fresh process (``--peak-child``): build one layer and its input, run one step, free
    its gradients, then run a second forward + backward and print how far the resident set grew above
    what it was before it (gradients of the parameters and of x included)."""
    torch.set_num_threads(1)
    layer = make_layers(dim, chunk or None, sdpa=variant == "sdpa", d_inner=d_inner or None)[variant]
    x = torch.randn(batch, dim, size, size).requires_grad_()
    go = torch.randn(batch, dim, size, size)
    kernel_available("cpu")
    layer(x).backward(go)  # a first step: one-time set-up (libraries, thread pool, caches) is not counted
    layer.zero_grad(set_to_none=True)
    x.grad = None
    base = reset_peak_rss()
    layer(x).backward(go)
    print_peak_rss(base)


@functools.cache
def peak_bytes(variant: str, dim: int, batch: int, size: int, chunk: int | None, d_inner: int | None) -> int:
    """Peak memory of one forward + backward, measured in a fresh process whose glibc serves every
    block above 64 KiB by mmap (so that freed memory leaves the resident set and what the step
    allocates shows in it)."""
    return run_peak_child(
        __file__,
        ["--peak-child", variant, str(dim), str(batch), str(size), str(chunk or 0), str(d_inner or 0)],
    )


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def make_step(layer: nn.Module, x: torch.Tensor, go: torch.Tensor):
    out = {}

    def step():
        y = layer(x)
        y.backward(go)
        out["y"] = y.detach()
        return y

    return step, out


def measure(
    layers: dict[str, nn.Module], shape, rounds: int, threads: int, chunk: int | None, d_inner: int | None = None
) -> dict:
    """Interleaved timing of forward + backward of each layer on one input, plus peak and saved bytes."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_()
    go = torch.randn(shape, generator=g)
    steps, outs = {}, {}  # outputs of the last timed step, for the checks
    for name, layer in layers.items():
        steps[name], outs[name] = make_step(layer, x, go)
    nbytes = x.numel() * x.element_size()
    copy, copy_bytes = copy_fn(torch.device("cpu"), max(nbytes, 64 * 2**20))
    times = interleaved({**steps, "copy": copy}, torch.device("cpu"), rounds)
    row = {"shape": list(shape), "threads": threads, "rounds": rounds}
    row["copy_GBps"] = summary([copy_bytes / t / 1e9 for t in times.pop("copy")])
    for name in times:
        if not torch.isfinite(outs[name]["y"]).all():
            raise RuntimeError(f"{name}: non-finite output")
    for name in ("gspn", "gspn_prev"):
        if name in outs and "gspn_unfused" in outs:
            a, b = outs[name]["y"], outs["gspn_unfused"]["y"]
            key = f"{name}_vs_unfused_max_rel_err"
            row[key] = ((a - b).abs().max() / b.abs().max()).item()
            if row[key] > 1e-4:
                raise RuntimeError(f"{name} and the unfused mixer disagree: {row[key]:.3g}")
    for name, ts in times.items():
        row[name] = {
            "fwd_bwd_ms": summary([1e3 * t for t in ts]),
            "peak_MB": peak_bytes(name, shape[1], shape[0], shape[2], chunk, d_inner) / 2**20,
            "saved_MB": saved_bytes(lambda s=layers[name]: s(x)) / 2**20,
        }
        row[name]["_times"] = ts
    return row


def make_layers(
    dim: int, chunk_size: int | None, sdpa: bool, d_inner: int | None = None, prev: bool = True
) -> dict[str, nn.Module]:
    """The default mixer (``gspn``), the previous fused path (``gspn_prev``: materialised logits, only
    with ``prev``), the unfused layer (``gspn_unfused``), all with the same weights; SDPA if asked."""
    torch.manual_seed(0)
    fused = GSPNMixer(dim, d_inner=d_inner, chunk_size=chunk_size, backend="kernel")
    layers = {"gspn": fused}
    variants = {"gspn_prev": dict(fuse_gates=False), "gspn_unfused": dict(fused=False)}
    for name, kwargs in variants.items():
        if name == "gspn_prev" and not prev:
            continue
        layers[name] = GSPNMixer(dim, d_inner=d_inner, chunk_size=chunk_size, backend="kernel", **kwargs)
        layers[name].load_state_dict(fused.state_dict())
    if sdpa:
        layers["sdpa"] = Attention(dim, heads=4)
    return layers


CASES = {
    # GSPN-T stage 1: dim 96 (d_inner 144), 56x56, local scans (chunk 2, as gspn_t builds them)
    "gspn_t_stage1": dict(dim=96, batch=8, size=56, chunk_size=2),
    "global_14x14": dict(dim=384, batch=8, size=14, chunk_size=None),
    # the digits demo's GSPN-DiT block (gspn_dit_s_4, hidden 128, d_state 8, 32x32 input, patch 4)
    "dit_digits_8x8": dict(dim=128, batch=64, size=8, chunk_size=2, d_inner=128),
}


def strip(row: dict) -> dict:
    return {
        k: ({kk: vv for kk, vv in v.items() if kk != "_times"} if isinstance(v, dict) else v)
        for k, v in row.items()
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-cases", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replace", action="store_true", help="overwrite the results file of this machine")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--peak-child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_child:
        variant, *numbers = args.peak_child
        peak_child(variant, *map(int, numbers))
        return 0
    if not kernel_available("cpu"):
        print("the compiled CPU kernel is unavailable; nothing to compare", file=sys.stderr)
        return 1
    info = machine_info(torch.device("cpu"))
    print(f"machine: {info['cpu']} ({info['cores']} cores, {info['cpu_capability']})")
    result = {
        "benchmark": "gspn_mixer",
        "machine": info,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cases": [],
        "scaling": [],
    }
    md = [
        f"# GSPN mixer layer, forward + backward, on {info['cpu']} ({result['date']}, torch {info['torch']})",
        "",
    ]
    md += [
        "Median [range] over interleaved rounds; ratios per round. Peak = resident-set growth over one step.",
        "",
    ]

    if not args.skip_cases:
        md += ["## Default mixer (projection fused) vs the previous fused path vs the unfused layer", ""]
        md += [
            "| case | threads | default ms | prev. fused ms | unfused ms | default vs prev. | default vs unfused "
            "| peak MB default / prev. / unfused | saved MB default / prev. / unfused |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in args.cases:
            c = CASES[name]
            d_inner = c.get("d_inner")
            layers = make_layers(c["dim"], c["chunk_size"], sdpa=False, d_inner=d_inner)
            for threads in args.threads:
                shape = (c["batch"], c["dim"], c["size"], c["size"])
                row = measure(layers, shape, args.rounds, threads, c["chunk_size"], d_inner)
                row["case"] = name
                row["speedup"] = ratios(row["gspn_unfused"]["_times"], row["gspn"]["_times"])
                row["speedup_vs_prev"] = ratios(row["gspn_prev"]["_times"], row["gspn"]["_times"])
                row["peak_ratio"] = row["gspn"]["peak_MB"] / row["gspn_unfused"]["peak_MB"]
                row["peak_ratio_vs_prev"] = row["gspn"]["peak_MB"] / row["gspn_prev"]["peak_MB"]
                f, q, u = row["gspn"], row["gspn_prev"], row["gspn_unfused"]
                line = (
                    f"| {name} | {threads} | {fmt(f['fwd_bwd_ms'], 1)} | {fmt(q['fwd_bwd_ms'], 1)} | "
                    f"{fmt(u['fwd_bwd_ms'], 1)} | {fmt(row['speedup_vs_prev'])}x | {fmt(row['speedup'])}x | "
                    f"{f['peak_MB']:.0f} / {q['peak_MB']:.0f} / {u['peak_MB']:.0f} | "
                    f"{f['saved_MB']:.0f} / {q['saved_MB']:.0f} / {u['saved_MB']:.0f} |"
                )
                print(line, flush=True)
                md.append(line)
                result["cases"].append(strip(row))
        md.append("")

    if not args.skip_scaling:
        md += [f"## Against 4-head SDPA attention, dim {args.dim}, B=1", ""]
        md += [
            "| S x S | threads | fused ms | unfused ms | SDPA ms | SDPA / fused time | fused peak MB | unfused peak MB | SDPA peak MB | fused / SDPA peak | fused saved MB | SDPA saved MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        fits = {}
        for threads in args.threads:
            medians = {"gspn": [], "gspn_unfused": [], "sdpa": []}
            for size in args.sizes:
                layers = make_layers(args.dim, None, sdpa=True, prev=False)
                row = measure(layers, (1, args.dim, size, size), args.rounds, threads, None)
                row["size"] = size
                row["sdpa_over_fused"] = ratios(row["sdpa"]["_times"], row["gspn"]["_times"])
                row["fused_peak_over_sdpa"] = row["gspn"]["peak_MB"] / max(row["sdpa"]["peak_MB"], 1e-9)
                for k in medians:
                    medians[k].append(row[k]["fwd_bwd_ms"]["median"])
                f, u, s = row["gspn"], row["gspn_unfused"], row["sdpa"]
                line = (
                    f"| {size} | {threads} | {fmt(f['fwd_bwd_ms'], 1)} | {fmt(u['fwd_bwd_ms'], 1)} | "
                    f"{fmt(s['fwd_bwd_ms'], 1)} | {fmt(row['sdpa_over_fused'])} | {f['peak_MB']:.1f} | "
                    f"{u['peak_MB']:.1f} | {s['peak_MB']:.1f} | {row['fused_peak_over_sdpa']:.2f} | "
                    f"{f['saved_MB']:.1f} | {s['saved_MB']:.1f} |"
                )
                print(line, flush=True)
                md.append(line)
                result["scaling"].append(strip(row))
            fits[threads] = {k: fit_exponent(args.sizes, v) for k, v in medians.items()}
        result["scaling_exponents"] = fits
        md += ["", "Fitted exponent p of time ~ N^p (N = pixels):", ""]
        for threads, f in fits.items():
            md.append(
                f"- {threads} thread(s): fused {f['gspn']:.2f}, unfused {f['gspn_unfused']:.2f}, SDPA {f['sdpa']:.2f}"
            )
            print(md[-1])
    stem = new_result_path(args.out, f"mixer_{info['name']}", args.replace)
    write_results(stem, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

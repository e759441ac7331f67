"""tile: the local tile kernels of chunked layers (``csrc/cuda/gspn_tile_kernels.h``, issue 25 item 3)
against the lane kernels they replace, switched per call with ``GSPN_CUDA_FORWARD=tile`` / ``lanes``
and, for ``gspn_propagate_proj``'s backward, ``GSPN_CUDA_BACKWARD`` (``gspn_lanes_cuda.cu``; its tile
takes proxies of at most 16 channels, past that both sides run the lane path).  Correctness first:
``gspn_propagate_proj`` and ``gspn_attention`` forward, and ``gspn_propagate_proj``'s five gradients
("proj-bwd": the largest of their errors), float32 and bfloat16, each kernel's max error against the
float64 CPU reference (relative to the reference's largest value), at odd and square grids and chunks
2-5.  Then the median time and peak memory of the forward and of ``gspn_propagate_proj``'s forward +
backward ("proj fwd+bwd"), tile against lanes, bf16, all four directions: a
GSPN-DiT-XL/2-like layer on a 16 x 16 grid with chunk 2 (batch 32, 1152 channels) with a proxy of S =
8 and of S = 72 (XL's d_state = D / 16: the tile keeps its projection rows in shared memory, the
"lanes" side is then the materialised logits and the per-plane kernels) and a 64 x 64 grid with chunk
4 (batch 8, 384 channels, S = 8); the SD-XL swap's attention at 64 x 64 with chunk 4 (batch 2, 640
channels, S = 8).  In a rehearsal (CPU) the ops run their CPU kernels: the figures mean nothing there."""

from __future__ import annotations

import contextlib
import os

import torch

from benchmarks.gpu_check.harness import (
    Record,
    fmt_value,
    peak_mib,
    peak_reset,
    pick_device,
    recorded,
    time_ms,
)

ALL = ["t2b", "b2t", "l2r", "r2l"]
KERNELS = ("tile", "lanes")
FP32_MAX, BF16_MAX = 1e-5, 2e-2
# (B, C, H, W), chunk: correctness cases (odd grids both ways round, the timing grids)
CASES = [((1, 19, 17, 23), 3, 8), ((1, 19, 23, 17), 5, 8), ((2, 64, 16, 16), 2, 8), ((1, 64, 64, 64), 4, 8),
         ((2, 64, 16, 16), 2, 72)]  # fmt: skip
REHEARSAL_CASES = [((1, 5, 9, 7), 3, 8), ((1, 5, 9, 7), 2, 24)]
# (op, batch, channels, grid, chunk): timing cases
TIMINGS = [("proj", 32, 1152, 16, 2, 8), ("proj", 32, 1152, 16, 2, 72), ("proj", 8, 384, 64, 4, 8),
           ("attention", 2, 640, 64, 4, 8)]  # fmt: skip
REHEARSAL_TIMINGS = [("proj", 1, 8, 8, 2, 8), ("proj", 1, 8, 8, 2, 24), ("attention", 1, 8, 8, 2, 8)]


def _proj_inputs(B, C, H, W, S, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = len(ALL)
    ins = [torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
           torch.randn(B, S, H, W, generator=g, dtype=torch.float64),
           torch.randn(K * 6 * C, S, generator=g, dtype=torch.float64) * S**-0.5,
           torch.randn(K * 6 * C, generator=g, dtype=torch.float64),
           torch.rand(K, C, generator=g, dtype=torch.float64) + 0.1]  # fmt: skip
    ins = [t.to(device, dtype) for t in ins]
    ins[0] = ins[0].contiguous(memory_format=torch.channels_last)
    ins[1] = ins[1].contiguous(memory_format=torch.channels_last)
    return ins


def _attention_inputs(B, E, H, W, S, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = len(ALL)

    def r(*s, mul=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * mul

    ins = [r(B, H, W, E, mul=2), r(B, H, W, E, mul=2), r(B, H, W, E), r(B, H, W, S), r(K * 3 * E, S, mul=S**-0.5),
           r(K * 3 * E), torch.softmax(r(K, E), 0), r(E)]  # fmt: skip
    return [t.to(device, dtype) for t in ins]


def _ops():
    from gspn_lightning.ops import attention_reference, propagate_proj_reference

    ops = torch.ops.gspn_lightning
    return {
        "proj": (lambda ins, c: ops.propagate_proj_fwd(*ins, ALL, c), propagate_proj_reference, _proj_inputs),
        "attention": (lambda ins, c: ops.attention_fwd(*ins, ALL, c), attention_reference, _attention_inputs),
    }


def _proj_grads(ins, chunk, grad_y):
    return torch.ops.gspn_lightning.propagate_proj_bwd(grad_y, *ins, ALL, chunk)


def _proj_fwd_bwd(ins, chunk, grad_y):
    y = torch.ops.gspn_lightning.propagate_proj_fwd(*ins, ALL, chunk)
    return y, _proj_grads(ins, chunk, grad_y)


def _reference_grads(ins64, chunk, grad_y):
    from gspn_lightning.ops import propagate_proj_reference

    leaves = [t.detach().clone().requires_grad_() for t in ins64]
    y = propagate_proj_reference(*leaves, ALL, chunk)
    return torch.autograd.grad(y, leaves, grad_y)


@contextlib.contextmanager
def forward_kernel(kernel: str, S: int = 0):
    """GSPN_CUDA_FORWARD=kernel inside the block (the CUDA launcher reads it at every call), and
    GSPN_CUDA_BACKWARD likewise where propagate_proj's backward tile takes the proxy (S <= 16)."""
    values = {"GSPN_CUDA_FORWARD": kernel, "GSPN_CUDA_BACKWARD": kernel if S <= 16 else "lanes"}
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def run(args, rec: Record) -> None:
    from gspn_lightning.ops import _build

    device = pick_device(args.rehearsal)
    loaded = _build.load_cuda() if device.type == "cuda" else _build.load_cpu()
    if not loaded:
        raise RuntimeError(_build.build_error("cuda" if device.type == "cuda" else "cpu"))
    ops = _ops()
    rec.set(error="max|a - ref| / max|ref|", fp32_max=FP32_MAX, bf16_max=BF16_MAX, dtype_timing="bfloat16")
    for (B, C, H, W), chunk, S in REHEARSAL_CASES if args.rehearsal else CASES:
        for name, (op, reference, make) in ops.items():
            if name == "attention" and S > 16:  # its tile kernel takes S <= 16
                continue
            label = f"{name} {B}x{C}x{H}x{W} S={S} chunk={chunk}"
            if rec.out_of_time(label, reserve=10.0):
                continue
            with recorded(rec, label, device):
                shape = (B, C, H, W) if name == "proj" else (B, H, W, C)
                ins64 = make(*shape, S, torch.float64, torch.device("cpu"))
                with torch.no_grad():
                    ref = reference(*ins64, ALL, chunk)
                if name == "proj":
                    grad64 = torch.randn(
                        shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
                    )
                    ref_grads = _reference_grads(ins64, chunk, grad64)
                for dtype in (torch.float32, torch.bfloat16):
                    ins = [t.to(device, dtype) for t in ins64]
                    limit = FP32_MAX if dtype == torch.float32 else BF16_MAX
                    for kernel in KERNELS:
                        with forward_kernel(kernel, S):
                            out = op(ins, chunk).to("cpu", torch.float64)
                        err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                        rec.add(kind="correct", op=name, shape=list(shape), S=S, chunk=chunk, dtype=str(dtype)[6:],
                                kernel=kernel, error=err, ok=err == err and err <= limit)  # fmt: skip
                        if name != "proj":
                            continue
                        gy = grad64.to(device, dtype).contiguous(memory_format=torch.channels_last)
                        with forward_kernel(kernel, S):
                            grads = _proj_grads(ins, chunk, gy)
                        err = max(
                            float(
                                (g.to("cpu", torch.float64) - r).abs().max() / r.abs().max().clamp_min(1e-30)
                            )
                            for g, r in zip(grads, ref_grads)
                        )
                        rec.add(kind="correct", op="proj-bwd", shape=list(shape), S=S, chunk=chunk,
                                dtype=str(dtype)[6:], kernel=kernel, error=err, ok=err == err and err <= limit)  # fmt: skip
    reps = 2 if args.rehearsal else 20
    timings = REHEARSAL_TIMINGS if args.rehearsal else TIMINGS
    # propagate_proj's forward + backward at the same cases
    timings = timings + [("proj fwd+bwd", *case[1:]) for case in timings if case[0] == "proj"]
    for name, B, C, g, chunk, S in timings:
        op, _, make = ops[name.split()[0]]
        shape = (B, C, g, g) if name.startswith("proj") else (B, g, g, C)
        for kernel in KERNELS:
            label = f"time {name} {'x'.join(map(str, shape))} S={S} chunk={chunk} {kernel}"
            if rec.out_of_time(label, reserve=5.0):
                continue
            with recorded(rec, label, device):
                ins = make(*shape, S, torch.bfloat16, device)
                if name == "proj fwd+bwd":
                    gy = torch.randn_like(ins[0])

                    def fn(ins=ins, chunk=chunk, gy=gy):
                        return _proj_fwd_bwd(ins, chunk, gy)
                else:

                    def fn(ins=ins, op=op, chunk=chunk):
                        return op(ins, chunk)

                peak_reset(device)
                with forward_kernel(kernel, S):
                    t = time_ms(fn, device, reps)
                rec.add(kind="time", op=name, shape=list(shape), S=S, grid=g, chunk=chunk, kernel=kernel, **t,
                        peak_mib=peak_mib(device))  # fmt: skip


def table(data: dict) -> list[str]:
    """The report's lines: each case's error per kernel and dtype (pass / FAIL), then the forward's
    (and propagate_proj's forward + backward) time per kernel and the tile's speed-up over the lanes
    (lanes ms / tile ms)."""
    rows = data.get("results", [])
    if not rows:
        return []
    lines = ["", "**Tile kernels** (chunked layers; proj-bwd: the largest error of the five gradients): max error "
             "vs the float64 reference", "",
             "| op | shape | S | chunk | dtype | tile | lanes |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    correct = [r for r in rows if r.get("kind") == "correct"]
    keys = []
    for r in correct:
        k = (r["op"], tuple(r["shape"]), r["S"], r["chunk"], r["dtype"])
        if k not in keys:
            keys.append(k)
    for op, shape, S, chunk, dtype in keys:
        cells = []
        for kernel in KERNELS:
            m = [r for r in correct if (r["op"], tuple(r["shape"]), r["S"], r["chunk"], r["dtype"], r["kernel"])
                 == (op, shape, S, chunk, dtype, kernel)]  # fmt: skip
            cells.append(f"{m[0]['error']:.2g} {'pass' if m[0]['ok'] else 'FAIL'}" if m else "-")
        lines.append(
            f"| {op} | {'x'.join(map(str, shape))} | {S} | {chunk} | {dtype} | " + " | ".join(cells) + " |"
        )
    timed = [r for r in rows if r.get("kind") == "time"]
    if timed:
        lines += ["", "Forward (proj fwd+bwd: forward + backward), bf16, four directions: ms / peak MiB; speed-up = "
                  "lanes ms / tile ms (S > 16: lanes = materialised logits; the backward's tile takes S <= 16)", "",
                  "| op | shape | S | chunk | tile | lanes | speed-up |", "|---|---|---|---|---|---|---:|"]  # fmt: skip
        seen = []
        for r in timed:
            k = (r["op"], tuple(r["shape"]), r["S"], r["chunk"])
            if k in seen:
                continue
            seen.append(k)
            found = {
                r2["kernel"]: r2 for r2 in timed if (r2["op"], tuple(r2["shape"]), r2["S"], r2["chunk"]) == k
            }
            cells = [f"{found[n]['ms']:.3g} / {fmt_value(found[n]['peak_mib'], 0)}" if n in found else "-"
                     for n in KERNELS]  # fmt: skip
            speed = fmt_value(found["lanes"]["ms"] / found["tile"]["ms"]) + "x" if len(found) == 2 else "-"
            lines.append(
                f"| {k[0]} | {'x'.join(map(str, k[1]))} | {k[2]} | {k[3]} | "
                + " | ".join(cells)
                + f" | {speed} |"
            )
    return lines

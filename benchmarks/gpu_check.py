"""The GPU check's sections: build, environment, scan against the copy roofline, the per-line baseline,
the mixer against flash attention, training steps, an SD-XL UNet step with GSPN against SDPA
self-attention.  ``scripts/gpu_check.sh`` runs each section in its
own process under its own time limit and then ``report``; run one by hand with

    python benchmarks/gpu_check.py SECTION --out DIR [--budget SECONDS] [--rehearsal]

Every section writes ``DIR/<section>.json`` after each case it finishes, so a section that is killed
by its time limit still leaves what it measured.  ``--rehearsal`` runs the same code on the CPU with
tiny sizes (``bash scripts/gpu_check.sh --cpu-rehearsal``; a test runs it), so the script cannot rot
while no GPU is around.  Timing: CUDA events around each call, warm-up first, median of the repeats;
on the CPU (rehearsal) wall-clock time.  The figures mean nothing in a rehearsal.

Achieved bandwidth of the scan is the bytes the op must move over its time: the forward reads the
five inputs and writes the output (6 tensors); the backward reads the incoming gradient, the five
inputs and the saved output and writes five gradients (12 tensors), so forward+backward moves 18.
It is set against a device-to-device copy (bytes read + written) measured in the same process, once
per case group, interleaved with the cases.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ("env", "build", "scan", "baseline", "mixer", "train", "gen", "sdxl", "profile")
GIB = 1024**3


# ----------------------------------------------------------------------------------------------------
# plumbing: a section's record, written after every case


class Record:
    """The JSON of one section, rewritten whole after each case (so a kill loses at most one case)."""

    def __init__(self, out: Path, section: str, budget: float, rehearsal: bool) -> None:
        self.path = out / f"{section}.json"
        self.t0 = time.perf_counter()
        self.budget = budget
        self.data = {
            "section": section,
            "status": "running",
            "rehearsal": rehearsal,
            "budget_s": budget,
            "results": [],
            "skipped": [],
            "errors": [],
        }
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def time_left(self, reserve: float = 0.0) -> bool:
        return self.elapsed() + reserve < self.budget

    def add(self, **row) -> None:
        self.data["results"].append(row)
        self.save()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"case": what, "why": why})
        self.save()

    def error(self, what: str, exc: BaseException) -> None:
        self.data["errors"].append(
            {
                "case": what,
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                "trace": traceback.format_exc()[-4000:],
            }
        )
        self.save()

    def set(self, **kv) -> None:
        self.data.update(kv)
        self.save()

    def finish(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        self.data["status"] = "errors" if self.data["errors"] else "ok"
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def pick_device(rehearsal: bool) -> torch.device:
    if rehearsal:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (use --rehearsal for the CPU dry run)")
    return torch.device("cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, reps: int, warmup: int = 2) -> dict:
    """Median (and min, max) milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "reps": reps}


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / (t["ms"] * 1e-3) / 1e9


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None  # no allocator statistics on the CPU


def scan_inputs(shape, dtype, device, direction, seed=0, requires_grad=False):
    """x ~ N(0,1), lam = sigmoid(N(0,1)), gates normalised as the mixer makes them: finite outputs."""
    from gspn_lightning.ops import normalize_gates

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)
    lam = torch.sigmoid(torch.randn(shape, generator=g, device=device, dtype=dtype))
    logits = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3)]
    ins = [x, lam, *normalize_gates(*logits, direction)]
    return [t.detach().requires_grad_(requires_grad) for t in ins]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def budgeted_cases(rec: Record, sizes, variants: dict, label, reserve: float, dead: set):
    """``(size, name, variant, case)`` for each size and variant, in that order (the variants interleaved
    per size), skipping (and recording why) a variant that ran out of memory at a smaller size and
    every case once the section's budget is spent."""
    for size in sizes:
        for name, variant in variants.items():
            case = label(name, size)
            if name in dead:
                rec.skip(case, "ran out of memory at a smaller size")
            elif not rec.time_left(reserve=reserve):
                rec.skip(case, "section time budget spent")
            else:
                yield size, name, variant, case


def case_failed(rec: Record, case: str, name: str, exc: BaseException, dead: set, device) -> None:
    """Out of memory: mark ``name`` dead for the larger sizes; anything else: record the error."""
    if is_oom(exc):
        dead.add(name)
        rec.skip(case, "out of memory")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        rec.error(case, exc)


# ----------------------------------------------------------------------------------------------------
# env: what the machine is


def section_env(args, rec: Record) -> None:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "hostname_kind": platform.machine(),
    }
    if torch.cuda.is_available() and not args.rehearsal:
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            memory_gib=round(p.total_memory / GIB, 1),
        )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
        info["nvcc"] = nvcc.stdout.strip().splitlines()[-1] if nvcc.stdout.strip() else "?"
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvcc"] = f"unavailable ({type(exc).__name__})"
    for mod in (
        "lightning",
        "torchmetrics",
        "torchvision",
        "triton",
        "webdataset",
        "jsonargparse",
        "diffusers",
    ):
        try:
            info[f"pkg_{mod}"] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is an answer
            info[f"pkg_{mod}"] = None
    rec.set(info=info)


# ----------------------------------------------------------------------------------------------------
# build: the extensions for the visible GPU only, timed


def section_build(args, rec: Record) -> None:
    from gspn_lightning.ops import _build

    rec.set(
        cache=str(_build.cache_dir()),
        cuda_home=_build.find_cuda_home(),
        arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"),
    )
    t0 = time.perf_counter()
    ok = _build.load_cpu(verbose=True)
    rec.add(
        extension="cpu", ok=ok, seconds=round(time.perf_counter() - t0, 1), error=_build.build_error("cpu")
    )
    if args.rehearsal:
        rec.skip("cuda extension", "CPU rehearsal: no GPU (CI compiles it with GSPN_BUILD_CUDA=1)")
        return
    t0 = time.perf_counter()
    ok = _build.load_cuda(verbose=True, force=True)
    rec.add(
        extension="cuda", ok=ok, seconds=round(time.perf_counter() - t0, 1), error=_build.build_error("cuda")
    )
    if not ok:
        raise RuntimeError(f"CUDA extension failed: {_build.build_error('cuda')}")


# ----------------------------------------------------------------------------------------------------
# scan: forward and forward+backward against the copy roofline


def scan_cases(rehearsal: bool) -> list[tuple[str, tuple, torch.dtype]]:
    """(label, shape, dtype): the GSPN-2 paper's case first, then B=2, C=64 at growing sizes."""
    if rehearsal:
        return [("paper", (2, 2, 24, 24), torch.float32), ("grid", (1, 4, 16, 20), torch.float32),
                ("grid", (1, 4, 16, 20), torch.bfloat16)]  # fmt: skip
    cases = [("paper", (16, 8, 1024, 1024), torch.float32)]
    for dtype in (torch.float32, torch.bfloat16):
        for s in (256, 512, 1024, 2048):
            cases.append(("grid", (2, 64, s, s), dtype))
    return cases


def _time_scan(gspn_scan, shape, dtype, device, direction, chunk, reps):
    """(output finite, forward timing, forward+backward timing) of one scan case, on fresh outputs."""
    ins = scan_inputs(shape, dtype, device, direction, requires_grad=True)
    go = torch.randn(shape, device=device, dtype=dtype)

    def fwd():
        return gspn_scan(*ins, direction=direction, chunk_size=chunk, backend="kernel")

    finite = bool(torch.isfinite(fwd()).all())
    peak_reset(device)
    t_f = time_ms(lambda: fwd().detach(), device, reps)
    t_fb = time_ms(lambda: torch.autograd.grad(fwd(), ins, go), device, reps)
    return finite, t_f, t_fb


def section_scan(args, rec: Record) -> None:
    from gspn_lightning.ops import DIRECTIONS, gspn_scan, kernel_available, scan_reference

    device = pick_device(args.rehearsal)
    if not kernel_available(device):
        raise RuntimeError(f"no compiled GSPN kernel for {device}")
    reps = 3 if args.rehearsal else 10
    copy_bytes = 16 * 2**20 if args.rehearsal else 2 * GIB

    # correctness on realistic gates first: kernel against the reference, every direction
    check_shape = (1, 3, 9, 13) if args.rehearsal else (2, 16, 128, 96)
    for direction in DIRECTIONS:
        for chunk in (None, 2):
            ins = scan_inputs(check_shape, torch.float32, device, direction, seed=1)
            out = gspn_scan(*ins, direction=direction, chunk_size=chunk, backend="kernel")
            ref = scan_reference(*(t.double() for t in ins), direction, chunk)
            rel = ((out.double() - ref).norm() / ref.norm()).item()
            rec.add(kind="check", direction=direction, chunk=chunk, shape=list(check_shape), rel_err=rel,
                    finite=bool(torch.isfinite(out).all()), ok=rel < 1e-5)  # fmt: skip

    for label, shape, dtype in scan_cases(args.rehearsal):
        name = f"{label} {tuple(shape)} {str(dtype).replace('torch.', '')}"
        if not rec.time_left(reserve=2.0):
            rec.skip(name, "section time budget spent")
            continue
        try:
            bw = copy_bandwidth(device, copy_bytes, reps)
            numel = math.prod(shape)
            elt = torch.tensor([], dtype=dtype).element_size()
            for direction in DIRECTIONS:
                if not rec.time_left(reserve=2.0):
                    rec.skip(f"{name} {direction}", "section time budget spent")
                    continue
                for chunk in (None, 2):
                    finite, t_f, t_fb = _time_scan(gspn_scan, shape, dtype, device, direction, chunk, reps)
                    for phase, t, tensors in (("fwd", t_f, 6), ("fwd+bwd", t_fb, 18)):
                        gbs = tensors * numel * elt / (t["ms"] * 1e-3) / 1e9
                        rec.add(kind="scan", case=label, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                                direction=direction, chunk=chunk, phase=phase, **t, gb_s=gbs, copy_gb_s=bw,
                                frac_of_copy=gbs / bw, finite=finite, peak_mib=peak_mib(device))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - record and go on with the next case
            rec.error(name, exc)
            if is_oom(exc) and device.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# baseline: the release kernel as the paper describes it (one launch per line of the scan, one thread
# per pixel of that line, the previous line read back from global memory: nothing kept on chip)


def _baseline_kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["s", "prev_s"])
    def line_step(x, lam, wn, wm, wp, h, s, prev_s, L, M, total, FIRST: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < total
        n = idx // M
        j = idx - n * M
        off = (n * L + s) * M + j
        v = tl.load(lam + off, mask=mask, other=0.0).to(tl.float32) * tl.load(
            x + off, mask=mask, other=0.0
        ).to(tl.float32)
        if not FIRST:
            p = (n * L + prev_s) * M + j
            hn = tl.load(h + p - 1, mask=mask & (j > 0), other=0.0).to(tl.float32)
            hm = tl.load(h + p, mask=mask, other=0.0).to(tl.float32)
            hp = tl.load(h + p + 1, mask=mask & (j + 1 < M), other=0.0).to(tl.float32)
            v += tl.load(wn + off, mask=mask, other=0.0).to(tl.float32) * hn
            v += tl.load(wm + off, mask=mask, other=0.0).to(tl.float32) * hm
            v += tl.load(wp + off, mask=mask, other=0.0).to(tl.float32) * hp
        tl.store(h + off, v.to(h.dtype.element_ty), mask=mask)

    return line_step


def baseline_t2b(x, lam, wn, wm, wp, h, kernel, block: int = 1024) -> None:
    """The t2b forward scan with one launch per row (``h`` is written in place)."""
    B, C, H, W = x.shape
    total = B * C * W
    grid = (triton_cdiv(total, block),)
    for s in range(H):
        kernel[grid](x, lam, wn, wm, wp, h, s, max(s - 1, 0), H, W, total, FIRST=s == 0, BLOCK=block)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def section_baseline(args, rec: Record) -> None:
    from gspn_lightning.ops import gspn_scan, scan_reference

    device = pick_device(args.rehearsal)
    if args.rehearsal and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the CPU rehearsal runs the Triton baseline in the interpreter: set TRITON_INTERPRET=1"
        )
    kernel = _baseline_kernel()
    shape = (1, 2, 6, 5) if args.rehearsal else (16, 8, 1024, 1024)
    reps = 2 if args.rehearsal else 10
    ins = scan_inputs(shape, torch.float32, device, "t2b")
    h = torch.empty_like(ins[0])
    run = lambda: baseline_t2b(*ins, h, kernel, block=64 if args.rehearsal else 1024)
    run()
    ours = gspn_scan(*ins, direction="t2b", backend="kernel")
    ref = scan_reference(*(t.double() for t in ins), "t2b")
    errs = {
        name: ((out.double() - ref).norm() / ref.norm()).item()
        for name, out in (("baseline", h), ("kernel", ours))
    }
    del ref
    rec.add(kind="check", shape=list(shape), rel_err_vs_float64_reference=errs, ok=max(errs.values()) < 1e-5)
    if errs["baseline"] >= 1e-5:
        raise RuntimeError(f"the baseline does not compute the scan (relative error {errs['baseline']:.3g})")
    numel = math.prod(shape)
    t_ours = time_ms(lambda: gspn_scan(*ins, direction="t2b", backend="kernel"), device, reps)
    t_eager = time_ms(run, device, reps, warmup=1)
    rows = {"kernel": t_ours, "baseline (launch per line)": t_eager}
    if device.type == "cuda":
        # replaying a captured graph removes the Python launch cost: the fairest (fastest) baseline
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            run()
        rows["baseline (launch per line, CUDA graph)"] = time_ms(graph.replay, device, reps)
    bw = copy_bandwidth(device, 16 * 2**20 if args.rehearsal else 2 * GIB, reps)
    best_baseline = min(v["ms"] for k, v in rows.items() if k != "kernel")
    for name, t in rows.items():
        gbs = 6 * numel * 4 / (t["ms"] * 1e-3) / 1e9
        rec.add(kind="timing", impl=name, shape=list(shape), direction="t2b", phase="fwd", dtype="float32", **t,
                gb_s=gbs, frac_of_copy=gbs / bw, copy_gb_s=bw)  # fmt: skip
    rec.set(speedup_vs_best_baseline=best_baseline / t_ours["ms"])


# ----------------------------------------------------------------------------------------------------
# mixer: a GSPN mixer layer against softmax attention of the same width (flash backend)


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


def fit_exponent(ns: list[int], ts: list[float]) -> float | None:
    """Least-squares slope of log(time) against log(tokens)."""
    if len(ns) < 2:
        return None
    lx, ly = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


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


def section_mixer(args, rec: Record) -> None:
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
            fits[f"{name} {phase}"] = fit_exponent([r["tokens"] for r in rows], [r["ms"] for r in rows])
    rec.set(time_exponents=fits)


# ----------------------------------------------------------------------------------------------------
# train: one training step of gspn_t at 224x224, batch 64, bf16 autocast


def adamw_step(model: torch.nn.Module, loss_fn, device: torch.device, losses: list | None = None):
    """One bf16-autocast training step of ``model`` on ``loss_fn()`` with AdamW (lr 1e-4), as a closure;
    each step's loss is appended to ``losses``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(loss.detach())

    return step


def budgeted_models(rec: Record, cases, label, device: torch.device):
    """``(name, kwargs, size, batch, case, model)`` for each ``(name, kwargs, size, batch)`` of ``cases``
    while the section's budget lasts (later ones are recorded as skipped), the model built on
    ``device`` from seed 0."""
    from gspn_lightning.models import create_model

    for name, kw, size, batch in cases:
        case = label(name, size, batch)
        if not rec.time_left(reserve=5.0):
            rec.skip(case, "section time budget spent")
            continue
        with recorded(rec, case, device):
            torch.manual_seed(0)
            model = create_model(name, **kw).to(device)
            yield name, kw, size, batch, case, model


@contextlib.contextmanager
def recorded(rec: Record, case: str, device: torch.device):
    """Records an exception of the block as the case's error and goes on (freeing the cache after an
    out-of-memory)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - record and go on with the next case
        rec.error(case, exc)
        if is_oom(exc) and device.type == "cuda":
            torch.cuda.empty_cache()


def section_train(args, rec: Record) -> None:
    from gspn_lightning.models import create_model

    device = pick_device(args.rehearsal)
    if args.rehearsal:
        model_kw, batch, size, steps = dict(embed_dim=16, depths=(1, 1, 1, 1)), 2, 64, 2
    else:
        model_kw, batch, size, steps = {}, 64, 224, 8
    torch.manual_seed(0)
    model = create_model("gspn_t", num_classes=1000, **model_kw).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    losses = []
    step = adamw_step(model, lambda: torch.nn.functional.cross_entropy(model(images), labels), device, losses)
    step()
    peak_reset(device)
    t = time_ms(step, device, steps, warmup=1)
    finite = all(bool(torch.isfinite(v)) for v in losses)
    rec.add(kind="train_step", model="gspn_t", batch=batch, image=size, dtype="bf16-autocast", **t,
            images_per_s=batch / (t["ms"] * 1e-3), peak_mib=peak_mib(device), loss_finite=finite,
            params_m=sum(p.numel() for p in model.parameters()) / 1e6)  # fmt: skip
    if not finite:
        raise RuntimeError("non-finite training loss")


# ----------------------------------------------------------------------------------------------------
# gen: training-step throughput of GSPN-DiT-XL/2 and DiT-XL/2 at 256² and 512² (32² and 64² latents)


def section_gen(args, rec: Record) -> None:
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
        step = None
        with recorded(rec, case, device):
            x = torch.randn(batch, 4, size, size, device=device)
            y = torch.randint(0, 1000, (batch,), device=device)
            losses = []
            loss_fn = lambda m=model, x=x, y=y: diffusion.training_losses(m, x, y)["loss"].mean()
            step = adamw_step(model, loss_fn, device, losses)
            step()
            peak_reset(device)
            t = time_ms(step, device, 2 if args.rehearsal else 5, warmup=1)
            rec.add(kind="gen_step", model=name, latent=size, image=8 * size, batch=batch, **t,
                    images_per_s=batch / (t["ms"] * 1e-3), peak_mib=peak_mib(device),
                    loss_finite=all(bool(torch.isfinite(v)) for v in losses),
                    params_m=sum(p.numel() for p in model.parameters()) / 1e6)  # fmt: skip
        del model, step


# ----------------------------------------------------------------------------------------------------
# sdxl: one SD-XL UNet step (real width, random weights, bf16) with GSPN against SDPA self-attention


def section_sdxl(args, rec: Record) -> None:
    """The UNet of ``configs/sdxl/unet_config.json`` (2.57B parameters) and its GSPN-swapped copy, one
    inference forward each at 1024² to 4096² pixels (128² to 512² latents), batch 1, bf16, the two
    interleaved per size; CUDA events, peak allocated memory.  Needs diffusers, which the lent GPU
    machine lacks: then the section records why and measures nothing (put a diffusers copy on
    ``PYTHONPATH``, e.g. ``pip install --no-deps --target DIR diffusers``, to run it)."""
    try:
        import diffusers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing, or failing to import against this transformers
        reason = (f"diffusers cannot be imported here ({type(exc).__name__}: {exc}); the SD-XL UNet is "
                  "diffusers' UNet2DConditionModel, so nothing was measured")  # fmt: skip
        rec.set(skipped_reason=reason)
        rec.skip("sdxl", reason)
        print(reason)
        return
    from benchmarks.sdxl_step import build_pair, make_step, sdxl_config, step_inputs

    device = pick_device(args.rehearsal)
    if args.rehearsal:
        config, sizes, reps = sdxl_config(divisor=10, layers=[1, 1, 1]), (8, 16), 2
    else:
        config, sizes, reps = sdxl_config(), (128, 192, 256, 384, 512), 3
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    models = build_pair(config, device, dtype)
    names = [n for n, _ in models["gspn"].named_modules() if n.endswith(".attn1")]
    rec.set(channels=config["block_out_channels"], self_attention_layers=len(names), dtype="bfloat16",
            teacher_attention=type(models["sdpa"].get_submodule(names[0]).processor).__name__,
            params={k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
            build_s=round(time.perf_counter() - t0, 1))  # fmt: skip
    dead: set[str] = set()
    label = lambda n, s: f"{n} latent {s}x{s}"
    for size, name, unet, case in budgeted_cases(rec, sizes, models, label, 5.0, dead):
        try:
            step = make_step(unet, step_inputs(unet, size))
            out = step()
            peak_reset(device)
            t = time_ms(step, device, reps, warmup=0)
            rec.add(kind="sdxl_step", variant=name, latent=size, pixels=8 * size, **t,
                    peak_mib=peak_mib(device), finite=bool(torch.isfinite(out).all()))  # fmt: skip
            del out, step
        except Exception as exc:  # noqa: BLE001
            case_failed(rec, case, name, exc, dead, device)


# ----------------------------------------------------------------------------------------------------
# profile: where the time of one training step goes, kernel by kernel (torch.profiler, CUDA time)


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


def section_profile(args, rec: Record) -> None:
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
                x = torch.randn(batch, 4, size, size, device=device)
                y = torch.randint(0, 1000, (batch,), device=device)
                loss_fn = lambda m=model, x=x, y=y: diffusion.training_losses(m, x, y)["loss"].mean()
            else:
                x = torch.randn(batch, 3, size, size, device=device)
                y = torch.randint(0, kw.get("num_classes", 1000), (batch,), device=device)
                loss_fn = lambda m=model, x=x, y=y: torch.nn.functional.cross_entropy(m(x), y)
            step = adamw_step(model, loss_fn, device)
            step()
            sync(device)
            total, rows = _top_kernels(step, device, top=15)
            rec.add(kind="profile", case=case, device_ms=total, top=rows)
        del model, step


# ----------------------------------------------------------------------------------------------------
# report: one JSON and one markdown table from the sections' files


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _load_section(folder: Path, name: str, absent: str = "missing") -> dict:
    """A section's JSON in ``folder``, or a stand-in whose status says it is ``absent``."""
    p = folder / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {"section": name, "status": absent}


def report(out: Path, tests: dict | None, requested: list[str] | None = None) -> str:
    """gpu_check.{json,md} from the sections' JSON in ``out``; a section without one is 'missing', or
    'not requested' when ``requested`` (GPU_CHECK_SECTIONS) leaves it out."""
    sections = {}
    for name in SECTIONS:
        absent = "missing" if requested is None or name in requested else "not requested"
        sections[name] = _load_section(out, name, absent)
    status_file = out / "sections.tsv"
    exits = {}
    if status_file.exists():
        for line in status_file.read_text().splitlines():
            name, code, secs = line.split("\t")
            exits[name] = {"exit": int(code), "wall_s": float(secs)}
    merged = {"sections": sections, "exits": exits, "tests": tests}
    (out / "gpu_check.json").write_text(json.dumps(merged, indent=1, default=str))

    info = sections["env"].get("info", {})
    lines = ["# GSPN GPU check", ""]
    rehearsal = any(s.get("rehearsal") for s in sections.values())
    if rehearsal:
        lines += ["**CPU rehearsal: tiny sizes on the CPU; none of these figures describes a GPU.**", ""]
    lines += [
        f"- device: {info.get('gpu', 'cpu')} (capability {info.get('capability', '-')}); nvidia-smi: "
        f"{info.get('nvidia_smi', '-')}",
        f"- torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), Python {info.get('python')}, "
        f"{info.get('nvcc', '-')}",
        "",
        "| section | status | exit | wall s |",
        "|---|---|---:|---:|",
    ]
    for name in SECTIONS:
        s = sections[name]
        e = exits.get(name, {})
        status = s.get("status", "?")
        if e.get("exit") in (124, 137):
            status += " (killed at its time limit)"
        lines.append(f"| {name} | {status} | {_fmt(e.get('exit'))} | {_fmt(e.get('wall_s'), 1)} |")
    if tests:
        lines += ["", f"**Tests** ({tests.get('files')}): {tests.get('summary')}"]
        for f in tests.get("failures", [])[:20]:
            lines.append(f"- FAILED {f}")
    build = sections["build"].get("results", [])
    if build:
        lines += ["", "**Build**: " + ", ".join(f"{r['extension']} {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s"
                                              for r in build)]  # fmt: skip
    errors = [(n, e) for n, s in sections.items() for e in s.get("errors", [])]
    if errors:
        lines += ["", "**Errors**:"] + [f"- {n} / {e['case']}: {e['error'][:300]}" for n, e in errors]

    scan = [r for r in sections["scan"].get("results", []) if r.get("kind") == "scan"]
    checks = [r for r in sections["scan"].get("results", []) if r.get("kind") == "check"]
    if checks:
        worst = max(r["rel_err"] for r in checks)
        lines += ["", f"**Scan correctness** (kernel vs float64 reference, realistic gates, {len(checks)} cases): "
                      f"worst relative error {worst:.2e}, all finite: {all(r['finite'] for r in checks)}"]  # fmt: skip
    if scan:
        lines += ["", "**Scan** (fraction of the measured copy bandwidth; ms median)", "",
                  "| case | dtype | chunk | phase | t2b | b2t | l2r | r2l |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        keys = []
        for r in scan:
            k = (tuple(r["shape"]), r["dtype"], r["chunk"], r["phase"])
            if k not in keys:
                keys.append(k)
        for shape, dtype, chunk, phase in keys:
            cells = []
            for d in ("t2b", "b2t", "l2r", "r2l"):
                m = [r for r in scan if (tuple(r["shape"]), r["dtype"], r["chunk"], r["phase"], r["direction"])
                     == (shape, dtype, chunk, phase, d)]  # fmt: skip
                cells.append(f"{m[0]['frac_of_copy']:.0%} ({m[0]['ms']:.3g})" if m else "-")
            lines.append(
                f"| {'x'.join(map(str, shape))} | {dtype} | {chunk or 'global'} | {phase} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append(
            f"\ncopy bandwidth: {statistics.median(r['copy_gb_s'] for r in scan):.0f} GB/s (median over groups)"
        )

    base = sections["baseline"]
    if base.get("results"):
        lines += ["", "**Per-line baseline** (t2b forward, float32)", "", "| impl | ms | GB/s | of copy |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for r in base["results"]:
            if r.get("kind") == "timing":
                lines.append(f"| {r['impl']} | {r['ms']:.3g} | {r['gb_s']:.0f} | {r['frac_of_copy']:.0%} |")
        if "speedup_vs_best_baseline" in base:
            lines.append(
                f"\nkernel speed-up over the fastest baseline: {base['speedup_vs_best_baseline']:.1f}x"
            )

    mix = sections["mixer"]
    rows = mix.get("results", [])
    if rows:
        lines += ["", f"**Mixer vs SDPA** (width {mix.get('dim')}, {mix.get('heads')} heads, batch {mix.get('batch')}, "
                      f"bf16; {mix.get('sdpa_backend')}): ms / peak MiB", "",
                  "| grid | gspn fwd | sdpa fwd | gspn fwd+bwd | sdpa fwd+bwd |", "|---|---|---|---|---|"]  # fmt: skip
        for g in sorted({r["grid"] for r in rows}):
            cells = []
            for phase in ("fwd", "fwd+bwd"):
                for layer in ("gspn", "sdpa"):
                    m = [r for r in rows if (r["grid"], r["layer"], r["phase"]) == (g, layer, phase)]
                    cells.append(f"{m[0]['ms']:.3g} / {_fmt(m[0]['peak_mib'], 0)}" if m else "-")
            lines.append(f"| {g}x{g} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
        fits = mix.get("time_exponents", {})
        lines.append("\ntime ~ tokens^p: " + ", ".join(f"{k} p={_fmt(v)}" for k, v in fits.items()))

    tr = sections["train"].get("results", [])
    if tr:
        r = tr[0]
        lines += ["", f"**Training step** gspn_t ({r['params_m']:.1f}M), batch {r['batch']} at {r['image']}², "
                      f"bf16 autocast: {r['images_per_s']:.0f} img/s ({r['ms']:.1f} ms/step), "
                      f"peak {_fmt(r['peak_mib'], 0)} MiB"]  # fmt: skip
    gen = sections["gen"].get("results", [])
    if gen:
        lines += ["", "**Generation training step** (bf16 autocast, AdamW, DiT's hybrid loss)", "",
                  "| model | image | batch | ms/step | img/s | peak MiB |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in gen:
            lines.append(f"| {r['model']} ({r['params_m']:.0f}M) | {r['image']}² | {r['batch']} | {r['ms']:.1f} | "
                         f"{r['images_per_s']:.1f} | {_fmt(r['peak_mib'], 0)} |")  # fmt: skip
    sd = sections["sdxl"]
    if sd.get("skipped_reason"):
        lines += ["", f"**SD-XL UNet step**: not measured: {sd['skipped_reason']}"]
    elif sd.get("results"):
        rows = sd["results"]
        lines += ["", f"**SD-XL UNet step** (width {sd.get('channels')}, {sd.get('self_attention_layers')} "
                      f"self-attention layers, bf16, batch 1, inference forward; teacher "
                      f"{sd.get('teacher_attention')}): ms / peak MiB", "",
                  "| latent | pixels | SDPA | GSPN | SDPA / GSPN time |", "|---|---|---|---|---:|"]  # fmt: skip
        for size in sorted({r["latent"] for r in rows}):
            m = {r["variant"]: r for r in rows if r["latent"] == size}
            cells = [
                f"{m[v]['ms']:.4g} / {_fmt(m[v]['peak_mib'], 0)}" if v in m else "-" for v in ("sdpa", "gspn")
            ]
            ratio = f"{m['sdpa']['ms'] / m['gspn']['ms']:.2f}" if len(m) == 2 else "-"
            lines.append(f"| {size}² | {8 * size}² | {cells[0]} | {cells[1]} | {ratio} |")
    for r in sections["profile"].get("results", []):
        lines += ["", f"**Profile** of one training step, {r['case']} (bf16 autocast): {r['device_ms']:.1f} ms "
                      "of kernels; the top ones by self time", "", "| kernel | ms | share | calls |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for k in r["top"]:
            lines.append(
                f"| `{k['name']}` | {k['ms']:.2f} | {_fmt(k['share'] and 100 * k['share'], 1)} % | {k['calls']} |"
            )
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    return text


def parse_junit(path: Path, log: Path | None = None) -> dict:
    """Pass/fail counts from pytest's junit XML, or, when pytest was killed before writing it, from the
    progress characters of its ``-q`` log."""
    import re
    import xml.etree.ElementTree as ET

    if not path.exists():
        text = log.read_text(errors="replace") if log is not None and log.exists() else ""
        marks = "".join(re.findall(r"^([.FEsx]+)\s*(?:\[\s*\d+%\])?$", text, flags=re.M))
        failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
        summary = (f"no junit report (pytest did not finish); its log shows {marks.count('.')} passed, "
                   f"{marks.count('F') + marks.count('E')} failed, {marks.count('s')} skipped")  # fmt: skip
        return {"summary": summary, "failures": failures, "finished": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failures = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failures.append(f"{case.get('classname')}::{case.get('name')}")
    cuda_cases = sum(1 for c in root.iter("testcase") if "cuda" in (c.get("name") or ""))
    counts["cuda_cases"] = cuda_cases
    summary = (f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
               f"{counts['skipped']} skipped ({cuda_cases} CUDA-parametrised cases)")  # fmt: skip
    return {"summary": summary, "counts": counts, "failures": failures, "finished": True}


# ----------------------------------------------------------------------------------------------------
# compare: the results of one tree against others' (an A/B of two revisions on the same GPU)


def compare(out: Path, trees: list[tuple[str, Path]]) -> str:
    """Side by side, the first tree against each other: build, tests, the scan's correctness checks and
    timings (ms per case and direction, and the first tree's time over the other's: above 1 is faster),
    and the GSPN mixer's timings.  Writes ``out/compare.{json,md}`` and returns the markdown."""
    data = {}
    for name, folder in trees:
        xml, log = folder / "tests.xml", folder / "tests.log"
        data[name] = {
            "folder": str(folder),
            "build": _load_section(folder, "build"),
            "scan": _load_section(folder, "scan"),
            "mixer": _load_section(folder, "mixer"),
            "tests": parse_junit(xml, log) if xml.exists() or log.exists() else None,
        }
    (out / "compare.json").write_text(json.dumps(data, indent=1, default=str))
    names = [n for n, _ in trees]
    base = names[0]
    rehearsal = any(d[s].get("rehearsal") for d in data.values() for s in ("scan", "mixer"))
    lines = [f"# {base} against {', '.join(names[1:])}", ""]
    info = _load_section(trees[0][1], "env").get("info", {})
    lines += [
        f"- device: {info.get('gpu', 'cpu')}; torch {info.get('torch')} (CUDA {info.get('torch_cuda')})",
        "",
    ]
    if rehearsal:
        lines += ["**CPU rehearsal: tiny sizes on the CPU; none of these figures describes a GPU.**", ""]
    lines += ["| tree | build | tests | scan checks (worst rel. err) |", "|---|---|---|---|"]
    for n in names:
        d = data[n]
        build = d["build"].get("results", [])
        b = (
            ", ".join(f"{r['extension']} {'ok' if r['ok'] else 'FAILED'} {r['seconds']} s" for r in build)
            or "-"
        )
        checks = [r for r in d["scan"].get("results", []) if r.get("kind") == "check"]
        c = (f"{sum(r['ok'] for r in checks)}/{len(checks)} ok ({max(r['rel_err'] for r in checks):.1e})"
             if checks else "-")  # fmt: skip
        t = d["tests"]["summary"] if d["tests"] else "not run"
        lines.append(f"| {n} | {b} | {t} | {c} |")
    for n in names:
        for section in ("build", "scan", "mixer"):
            for e in data[n][section].get("errors", []):
                lines.append(f"- error, {n} / {section} / {e['case']}: {e['error'][:300]}")
        if data[n]["tests"]:
            for f in data[n]["tests"].get("failures", [])[:10]:
                lines.append(f"- FAILED ({n}) {f}")

    def rows(name, section, kind, key):
        return {key(r): r for r in data[name][section].get("results", []) if r.get("kind") == kind}

    others = names[1:]

    def side_by_side(title, cols, per_tree, show, keep=lambda k: True):
        """One table: a row per key of the base tree, its cell, then each other tree's cell and the base's
        time over that tree's."""
        if not per_tree[base] or not any(per_tree[n] for n in others):
            return
        head = " | ".join(f"{n} ms | {base} / {n}" for n in others)
        lines.extend(["", title, "", f"| {' | '.join(cols)} | {base} ms | {head} |",
                      "|" + "---|" * len(cols) + "---:|" + "---:|---:|" * len(others)])  # fmt: skip
        for k, r in per_tree[base].items():
            if not keep(k):
                continue
            cells = []
            for n in others:
                o = per_tree[n].get(k)
                cells += [show(o), f"{r['ms'] / o['ms']:.2f}x"] if o else ["-", "-"]
            lines.append(f"| {' | '.join(map(str, k))} | {show(r)} | " + " | ".join(cells) + " |")

    scan_key = lambda r: ("x".join(map(str, r["shape"])), r["dtype"], r["chunk"] or "global", r["phase"],  # noqa: E731
                          r["direction"])  # fmt: skip
    side_by_side("**Scan** (ms, median; fraction of the copy bandwidth in brackets)",
                 ("case", "dtype", "chunk", "phase", "dir"), {n: rows(n, "scan", "scan", scan_key) for n in names},
                 lambda r: f"{r['ms']:.3g} ({r['frac_of_copy']:.0%})")  # fmt: skip
    mix_key = lambda r: (r["layer"], f"{r['grid']}x{r['grid']}", r["phase"])  # noqa: E731
    side_by_side("**Mixer** (ms, median; peak MiB in brackets)", ("layer", "grid", "phase"),
                 {n: rows(n, "mixer", "layer", mix_key) for n in names},
                 lambda r: f"{r['ms']:.3g} ({_fmt(r['peak_mib'], 0)})", keep=lambda k: k[0] == "gspn")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    return text


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("section", choices=[*SECTIONS, "report", "compare"])
    parser.add_argument("--out", type=Path, required=True, help="folder for the section's JSON")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds this section may take")
    parser.add_argument("--rehearsal", action="store_true", help="CPU dry run with tiny sizes")
    parser.add_argument("--junit", type=Path, help="report: the test run's junit XML")
    parser.add_argument("--test-log", type=Path, help="report: the test run's log (if it has no junit XML)")
    parser.add_argument("--test-files", default="", help="report: which test files ran")
    parser.add_argument("--sections", default=None, help="report: the sections asked for (space-separated)")
    parser.add_argument("--trees", nargs="+", default=[], metavar="NAME=DIR",
                        help="compare: result folders, the first one the base")  # fmt: skip
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(4, os.cpu_count() or 1) if not args.rehearsal else 1)
    if args.section == "compare":
        trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1])) for t in args.trees]
        if len(trees) < 2 or any("=" not in t for t in args.trees):
            parser.error("compare needs --trees NAME=DIR NAME=DIR [...]")
        print(compare(args.out, trees))
        return 0
    if args.section == "report":
        tests = None
        if args.junit is not None:
            tests = parse_junit(args.junit, args.test_log)
            tests["files"] = args.test_files
        print(report(args.out, tests, None if args.sections is None else args.sections.split()))
        return 0
    rec = Record(args.out, args.section, args.budget, args.rehearsal)
    fn = globals()[f"section_{args.section}"]
    try:
        fn(args, rec)
    except Exception as exc:  # noqa: BLE001 - the section's record says what went wrong
        rec.error(args.section, exc)
        traceback.print_exc()
    rec.finish()
    print(f"[{args.section}] {rec.data['status']} in {rec.elapsed():.1f} s: {len(rec.data['results'])} rows, "
          f"{len(rec.data['skipped'])} skipped, {len(rec.data['errors'])} errors")  # fmt: skip
    return 0 if rec.data["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())

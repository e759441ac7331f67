"""What every section of the GPU check uses: its record (rewritten after each case), the device,
timing with CUDA events, peak memory, and loops over cases that stop when the section's budget is
spent and survive an out-of-memory."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import copy_fn, sync

GIB = 1024**3


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

    def out_of_time(self, case: str, reserve: float = 0.0) -> bool:
        """True, and ``case`` recorded as skipped, once the budget (less ``reserve``) is spent."""
        if self.time_left(reserve):
            return False
        self.skip(case, "section time budget spent")
        return True

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


def fmt_value(v, nd=2) -> str:
    """A float with ``nd`` decimals, None as '-', anything else as it prints."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def pick_device(rehearsal: bool) -> torch.device:
    if rehearsal:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (use --rehearsal for the CPU dry run)")
    return torch.device("cuda")


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
    fn, moved = copy_fn(device, nbytes)
    return moved / (time_ms(fn, device, reps)["ms"] * 1e-3) / 1e9


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None  # no allocator statistics on the CPU


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free_after(exc: BaseException, device: torch.device) -> None:
    """After an out-of-memory, give the cached blocks back so that the next case starts clean."""
    if is_oom(exc) and device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def recorded(rec: Record, case: str, device: torch.device):
    """Records an exception of the block as the case's error and goes on (freeing the cache after an
    out-of-memory)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - record and go on with the next case
        rec.error(case, exc)
        _free_after(exc, device)


def budgeted_cases(rec: Record, sizes, variants: dict, label, reserve: float, dead: set):
    """``(size, name, variant, case)`` for each size and variant, in that order (the variants interleaved
    per size), skipping (and recording why) a variant that ran out of memory at a smaller size and
    every case once the section's budget is spent."""
    for size in sizes:
        for name, variant in variants.items():
            case = label(name, size)
            if name in dead:
                rec.skip(case, "ran out of memory at a smaller size")
            elif not rec.out_of_time(case, reserve=reserve):
                yield size, name, variant, case


def case_failed(rec: Record, case: str, name: str, exc: BaseException, dead: set, device) -> None:
    """Out of memory: mark ``name`` dead for the larger sizes; anything else: record the error."""
    if is_oom(exc):
        dead.add(name)
        rec.skip(case, "out of memory")
        _free_after(exc, device)
    else:
        rec.error(case, exc)


def budgeted_models(rec: Record, cases, label, device: torch.device):
    """``(name, kwargs, size, batch, case, model)`` for each ``(name, kwargs, size, batch)`` of ``cases``
    while the section's budget lasts (later ones are recorded as skipped), the model built on
    ``device`` from seed 0."""
    from gspn_lightning.models import create_model

    for name, kw, size, batch in cases:
        case = label(name, size, batch)
        if rec.out_of_time(case, reserve=5.0):
            continue
        with recorded(rec, case, device):
            torch.manual_seed(0)
            model = create_model(name, **kw).to(device)
            yield name, kw, size, batch, case, model


def classification_loss(model: torch.nn.Module, batch: int, size: int, classes: int, device: torch.device):
    """Cross-entropy of ``model`` on one random batch of ``size``² RGB images, as a closure."""
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    return lambda: torch.nn.functional.cross_entropy(model(images), labels)


def diffusion_loss(model: torch.nn.Module, diffusion, batch: int, size: int, device: torch.device):
    """DiT's hybrid loss (``diffusion.training_losses``) of ``model`` on one random batch of 4-channel
    ``size``² latents and class labels of ImageNet's 1000, as a closure."""
    latents = torch.randn(batch, 4, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    return lambda: diffusion.training_losses(model, latents, labels)["loss"].mean()


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


def time_training(model: torch.nn.Module, loss_fn, batch: int, device: torch.device, reps: int) -> dict:
    """A warm-up step, then ``reps`` timed steps (:func:`adamw_step`) of ``model`` on ``loss_fn``: the
    timing, images per second, the peak MiB, whether every loss was finite, millions of parameters."""
    losses = []
    step = adamw_step(model, loss_fn, device, losses)
    step()
    peak_reset(device)
    t = time_ms(step, device, reps, warmup=1)
    return {**t, "images_per_s": batch / (t["ms"] * 1e-3), "peak_mib": peak_mib(device),
            "loss_finite": all(bool(torch.isfinite(v)) for v in losses),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}  # fmt: skip


def top_kernels(step, device: torch.device, top: int) -> tuple[float, int, list[dict]]:
    """(total device ms, kernel launches, the ``top`` kernels by self device time) of one call of
    ``step`` (on the CPU: CPU ops and their self time)."""
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
    launches = sum(e.count for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    rows = [
        {"name": e.key[:110], "ms": getattr(e, attr) / 1e3, "calls": e.count,
         "share": getattr(e, attr) / 1e3 / total if total else None}
        for e in events[:top]
    ]  # fmt: skip
    return total, launches, rows

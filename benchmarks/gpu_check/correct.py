"""correct: ``gspn_propagate_proj`` on the device, the new op (``backend="kernel"``) and the old path
(``backend="planes"``: logits materialised + the per-plane kernel), against the float64 CPU reference
(``propagate_proj_reference``), forward and the gradients of all five inputs, in float32 and bfloat16.

Error of a result = max |result - reference| / max |reference| (per tensor; the worst of the six is the
case's).  float32 passes at <= 1e-5 (issue 24's acceptance); bfloat16 passes when its error is at most
twice that of the same computation done by PyTorch in bfloat16 on the device (the reference backend in
bf16), per tensor, plus 1e-3 (the test suite's rule, tests/test_propagate.py: on small tensors
PyTorch's own bf16 error can be near zero by chance); the worst plain ratio is recorded too.  The shapes cover odd maps, 1xN and Nx1, all four directions and subsets, global and
chunked (4 and 3), a proxy of S = 8 (in registers) and S = 24 (the fallback), and channel counts that
leave a partial lane group.

Then the mixer's fused LayerNorm + GRN, ``layer_norm_grn`` (its CUDA kernels, which ``backend="auto"``
does not pick on CUDA until this check passes: ``CUDA_NORM_DEFAULT``), by the same rules against the
float64 composition of the two norms: its output and the gradients of the map and the four parameters,
in the table's "kernel" column ("planes" empty: the composition is the reference)."""

from __future__ import annotations

import torch

from benchmarks.gpu_check.harness import Record, fmt_value, pick_device, recorded

NAMES = ("y", "dx", "dproxy", "dweight", "dbias", "dmerge")
BACKENDS = ("kernel", "planes")
FP32_MAX = 1e-5
BF16_RATIO_MAX = 2.0
BF16_SLACK = 1e-3
ALL = ("t2b", "b2t", "l2r", "r2l")

# (B, C, H, W), S, directions, chunk: the GPU run's cases, most telling first (a kill keeps those)
CASES = [
    ((2, 40, 17, 23), 8, ALL, None),
    ((2, 40, 17, 23), 8, ALL, 4),
    ((1, 40, 64, 64), 8, ALL, None),
    ((2, 40, 1, 33), 8, ALL, None),
    ((2, 40, 33, 1), 8, ALL, 3),
    ((1, 24, 64, 64), 24, ALL, 3),
    ((1, 40, 128, 96), 8, ALL, None),
    ((1, 33, 128, 96), 8, ("l2r", "b2t"), 4),
    ((2, 40, 17, 23), 24, ("r2l",), None),
    ((1, 72, 64, 64), 8, ("t2b", "l2r"), 3),
]
# (B, C, H, W) of the LayerNorm + GRN cases: odd map, GSPN-DiT-like width, 1xN with a partial warp
NORM_CASES = [(2, 40, 17, 23), (2, 384, 32, 32), (1, 33, 1, 37)]
REHEARSAL_NORM_CASES = [(1, 5, 3, 7)]
NORM_NAMES = ("out", "dy", "dweight", "dbias", "dgamma", "dbeta")
REHEARSAL_CASES = [
    ((1, 5, 7, 9), 3, ALL, None),
    ((2, 5, 1, 6), 3, ("l2r", "b2t"), 3),
    ((1, 3, 6, 1), 20, ("r2l",), 4),
]


def _inputs(shape, S, K, seed: int) -> list[torch.Tensor]:
    """x, proxy, weight, bias, merge in float64 on the CPU (channels-last x and proxy, as the mixer's
    token view gives them), scaled so the gates differ."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    R = K * 6 * C
    x = torch.randn(B, H, W, C, generator=g, dtype=torch.float64).permute(0, 3, 1, 2)
    proxy = torch.randn(B, H, W, S, generator=g, dtype=torch.float64).permute(0, 3, 1, 2)
    weight = torch.randn(R, S, generator=g, dtype=torch.float64) / S**0.5
    bias = torch.randn(R, generator=g, dtype=torch.float64)
    merge = torch.rand(K, C, generator=g, dtype=torch.float64) + 0.1
    return [x, proxy, weight, bias, merge]


def _run(fn, ins, go) -> list[torch.Tensor]:
    """``fn(*leaves)`` and its gradients, as float64 CPU tensors."""
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, go.to(out), allow_unused=True, materialize_grads=True)
    return [t.detach().to("cpu", torch.float64) for t in (out, *grads)]


def _op(fn, directions, chunk, **kw):
    """``fn`` with the five tensors as its only arguments."""
    return lambda *t: fn(*t, directions, chunk, **kw)


def _norm_composed(y, weight, bias, gamma, beta, eps: float = 1e-6, grn_eps: float = 1e-6):
    """LayerNorm over the channels then GRN, in PyTorch ops of ``y``'s dtype (the op's definition)."""
    z = torch.nn.functional.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), weight, bias, eps)  # (B, H, W, C)
    g = z.norm(dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
    out = z * (1 + gamma * (g / (g.mean(dim=-1, keepdim=True) + grn_eps))) + beta
    return out.permute(0, 3, 1, 2)


def _norm_inputs(shape, seed: int) -> list[torch.Tensor]:
    """y (channels-last), weight, bias, gamma, beta in float64 on the CPU."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(B, H, W, C, generator=g, dtype=torch.float64) * 2 + 0.5).permute(0, 3, 1, 2)
    return [y] + [torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + (1.0 if i == 0 else 0.0) for i in range(4)]


def _check(rec: Record, row: dict, errors: list[float], torch_errors: list[float] | None, names) -> None:
    """``row`` with its errors and the pass rule (fp32 absolute, bf16 against PyTorch's bf16), recorded."""
    finite = all(e == e and e != float("inf") for e in errors)
    row.update(errors=dict(zip(names, errors)), max_error=max(errors), finite=finite)
    if torch_errors is None:
        row["ok"] = finite and max(errors) <= FP32_MAX
    else:
        ratios = [e / max(t, 1e-12) for e, t in zip(errors, torch_errors)]
        within = all(e <= BF16_RATIO_MAX * t + BF16_SLACK for e, t in zip(errors, torch_errors))
        row.update(torch_bf16_errors=dict(zip(names, torch_errors)), max_ratio=max(ratios), ok=finite and within)
    rec.add(**row)


def run_norm(device, cases, rec: Record) -> None:
    """The LayerNorm + GRN op's cases (see the module docstring)."""
    from gspn_lightning.ops import layer_norm_grn

    for i, shape in enumerate(cases):
        label = f"layer_norm_grn {'x'.join(map(str, shape))}"
        if rec.out_of_time(label, reserve=2.0):
            continue
        with recorded(rec, label, device):
            ins64 = _norm_inputs(shape, seed=200 + i)
            go = torch.randn(shape, generator=torch.Generator().manual_seed(300 + i), dtype=torch.float64)
            reference = _run(_norm_composed, ins64, go)
            for dtype in (torch.float32, torch.bfloat16):
                ins = [t.to(device, dtype) for t in ins64]
                torch_errors = _errors(_run(_norm_composed, ins, go), reference) if dtype == torch.bfloat16 else None
                case = f"{label} {str(dtype)[6:]} kernel"
                with recorded(rec, case, device):
                    errors = _errors(_run(layer_norm_grn, ins, go), reference)
                    row = dict(case=label, shape=list(shape), dtype=str(dtype)[6:], backend="kernel")
                    _check(rec, row, errors, torch_errors, NORM_NAMES)


def _errors(results, reference) -> list[float]:
    return [
        float((r - e).abs().max() / e.abs().max().clamp_min(1e-30)) if e.numel() else 0.0
        for r, e in zip(results, reference)
    ]


def run(args, rec: Record) -> None:
    from gspn_lightning.ops import gspn_propagate_proj, propagate_proj_reference

    device = pick_device(args.rehearsal)
    cases = REHEARSAL_CASES if args.rehearsal else CASES
    # float32 means float32 here: cuDNN's default TF32 convolutions (the old path's logit projection and
    # its gradient) would err by ~1e-3 and fail the old path for a reason that is not its kernel's
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rec.set(fp32_max=FP32_MAX, bf16_ratio_max=BF16_RATIO_MAX, bf16_slack=BF16_SLACK, tf32=False,
            error="max|a - ref| / max|ref| per tensor")  # fmt: skip
    for i, (shape, S, directions, chunk) in enumerate(cases):
        label = f"{'x'.join(map(str, shape))} S={S} {'+'.join(directions)} chunk={chunk}"
        if rec.out_of_time(label, reserve=3.0):
            continue
        with recorded(rec, label, device):
            ins64 = _inputs(shape, S, len(directions), seed=i)
            go = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
            reference = _run(_op(propagate_proj_reference, directions, chunk), ins64, go)
            for dtype in (torch.float32, torch.bfloat16):
                ins = [t.to(device, dtype) for t in ins64]
                torch_errors = None
                if dtype == torch.bfloat16:  # the same computation by PyTorch in bf16, on the device
                    torch_run = _run(_op(propagate_proj_reference, directions, chunk), ins, go)
                    torch_errors = _errors(torch_run, reference)
                for backend in BACKENDS:
                    case = f"{label} {str(dtype)[6:]} {backend}"
                    with recorded(rec, case, device):
                        fn = _op(gspn_propagate_proj, directions, chunk, backend=backend)
                        errors = _errors(_run(fn, ins, go), reference)
                        row = dict(case=label, shape=list(shape), S=S, directions=list(directions), chunk=chunk,
                                   dtype=str(dtype)[6:], backend=backend)  # fmt: skip
                        _check(rec, row, errors, torch_errors, NAMES)


    run_norm(device, REHEARSAL_NORM_CASES if args.rehearsal else NORM_CASES, rec)


def table(data: dict) -> list[str]:
    """The report's lines: per case and dtype, each backend's worst error (and bf16's worst ratio to
    PyTorch's bf16 error), pass or FAIL."""
    rows = data.get("results", [])
    if not rows:
        return []
    lines = ["", "**Correctness** of `gspn_propagate_proj` (forward and all five gradients) and of "
                 f"`layer_norm_grn` (output and five gradients) against the float64 CPU reference (worst of max|err|/max|ref|; fp32 <= {data.get('fp32_max')}, bf16 <= "
                 f"{data.get('bf16_ratio_max')}x PyTorch's own bf16 error + {data.get('bf16_slack')})", "",
             "| case | dtype | kernel (new) | planes (old) |", "|---|---|---|---|"]  # fmt: skip
    keys = []
    for r in rows:
        if (r["case"], r["dtype"]) not in keys:
            keys.append((r["case"], r["dtype"]))
    for case, dtype in keys:
        cells = []
        for backend in BACKENDS:
            m = [r for r in rows if (r["case"], r["dtype"], r["backend"]) == (case, dtype, backend)]
            if not m:
                cells.append("-")
                continue
            r = m[0]
            ratio = f" ({fmt_value(r.get('max_ratio'))}x torch)" if "max_ratio" in r else ""
            cells.append(f"{r['max_error']:.2e}{ratio} {'pass' if r['ok'] else 'FAIL'}")
        lines.append(f"| {case} | {dtype} | {cells[0]} | {cells[1]} |")
    failed = [r for r in rows if not r["ok"]]
    lines.append(f"\n{len(rows) - len(failed)}/{len(rows)} passed" + (
        "; failed: " + ", ".join(f"{r['case']} {r['dtype']} {r['backend']}" for r in failed[:10]) if failed else ""))  # fmt: skip
    return lines

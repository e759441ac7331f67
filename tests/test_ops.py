"""The GSPN scan op: reference against a per-pixel loop, kernels against the reference, the
torch.library registration, 16-bit accuracy, stability of normalised gates, and input checking."""

import ast
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gspn_lightning.ops import DIRECTIONS, _build, gspn_scan, normalize_gates, scan_reference

from .conftest import DEVICES

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 7, 4), (2, 1, 9, 6)]
CHUNKS = [None, 1, 2, 3, 100]  # 2 and 3 do not divide 5, 7 or 9; 100 is longer than any axis


def loop_scan(x, lam, wn, wm, wp, direction, chunk_size):
    """The contract of docs/design.md ("The scan op") written out pixel by pixel, independent of the reference's layout."""
    B, C, H, W = x.shape
    h = {}  # (i, j) -> (B, C) values; a dict, not in-place writes, so autograd can follow
    vertical = direction in ("t2b", "b2t")
    length = H if vertical else W
    k = chunk_size or length
    step = {"t2b": (-1, 0), "b2t": (1, 0), "l2r": (0, -1), "r2l": (0, 1)}[direction]
    order = {
        "t2b": [(i, j) for i in range(H) for j in range(W)],
        "b2t": [(i, j) for i in reversed(range(H)) for j in range(W)],
        "l2r": [(i, j) for j in range(W) for i in range(H)],
        "r2l": [(i, j) for j in reversed(range(W)) for i in range(H)],
    }[direction]
    for i, j in order:
        s = i if vertical else j
        prev_s = s + (step[0] if vertical else step[1])
        val = lam[..., i, j] * x[..., i, j]
        if 0 <= prev_s < length and prev_s // k == s // k:  # same group: recurrence term
            for off, w in ((-1, wn), (0, wm), (1, wp)):
                pi, pj = (prev_s, j + off) if vertical else (i + off, prev_s)
                if 0 <= pi < H and 0 <= pj < W:
                    val = val + w[..., i, j] * h[pi, pj]
        h[i, j] = val
    return torch.stack([torch.stack([h[i, j] for j in range(W)], -1) for i in range(H)], -2)


def rand_inputs(shape, dtype=torch.float64, device="cpu", requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=g, dtype=torch.float64)
        .to(device=device, dtype=dtype)
        .requires_grad_(requires_grad)
        for _ in range(5)
    ]


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [None, 2, 3])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 5, 7), (1, 1, 7, 4)])
def test_reference_matches_pixel_loop(direction, chunk, shape):
    ins = rand_inputs(shape, requires_grad=True)
    ref = scan_reference(*ins, direction=direction, chunk_size=chunk)
    loop = loop_scan(*ins, direction, chunk)
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(ref)
    for a, b in zip(grads(ref, ins, go), grads(loop, ins, go)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(device, direction, chunk, shape):
    ins = rand_inputs(shape, device=device, requires_grad=True)
    out = gspn_scan(*ins, direction=direction, chunk_size=chunk, backend="kernel")
    ref = scan_reference(*ins, direction=direction, chunk_size=chunk)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(ref)
    for name, a, b in zip(("x", "lam", "w_neg", "w_mid", "w_pos"), grads(out, ins, go), grads(ref, ins, go)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_groups_are_absolute(device, direction):
    """Both scan orders cut the axis at the same absolute positions: a chunked scan equals scans of
    the pieces, whatever the direction, also when the length is not divisible by k."""
    shape, k = (1, 2, 7, 5), 3
    ins = rand_inputs(shape, device=device)
    out = gspn_scan(*ins, direction=direction, chunk_size=k, backend="kernel")
    dim = -2 if direction in ("t2b", "b2t") else -1
    pieces = [
        gspn_scan(
            *[t.narrow(dim, s, min(k, t.shape[dim] - s)) for t in ins], direction=direction, backend="kernel"
        )
        for s in range(0, shape[dim], k)
    ]
    torch.testing.assert_close(out, torch.cat(pieces, dim), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_strided_views(device, direction):
    base = rand_inputs((2, 3, 8, 10), device=device, requires_grad=True)
    views = [t.transpose(-1, -2)[:, ::2, 1:7, ::2] for t in base]  # non-contiguous, odd strides
    assert not views[0].is_contiguous()
    out = gspn_scan(*views, direction=direction, chunk_size=2, backend="kernel")
    ref = scan_reference(*[v.contiguous() for v in views], direction=direction, chunk_size=2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out).transpose(-1, -2).contiguous().transpose(-1, -2)  # strided incoming grad
    go_copy = go.clone()
    g_kernel = grads(out, base, go)
    g_ref = grads(scan_reference(*views, direction=direction, chunk_size=2), base, go)
    for a, b in zip(g_kernel, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(go, go_copy), "the backward must not modify the incoming gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck_float64(device, direction, chunk):
    ins = rand_inputs((1, 2, 5, 4), device=device, requires_grad=True)
    f = lambda *t: gspn_scan(*t, direction=direction, chunk_size=chunk, backend="kernel")  # noqa: E731
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_low_precision_error_bound(device, dtype, direction):
    """The 16-bit kernel errs at most about twice as much as the reference run in that dtype, both
    against a float64 result (FlashAttention's rule), forward and all five gradients."""
    shape = (2, 4, 33, 19)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    lam = torch.rand(shape, generator=g, dtype=torch.float64)
    gates = normalize_gates(
        *(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)), direction
    )
    go = torch.randn(shape, generator=g, dtype=torch.float64)
    exact_in = [t.to(device).requires_grad_() for t in (x, lam, *gates)]
    exact = gspn_scan(*exact_in, direction=direction, chunk_size=None, backend="reference")
    exact_g = grads(exact, exact_in, go.to(device))

    def run(backend):
        ins = [t.to(device, dtype).requires_grad_() for t in (x, lam, *gates)]
        out = gspn_scan(*ins, direction=direction, backend=backend)
        assert out.dtype == dtype
        return [out, *grads(out, ins, go.to(device, dtype))]

    for name, k, r, e in zip(
        ("h", "x", "lam", "w_neg", "w_mid", "w_pos"), run("kernel"), run("reference"), [exact, *exact_g]
    ):
        err_k = (k.double() - e).abs().max().item()
        err_r = (r.double() - e).abs().max().item()
        scale = e.abs().max().item()
        assert err_k <= 2 * err_r + 1e-3 * scale, f"{name}: kernel {err_k:.3g} vs reference {err_r:.3g}"


def test_normalize_gates_row_stochastic():
    shape = (2, 3, 6, 5)
    raw = [torch.randn(shape) * 4 for _ in range(3)]
    for direction in DIRECTIONS:
        wn, wm, wp = normalize_gates(*raw, direction)
        assert all((w >= 0).all() for w in (wn, wm, wp))
        torch.testing.assert_close(wn + wm + wp, torch.ones(shape), rtol=0, atol=1e-6)
        if direction in ("t2b", "b2t"):  # lines run along W
            assert (wn[..., :, 0] == 0).all() and (wp[..., :, -1] == 0).all()
            assert (wn[..., :, 1:] > 0).all() and (wp[..., :, :-1] > 0).all()
        else:  # lines run along H
            assert (wn[..., 0, :] == 0).all() and (wp[..., -1, :] == 0).all()
            assert (wn[..., 1:, :] > 0).all() and (wp[..., :-1, :] > 0).all()
    for dtype in (torch.float16, torch.bfloat16):
        ws = normalize_gates(*(r.to(dtype) for r in raw), "t2b")
        assert all(w.dtype == dtype for w in ws)
        torch.testing.assert_close(sum(w.float() for w in ws), torch.ones(shape), rtol=0, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["t2b", "r2l"])
def test_long_scan_stays_bounded(device, direction):
    """Row-stochastic gates: a 16,384-line bfloat16 scan stays finite and |h| <= length * max|lam x|."""
    length = 16384
    shape = (1, 2, length, 6) if direction == "t2b" else (1, 2, 6, length)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).to(device, torch.bfloat16)
    lam = torch.rand(shape, generator=g).to(device, torch.bfloat16)
    gates = normalize_gates(
        *(torch.randn(shape, generator=g).to(device, torch.bfloat16) * 3 for _ in range(3)), direction
    )
    h = gspn_scan(x, lam, *gates, direction=direction, backend="kernel")
    assert torch.isfinite(h).all()
    bound = length * (lam.float() * x.float()).abs().max().item()
    assert h.float().abs().max().item() <= bound
    # and propagation is really happening far down the scan (not a trivially zero output)
    assert h.float().abs().max().item() > (lam.float() * x.float()).abs().max().item() * 0.5


def test_a_failed_build_is_tried_once_and_explained(monkeypatch):
    """A build that fails leaves the reference in charge: load_cpu/load_cuda say False, keep the reason
    for build_error and do not retry in this process."""
    calls = []

    def failing_load(name, sources, cuda, verbose):
        calls.append(name)
        raise RuntimeError(f"no compiler for {name}")

    monkeypatch.setattr(_build, "_STATE", _build._State())
    monkeypatch.setattr(_build, "_load", failing_load)
    assert not _build.load_cpu() and not _build.load_cpu()
    assert calls == ["gspn_lightning_cpu"]
    assert _build.build_error("cpu") == "RuntimeError: no compiler for gspn_lightning_cpu"
    assert not _build.load_cuda(force=True)
    assert "the CPU extension" in _build.build_error("cuda") and calls == ["gspn_lightning_cpu"]
    monkeypatch.setattr(_build, "_STATE", _build._State(cpu=True))
    assert not _build.load_cuda(force=True) and not _build.load_cuda(force=True)
    assert calls == ["gspn_lightning_cpu", "gspn_lightning_cuda"]
    assert _build.build_error("cuda") == "RuntimeError: no compiler for gspn_lightning_cuda"


def test_opcheck_and_registration():
    assert _build.load_cpu(), _build.build_error("cpu")
    op = torch.ops.gspn_lightning.scan_fwd.default
    for direction, chunk in itertools.product(DIRECTIONS, [0, 2]):
        ins = rand_inputs((2, 3, 5, 4), dtype=torch.float32, requires_grad=True)
        torch.library.opcheck(op, (*ins, direction, chunk))


def test_torch_compile_fullgraph():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 15, 1)

        def forward(self, x):
            x_, lam, gn, gm, gp = self.proj(x).chunk(5, dim=1)
            out = 0
            for d in DIRECTIONS:
                out = out + gspn_scan(x_, torch.sigmoid(lam), *normalize_gates(gn, gm, gp, d), d, 2, "kernel")
            return out

    torch.manual_seed(0)
    m = Tiny()
    x = torch.randn(2, 3, 7, 5)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert m.proj.weight.grad is not None and torch.isfinite(m.proj.weight.grad).all()


def _bad_input_cases():
    good = rand_inputs((1, 2, 3, 4), dtype=torch.float32)
    cases = []

    def with_arg(i, t):
        args = list(good)
        args[i] = t
        return args

    cases.append((with_arg(2, torch.randn(1, 2, 3, 5)), {}, ValueError, "w_neg"))
    cases.append((with_arg(1, torch.randn(1, 2, 3, 4, dtype=torch.float64)), {}, TypeError, "lam"))
    cases.append((with_arg(4, torch.ones(1, 2, 3, 4, dtype=torch.int64)), {}, TypeError, "w_pos"))
    cases.append((with_arg(0, torch.ones(1, 2, 3, 4, dtype=torch.int32)), {}, TypeError, "x"))
    cases.append((with_arg(3, torch.randn(1, 2, 3, 4, device="meta")), {}, ValueError, "w_mid"))
    cases.append((with_arg(0, [[1.0]]), {}, TypeError, "x"))
    cases.append(([t[0] for t in good], {}, ValueError, "4-D"))
    cases.append((good, {"direction": "up"}, ValueError, "direction"))
    cases.append((good, {"chunk_size": 0}, ValueError, "chunk_size"))
    cases.append((good, {"chunk_size": -3}, ValueError, "chunk_size"))
    cases.append((good, {"chunk_size": 2.0}, TypeError, "chunk_size"))
    cases.append((good, {"backend": "fast"}, ValueError, "backend"))
    return cases


@pytest.mark.parametrize("case", range(len(_bad_input_cases())))
def test_bad_input_raises_clear_error(case):
    args, kwargs, exc, word = _bad_input_cases()[case]
    with pytest.raises(exc, match=word):
        gspn_scan(*args, **kwargs)


def test_normalize_gates_bad_input():
    good = [torch.randn(1, 1, 2, 3) for _ in range(3)]
    with pytest.raises(ValueError, match="direction"):
        normalize_gates(*good, "diagonal")
    with pytest.raises(ValueError, match="g_pos"):
        normalize_gates(good[0], good[1], torch.randn(1, 1, 3, 3), "t2b")
    with pytest.raises(TypeError, match="g_mid"):
        normalize_gates(good[0], torch.ones(1, 1, 2, 3, dtype=torch.long), good[2], "t2b")


def _run_python(code, env_extra, timeout=600):
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_fallback_without_compiler(tmp_path):
    """No C++ compiler: the package imports, falls back to the reference, and warns exactly once."""
    code = """
        import warnings, torch
        from gspn_lightning.ops import gspn_scan, scan_reference
        ins = [torch.randn(1, 2, 4, 3) for _ in range(5)]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = gspn_scan(*ins, direction="l2r")
            b = gspn_scan(*ins, direction="t2b")
        msgs = [str(x.message) for x in w if "GSPN" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert torch.equal(a, scan_reference(*ins, direction="l2r"))
        assert torch.equal(b, scan_reference(*ins, direction="t2b"))
        try:
            gspn_scan(*ins, backend="kernel")
        except RuntimeError as e:
            assert "unavailable" in str(e)
        else:
            raise AssertionError("backend='kernel' must fail loudly without a kernel")
        print("FALLBACK-OK")
    """
    r = _run_python(
        code, {"GSPN_EXTENSIONS_DIR": str(tmp_path / "cache"), "CXX": str(tmp_path / "no-such-c++")}
    )
    assert "FALLBACK-OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.build
def test_concurrent_first_builds_share_one_cache(tmp_path):
    """Two processes starting together on an empty cache (the ranks of a DDP job) both end up with a
    working kernel, one build, and a later process loads it without building.

    The build is for an instruction set below the machine's own (``GSPN_CPU_ISA``: avx2 on an AVX-512
    machine, else the baseline), so the kernels' narrower vector paths, which the rest of the suite
    does not reach on such a machine, are checked against the references here: the scan and the fused
    op with the gate projection (forward and gradients, float32 and float64, a chunked odd shape)."""
    isa = "avx2" if _build.cpu_isa() == "avx512" else "base"
    code = """
        import os, torch
        from gspn_lightning.ops import gspn_scan, scan_reference, _build
        from gspn_lightning.ops import DIRECTIONS, gspn_propagate_proj, propagate_proj_reference
        assert _build.cpu_isa() == os.environ["GSPN_CPU_ISA"]
        ins = [torch.randn(2, 2, 6, 5, dtype=torch.float64) for _ in range(5)]
        out = gspn_scan(*ins, direction="b2t", chunk_size=2, backend="kernel")
        torch.testing.assert_close(out, scan_reference(*ins, direction="b2t", chunk_size=2))
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
            g = torch.Generator().manual_seed(0)
            B, C, H, W, S = 2, 3, 19, 21, 4
            shapes = [(B, C, H, W), (B, S, H, W), (4 * 6 * C, S), (4 * 6 * C,), (4, C)]
            pin = [(torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
                   for s in shapes]
            out = gspn_propagate_proj(*pin, DIRECTIONS, 5, backend="kernel")
            ref = propagate_proj_reference(*pin, DIRECTIONS, 5)
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
            go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
            for a, b in zip(torch.autograd.grad(out, pin, go), torch.autograd.grad(ref, pin, go)):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        print("KERNEL-OK")
    """
    env = dict(os.environ, GSPN_EXTENSIONS_DIR=str(tmp_path / "cache"), GSPN_VERBOSE_BUILD="", GSPN_CPU_ISA=isa)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for out, err in outs:
        assert "KERNEL-OK" in out, out + err
    builds = list((tmp_path / "cache").glob("gspn_lightning_cpu-*/DONE"))
    assert len(builds) == 1
    r = _run_python(
        code,
        {"GSPN_EXTENSIONS_DIR": str(tmp_path / "cache"), "CXX": str(tmp_path / "no-such-c++"), "GSPN_CPU_ISA": isa},
    )
    assert "KERNEL-OK" in r.stdout, r.stdout + r.stderr  # loaded from the cache: no compiler needed


@pytest.mark.skipif(
    _build.find_cuda_home() is None, reason="no CUDA toolkit (nvcc) to build the CUDA kernels with"
)
def test_cuda_extension_builds_and_registers():
    """CI compiles and links the CUDA kernels (no GPU to run them): the CUDA dispatch key is filled."""
    assert _build.load_cuda(force=True), _build.build_error("cuda")
    for op in ("scan_fwd", "scan_bwd", "propagate_fwd", "propagate_bwd", "propagate_proj_fwd", "propagate_proj_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gspn_lightning::{op}", "CUDA"), op


# ---------------------------------------------------------------------------------- faults (issue 7)


def test_normalize_gates_stable_for_very_negative_logits():
    """All logits of a pixel below ~-89: the weights still sum to 1 (they were 0/0 = NaN)."""
    shape = (1, 2, 4, 5)
    for dtype, low in ((torch.float32, -120.0), (torch.float64, -800.0), (torch.bfloat16, -120.0)):
        raw = [torch.full(shape, low, dtype=dtype) + torch.randn(shape).to(dtype) for _ in range(3)]
        for direction in DIRECTIONS:
            ws = normalize_gates(*raw, direction)
            total = sum(w.double() for w in ws)
            assert all(torch.isfinite(w).all() and (w >= 0).all() for w in ws), (dtype, direction)
            torch.testing.assert_close(total, torch.ones(shape, dtype=torch.float64), rtol=0, atol=2e-2)
    # the stable branch equals the limit sigmoid(g_k)/sum ~ softmax(g) of the valid taps
    g = [torch.full((1, 1, 1, 3), v, dtype=torch.float64) for v in (-1000.0, -1001.0, -1002.0)]
    wn, wm, wp = normalize_gates(*g, "t2b")
    e = torch.e
    expect_mid = torch.tensor([1 / (1 + 1 / e), 1 / (e + 1 + 1 / e), 1 / (e + 1)], dtype=torch.float64)
    torch.testing.assert_close(wm[0, 0, 0], expect_mid)
    # gradients through the stable branch are finite
    raw = [torch.full(shape, -200.0, requires_grad=True) for _ in range(3)]
    (normalize_gates(*raw, "l2r")[1] * torch.randn(shape)).sum().backward()
    assert all(torch.isfinite(r.grad).all() for r in raw)


def test_normalize_gates_unchanged_in_normal_range():
    """Outside the underflow region the result is the plain ratio, bit for bit."""
    shape = (2, 3, 6, 5)
    raw = [torch.randn(shape) * 8 for _ in range(3)]
    raw[0][0, 0, 0, 0] = -500.0  # one pixel in the stable branch must not change the others
    raw[1][0, 0, 0, 0] = -500.0
    raw[2][0, 0, 0, 0] = -500.0
    ws = normalize_gates(*raw, "t2b")
    has_neg = (torch.arange(5) > 0).float()
    has_pos = (torch.arange(5) < 4).float()
    s = [torch.sigmoid(raw[0]) * has_neg, torch.sigmoid(raw[1]), torch.sigmoid(raw[2]) * has_pos]
    total = s[0] + s[1] + s[2]
    for w, sk in zip(ws, s):
        plain = sk / total
        mask = torch.ones(shape, dtype=torch.bool)
        mask[0, 0, 0, 0] = False
        assert torch.equal(w[mask], plain[mask])
    assert torch.isfinite(ws[1][0, 0, 0, 0]) and abs(sum(w[0, 0, 0, 0] for w in ws).item() - 1) < 1e-6


def test_double_backward_through_kernel_is_refused():
    assert _build.load_cpu(), _build.build_error("cpu")
    ins = rand_inputs((1, 2, 5, 4), dtype=torch.float64, requires_grad=True)
    h = gspn_scan(*ins, direction="t2b", backend="kernel")
    grads = torch.autograd.grad((h**2).sum(), ins, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*reference"):
        torch.autograd.grad(sum(g.sum() for g in grads), ins)
    # the reference backend has true second derivatives
    ref_ins = [t.detach().clone().requires_grad_(True) for t in ins]
    torch.autograd.gradgradcheck(lambda *t: scan_reference(*t, "t2b", None), ref_ins, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_huge_chunk_size_is_the_global_scan(backend):
    """k >= the scan length is the global variant, however large (k beyond int64 used to fail)."""
    ins = rand_inputs((1, 2, 5, 4), dtype=torch.float32)
    glob = gspn_scan(*ins, direction="l2r", backend=backend)
    for k in (4, 2**63, 10**30):
        torch.testing.assert_close(gspn_scan(*ins, direction="l2r", chunk_size=k, backend=backend), glob)


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
@pytest.mark.parametrize("chunk", [None, 8, 5])
@pytest.mark.parametrize("shape", [(2, 3, 21, 37), (1, 2, 75, 37)])
def test_column_tiles_float32(direction, chunk, shape):
    """Column scans long enough for whole 16-line tiles and 8-row blocks (the CPU kernel moves those
    through registers), with partial tiles and rows left over: float32 kernel against reference.  The
    taller plane has more rows than the gathers' prefetch distance (kAhead), so that path runs too."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    lam = torch.rand(shape, generator=g)
    gates = normalize_gates(*(torch.randn(shape, generator=g) * 2 for _ in range(3)), direction)
    ins = [t.clone().requires_grad_() for t in (x, lam, *gates)]
    out = gspn_scan(*ins, direction=direction, chunk_size=chunk, backend="kernel")
    ref = scan_reference(*ins, direction=direction, chunk_size=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    go = torch.randn(shape, generator=g)
    for a, b in zip(grads(out, ins, go), grads(ref, ins, go)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["t2b", "b2t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [1, 2, 16, 17, 18, 37])
def test_row_lines_walked_backwards(direction, dtype, width):
    """Row scans whose lines the CPU kernel walks from their end in 16-element blocks (b2t's forward,
    t2b's backward), with one, a whole and a partial block and the two end positions: forward and all
    gradients against the reference, global and chunked."""
    g = torch.Generator().manual_seed(4)
    shape = (2, 3, 9, width)
    x = torch.randn(shape, generator=g, dtype=dtype)
    lam = torch.rand(shape, generator=g, dtype=dtype)
    gates = normalize_gates(*(torch.randn(shape, generator=g, dtype=dtype) * 2 for _ in range(3)), direction)
    ins = [t.clone().requires_grad_() for t in (x, lam, *gates)]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for chunk in (None, 4):
        out = gspn_scan(*ins, direction=direction, chunk_size=chunk, backend="kernel")
        ref = scan_reference(*ins, direction=direction, chunk_size=chunk)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        go = torch.randn(shape, generator=g, dtype=dtype)
        for a, b in zip(grads(out, ins, go), grads(ref, ins, go)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_a_build_leaves_the_cache_key_flags_alone(tmp_path, monkeypatch):
    """torch's ``cpp_extension.load`` appends to the flag lists it is given; the builder must hand it
    copies, since its own lists are part of every later build's cache key (a CPU build once changed
    the CUDA build's key in the same process, so CI's tests rebuilt what its set-up had just built)."""
    from torch.utils import cpp_extension

    def fake_load(**kw):
        for key in ("extra_cflags", "extra_cuda_cflags", "extra_ldflags"):
            kw[key].append("-DFAKE")
        raise RuntimeError("fake build stops here")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("GSPN_EXTENSIONS_DIR", str(tmp_path))
    lists = (_build._CPU_CFLAGS, _build._CPU_LDFLAGS, _build._CUDA_CFLAGS, _build._CUDA_NVCC_FLAGS)
    before = [list(x) for x in lists]
    builds = [("gspn_lightning_cpu", _build._CPU_SOURCES, False)]
    if _build.find_cuda_home() is not None:
        builds.append(("gspn_lightning_cuda", _build._CUDA_SOURCES, True))
    for name, sources, cuda in builds:
        with pytest.raises(RuntimeError, match="fake build"):
            _build._load(name, sources, cuda=cuda, verbose=False)
    assert [list(x) for x in lists] == before


OPS_DIR = Path(__file__).resolve().parents[1] / "gspn_lightning" / "ops"
OPS_MODULES = sorted(p.stem for p in OPS_DIR.glob("*.py") if p.stem != "__init__")


def _ops_imports(module: str) -> list[tuple[str, bool]]:
    """(imported ops module, whether the import is inside a function) for every import of ``module``
    that targets the ops package; ``"__init__"`` stands for the package itself."""
    tree = ast.parse((OPS_DIR / f"{module}.py").read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module
            elif node.level == 0 and (node.module or "").startswith("gspn_lightning.ops"):
                base = node.module[len("gspn_lightning.ops") + 1 :] or None
            else:
                continue
            if base is None:  # from . import a, b: submodules, or names of the package's __init__
                targets = [a.name if a.name in OPS_MODULES else "__init__" for a in node.names]
            else:
                targets = [base.split(".")[0]]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[2] if a.name.count(".") >= 2 else "__init__"
                       for a in node.names if a.name.startswith("gspn_lightning.ops")]  # fmt: skip
        else:
            continue
        found += [(t, id(node) in local) for t in targets]
    return found


def test_ops_modules_import_each_other_without_a_cycle():
    """Inside gspn_lightning/ops the imports form a DAG: no module imports the package's __init__ (which
    only re-exports), and no import of an ops module hides in a function (where a cycle would only
    show at call time)."""
    graph = {}
    for module in OPS_MODULES:
        imports = _ops_imports(module)
        assert all(not inside for _, inside in imports), f"{module}: function-local ops import {imports}"
        assert all(t != "__init__" for t, _ in imports), f"{module} imports the package __init__: {imports}"
        graph[module] = {t for t, _ in imports}
    assert graph["propagate"] >= {"scan", "_backend", "_checks"}  # the parser finds real edges
    done: set[str] = set()

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        if module not in done:
            for t in sorted(graph[module]):
                visit(t, [*path, module])
            done.add(module)

    for module in OPS_MODULES:
        visit(module, [])


def test_each_ops_module_imports_first_in_a_fresh_interpreter():
    """Whichever ops module a process imports first (then the rest, forwards or backwards), all import
    and the package exports its API."""
    code = f"""
        import importlib, sys
        modules = {OPS_MODULES!r}
        for first in modules:
            for rest in (modules, modules[::-1]):
                for name in [n for n in sys.modules if n.startswith("gspn_lightning")]:
                    del sys.modules[name]
                for m in [first, *rest]:
                    importlib.import_module("gspn_lightning.ops." + m)
                ops = sys.modules["gspn_lightning.ops"]
                assert all(hasattr(ops, n) for n in ops.__all__), first
        print("IMPORTS-OK", len(modules))
    """
    r = _run_python(code, {}, timeout=300)
    assert f"IMPORTS-OK {len(OPS_MODULES)}" in r.stdout, r.stdout + r.stderr


def test_ops_package_keeps_its_public_names():
    import gspn_lightning.ops as ops

    names = {
        "DIRECTIONS", "GATE_FIELDS", "gspn_propagate", "gspn_propagate_proj", "gspn_scan", "kernel_available",
        "normalize_gates", "project_gates", "propagate_proj_reference", "propagate_reference",
        "scan_geometry", "scan_reference",
    }  # fmt: skip
    assert names <= set(ops.__all__)
    body = ast.parse((OPS_DIR / "__init__.py").read_text()).body
    kinds = {type(n).__name__ for n in body[1:]}  # after the docstring: imports and __all__ only
    assert kinds <= {"ImportFrom", "Assign"}, kinds
    assert all(n.targets[0].id == "__all__" for n in body if isinstance(n, ast.Assign))
    assert all(callable(getattr(ops, n)) or n.isupper() for n in names)
    assert ops.gspn_scan.__module__ == "gspn_lightning.ops.scan"

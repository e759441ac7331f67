"""The CUDA kernels of csrc/cuda executed on the CPU (tests/cuda_emu: one host thread per CUDA thread,
a barrier for ``__syncthreads``, emulated warp collectives), against the float64 reference.

The scan and the per-plane fused op, forward and backward, float32 and float64, every direction,
global and chunked, staged and in-place (the fused op), on small odd shapes chosen to reach every
launch path of the kernels: blocks of several warps and of several lines or planes, partial blocks,
threads striding over lines longer than a block, and the global workspaces for lines too long for
shared memory (:func:`test_the_cases_reach_every_launch_path` checks that they do).  The channels-last
``propagate_proj`` kernels (``gspn_lanes_kernels.h``) forward and backward in float64, float32 and
bfloat16 against the float64 reference and the CPU kernel, with their fallback for large proxies,
channels-last outputs and every lane-group width and run layout
(:func:`test_lanes_cases_reach_every_launch_path`).  Then the emulation itself: the
warp collectives, shared memory and atomics it offers, the errors it reports, and (slow) the kernels
under ThreadSanitizer, which finds a missing barrier whatever the threads' scheduling.

The first test to run builds the emulation library (about half a minute on a loaded 2-core machine,
cached like the kernels' builds, keyed by a hash of its sources and the kernel headers).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gspn_lightning.ops import (
    DIRECTIONS,
    GATE_FIELDS,
    _build,
    attention_reference,
    normalize_gates,
    propagate_proj_reference,
    propagate_reference,
    scan_reference,
)

from . import cuda_emu

DTYPES = [torch.float32, torch.float64]
# against the float64 reference, a few times the largest error seen (float32: its rounding over the
# recurrence and, in the fused op, the gate normalisation)
SCAN_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}
PROPAGATE_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# (B, C, H, W): a pixel; odd non-square maps; lines longer than a warp (33); several lines of one
# block (the scan) or several planes of one block (the staged fused op), with a partial last block.
SCAN_SHAPES = [(1, 1, 1, 1), (1, 2, 3, 5), (2, 1, 7, 2), (1, 2, 5, 33), (2, 3, 4, 6)]
PROPAGATE_SHAPES = [(1, 1, 1, 1), (1, 2, 3, 5), (2, 1, 7, 2), (1, 1, 5, 33), (2, 3, 4, 4), (2, 5, 5, 33)]
# lines long enough for blocks of 1024 threads striding over them (1100), and for the line buffers
# to move from shared memory into the global workspace (scan: 6150 float32 / 3100 float64 positions;
# fused op: 1600 / 3100)
LONG_SCANS = [
    ((1, 1, 2, 1100), torch.float32),
    ((1, 1, 2, 6150), torch.float32),
    ((1, 1, 3, 3100), torch.float64),
]
LONG_PROPAGATES = [((1, 1, 2, 1600), torch.float32), ((1, 1, 2, 3100), torch.float64)]


@pytest.fixture(scope="module")
def emu():
    cuda_emu.load()
    return torch.ops.gspn_cuda_emu


def _id(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return None


def reference_grads(ref, inputs, grad):
    """The float64 reference's gradients (zeros for inputs it does not read, e.g. taps of a pixel)."""
    return torch.autograd.grad(ref, inputs, grad.double(), allow_unused=True, materialize_grads=True)


def scan_inputs(shape, dtype, direction, seed=0):
    """x, sigmoid-range lam and normalised taps (the values a mixer feeds the scan)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    lam = torch.rand(shape, generator=g, dtype=torch.float64)
    taps = normalize_gates(
        *(torch.randn(shape, generator=g, dtype=torch.float64) * 2 for _ in range(3)), direction
    )
    grad_h = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, lam, *taps)], grad_h.to(dtype)


def check_scan(emu, shape, dtype, direction, chunk):
    ins, grad_h = scan_inputs(shape, dtype, direction)
    h = emu.scan_fwd(*ins, direction, chunk or 0)
    ref_ins = [t.double().requires_grad_() for t in ins]
    ref = scan_reference(*ref_ins, direction=direction, chunk_size=chunk)
    assert h.dtype == dtype and h.shape == shape
    torch.testing.assert_close(h, ref.detach().to(dtype), **SCAN_TOL[dtype])
    grads = emu.scan_bwd(grad_h, *ins, h, direction, chunk or 0)
    ref_grads = reference_grads(ref, ref_ins, grad_h)
    for name, a, b in zip(("x", "lam", "w_neg", "w_mid", "w_pos"), grads, ref_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), **SCAN_TOL[dtype], msg=lambda m, n=name: f"grad {n}: {m}")


def propagate_inputs(shape, dtype, directions, seed=0):
    """x, raw gate logits spread wide (taps that differ a lot), merge weights and dL/dy."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    gates = torch.randn(B, len(directions), len(GATE_FIELDS), C, H, W, generator=g, dtype=torch.float64) * 2
    merge = torch.rand(len(directions), C, generator=g, dtype=torch.float64) + 0.1
    grad_y = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, gates, merge)], grad_y.to(dtype)


def check_propagate(emu, shape, dtype, directions, chunk, staging):
    ins, grad_y = propagate_inputs(shape, dtype, directions)
    y = emu.propagate_fwd(*ins, list(directions), chunk or 0, staging)
    ref_ins = [t.double().requires_grad_() for t in ins]
    ref = propagate_reference(*ref_ins, directions, chunk)
    assert y.dtype == dtype and y.shape == shape
    torch.testing.assert_close(y, ref.detach().to(dtype), **PROPAGATE_TOL[dtype])
    grads = emu.propagate_bwd(grad_y, *ins, list(directions), chunk or 0, staging)
    ref_grads = reference_grads(ref, ref_ins, grad_y)
    for name, a, b in zip(("x", "gates", "merge"), grads, ref_grads):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(
            a, b.to(dtype), **PROPAGATE_TOL[dtype], msg=lambda m, n=name: f"grad {n}: {m}"
        )


# ---- the scan (csrc/cuda/gspn_scan_kernels.h) ----


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=_id)
def test_scan_kernels_match_reference(emu, shape, chunk, direction, dtype):
    check_scan(emu, shape, dtype, direction, chunk)


@pytest.mark.parametrize("shape,dtype", LONG_SCANS, ids=_id)
@pytest.mark.parametrize("direction", ["t2b", "b2t"])
def test_scan_kernels_long_lines(emu, shape, dtype, direction):
    check_scan(emu, shape, dtype, direction, None)


# ---- the fused propagation (csrc/cuda/gspn_propagate_kernels.h) ----


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("staging", [True, False], ids=["staged", "in_place"])
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("shape", PROPAGATE_SHAPES, ids=_id)
def test_propagate_kernels_match_reference(emu, shape, chunk, staging, dtype):
    check_propagate(emu, shape, dtype, DIRECTIONS, chunk, staging)


@pytest.mark.parametrize("staging", [True, False], ids=["staged", "in_place"])
@pytest.mark.parametrize("directions", [("r2l",), ("t2b", "l2r"), ("b2t", "l2r", "r2l")], ids="-".join)
def test_propagate_kernels_direction_subsets(emu, directions, staging):
    check_propagate(emu, (2, 2, 5, 7), torch.float64, directions, 3, staging)


@pytest.mark.parametrize("shape,dtype", LONG_PROPAGATES, ids=_id)
def test_propagate_kernels_long_lines(emu, shape, dtype):
    check_propagate(emu, shape, dtype, ("t2b", "b2t"), None, True)


def test_the_cases_reach_every_launch_path(emu):
    """The shapes above reach what the kernels do differently (so a change of the launch plans that
    leaves a path untested fails here): the plans are the launchers' own (csrc/cuda/gspn_cuda_plan.h)."""
    scan = []  # (line length, (lines, threads, blocks, shared bytes, global workspace))
    cases = [(s, d, DIRECTIONS) for s in SCAN_SHAPES for d in DTYPES] + [
        (s, d, ("t2b",)) for s, d in LONG_SCANS
    ]
    for shape, dtype, dirs in cases:
        x = torch.zeros(shape, dtype=dtype)
        for d in dirs:
            line = shape[3] if d in ("t2b", "b2t") else shape[2]
            scan += [(line, emu.scan_plan(x, d, c)) for c in (0, 2)]
    assert any(p[1] > 32 and p[0] > 1 for _, p in scan), "a scan block of several warps and lines"
    assert any(p[1] < p[0] * m for m, p in scan), "scan threads striding over a line"
    assert any(p[2] > 1 for _, p in scan), "several scan blocks"
    assert any(p[4] for _, p in scan), "the global workspace"

    prop = []  # (staged, planes per block, threads, blocks, shared bytes, global workspace, 16-byte copies)
    cases = [(s, d, DIRECTIONS, st) for s in PROPAGATE_SHAPES for d in DTYPES for st in (True, False)]
    cases += [(s, d, ("t2b", "b2t"), True) for s, d in LONG_PROPAGATES]
    for shape, dtype, dirs, staging in cases:
        ins, _ = propagate_inputs(shape, dtype, dirs)
        prop += [(shape, emu.propagate_plan(*ins, list(dirs), 0, bwd, staging)) for bwd in (False, True)]
    staged = [p for _, p in prop if p[0]]
    in_place = [p for _, p in prop if not p[0]]
    assert any(p[1] > 1 and p[2] > 32 for p in staged), "staged blocks of several planes and warps"
    assert any(p[1] > 1 and p[3] > 1 for p in staged), "several staged blocks"
    assert any(p[6] for p in staged) and any(not p[6] for p in staged), "16-byte and element copies"
    assert any(p[2] > 32 for p in in_place), "in-place blocks of several warps"
    assert any(p[5] for p in in_place), "the global workspace"
    assert any(p[2] < max(s[2:]) for s, p in prop if not p[0]), "in-place threads striding over a line"


# ---- the emulation itself (tests/cuda_emu/cuda_host_emu.h) ----


def _expected_warp(v, threads, width):
    """What tests/cuda_emu/emu_selftest.h's warp_kernel computes, for blocks of `threads` threads."""
    blocks = v.numel() // threads
    out = {k: torch.full_like(v, -1) for k in ("red", "all", "scan", "perm", "ballot")}
    for b in range(blocks):
        for w0 in range(0, threads, 32):  # a warp: lanes [w0, w0 + n)
            n = min(32, threads - w0)
            warp = v[b * threads + w0 : b * threads + w0 + n]
            bits = sum(1 << i for i in range(n) if warp[i] % 2 != 0)
            for s0 in range(0, n, width):
                sub = warp[s0 : s0 + width]
                for i in range(len(sub)):
                    g = b * threads + w0 + s0 + i
                    out["all"][g] = sub.sum()
                    out["scan"][g] = sub[: i + 1].sum()
                    out["perm"][g] = sub[(i * 7 + 3) % width]
                    out["ballot"][g] = bits
                out["red"][b * threads + w0 + s0] = sub.sum()
    return out


@pytest.mark.parametrize("threads,width", [(64, 32), (96, 16), (64, 8), (40, 8)])
def test_emulated_warp_collectives(emu, threads, width):
    """Shuffles (down, xor, up, indexed) within subgroups, ballots, __syncwarp, a static __shared__
    accumulator, dynamic shared memory and atomics, over blocks of whole warps and, at 40 threads, a
    partial last warp."""
    v = torch.randint(-1000, 1000, (3 * threads,), generator=torch.Generator().manual_seed(1))
    red, all_, scan, perm, ballot, block, total = emu.selftest_warp(v, threads, width)
    want = _expected_warp(v, threads, width)
    heads = torch.arange(v.numel()) % 32 % width == 0
    assert torch.equal(red[heads], want["red"][heads])
    for name, got in (("all", all_), ("scan", scan), ("perm", perm), ("ballot", ballot)):
        assert torch.equal(got, want[name]), name
    assert torch.equal(block, v.view(3, threads).sum(1).double())
    assert total.item() == v.sum().item()


def test_unwritten_shared_memory_reads_nan(emu):
    """Dynamic shared memory starts every block as 0xff bytes, so a kernel reading what it did not
    write gets NaN instead of a plausible zero."""
    assert torch.isnan(emu.selftest_unwritten_shared(48)).all()


@pytest.mark.parametrize(
    "kernel,message",
    [
        ("divergent_barrier", "__syncthreads in divergent code"),
        ("missing_lane", "reads lane 20, which has exited or does not exist"),
        ("subset_mask", "not supported by the emulation"),
    ],
)
def test_emulation_reports_kernel_errors(emu, kernel, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest_failing(kernel)


@pytest.mark.slow
def test_emulation_aborts_a_deadlocked_launch(emu):
    """A lane in __syncwarp while its warp waits in __syncthreads never returns: after
    CUDA_EMU_TIMEOUT_S without a completed barrier the emulation says so and aborts (a hung test run
    in CI otherwise)."""
    code = textwrap.dedent(
        """
        import torch
        from tests import cuda_emu
        cuda_emu.load()
        torch.ops.gspn_cuda_emu.selftest_failing("deadlock")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_EMU_TIMEOUT_S="1", PYTHONPATH=root)
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    assert "deadlock" in r.stderr


@pytest.mark.slow
@pytest.mark.build
def test_kernels_have_no_data_races_under_thread_sanitizer(tmp_path):
    """tests/cuda_emu/race_check.cpp runs the ops' kernels, forward and backward, through the launch
    paths above under ThreadSanitizer, which reports any two accesses of different CUDA threads that
    no barrier orders (a missing __syncthreads), whether or not the results came out wrong."""
    exe = tmp_path / "race_check"
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread"]
    cmd += [f"-I{_build.CSRC}", f"-I{cuda_emu.HERE}", str(cuda_emu.HERE / "race_check.cpp"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0, run.stderr[-3000:]
    # every launch ran (the attention, tile and layer-norm kernels print once per case)
    assert len(run.stdout.splitlines()) == 4 + 5 * 2 + 3 * 2 + 3 + 3 + 2, run.stdout


def test_the_cuda_build_hashes_every_kernel_file():
    """The CUDA extension's cache key covers every file under csrc/cuda (a kernel header edited
    without a rebuild would load a stale library)."""
    hashed = set(_build._CUDA_SOURCES) | set(_build._HEADERS) | set(_build._CUDA_HEADERS)
    files = {p.relative_to(_build.CSRC).as_posix() for p in (_build.CSRC / "cuda").iterdir() if p.is_file()}
    assert files <= hashed, files - hashed


# ---- the channels-last propagate_proj kernels (csrc/cuda/gspn_lanes_kernels.h) ----

# the plan's CTA target on a GPU (gspn_lanes_kernels.h kTargetCtas); 1 gives the widest channel
# groups (G = 32 for C > 16) and one run per direction, a huge one G = 8 and a run per chunk
GPU_CTAS = 264
WIDE, NARROW = 1, 1 << 40
# the forward kernel an emulated op runs (gspn_cuda_plan.h ForwardKernel): the dispatch rule, the lane
# kernels (these tests' default, so that the lane kernels' forward stays covered where the rule would
# pick the tile kernel), the local tile kernel (gspn_tile_kernels.h)
AUTO, LANES, TILE = 0, 1, 2
PROJ_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
PROJ_NAMES = ("y", "x", "proxy", "weight", "bias", "merge")


def proj_inputs(shape, S, K, dtype=torch.float64, seed=0):
    """x, proxy, projection weight and bias (logits spread over a few units), merge weights, dL/dy."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    proxy = torch.randn(B, S, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(K * len(GATE_FIELDS) * C, S, generator=g, dtype=torch.float64) * (2 / S**0.5)
    bias = torch.randn(K * len(GATE_FIELDS) * C, generator=g, dtype=torch.float64)
    merge = torch.rand(K, C, generator=g, dtype=torch.float64) + 0.1
    grad_y = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, proxy, weight, bias, merge)], grad_y.to(dtype)


def proj_reference(ins, grad_y, directions, chunk):
    """y and the five gradients of propagate_proj_reference (autograd), in the inputs' dtype."""
    ref_ins = [t.detach().clone().requires_grad_() for t in ins]
    y = propagate_proj_reference(*ref_ins, directions, chunk)
    return [y.detach(), *torch.autograd.grad(y, ref_ins, grad_y)]


def lanes_run(emu, ins, grad_y, directions, chunk, ctas=GPU_CTAS):
    y = emu.propagate_proj_fwd(*ins, list(directions), chunk or 0, ctas, LANES)
    grads = emu.propagate_proj_bwd(grad_y, *ins, list(directions), chunk or 0, ctas, LANES)
    return [y, *grads]


def cpu_kernel_run(ins, grad_y, directions, chunk):
    assert _build.load_cpu(), _build.build_error("cpu")
    ops = torch.ops.gspn_lightning
    y = ops.propagate_proj_fwd(*ins, list(directions), chunk or 0)
    return [y, *ops.propagate_proj_bwd(grad_y, *ins, list(directions), chunk or 0)]


def assert_rel(got, want, tol, what):
    """max |got - want| <= tol max |want| (every output is compared at the scale of its largest value)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = want.double().abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} at scale {scale:.3g}"


def check_lanes(emu, shape, S, directions, chunk, dtype=torch.float64, ctas=GPU_CTAS):
    """The lane kernels forward and backward against the float64 reference and the CPU kernel."""
    ins, grad_y = proj_inputs(shape, S, len(directions), dtype)
    got = lanes_run(emu, ins, grad_y, directions, chunk, ctas)
    ref = proj_reference([t.double() for t in ins], grad_y.double(), directions, chunk)
    cpu = cpu_kernel_run(ins, grad_y, directions, chunk)
    for name, g, r, c in zip(PROJ_NAMES, got, ref, cpu):
        assert_rel(g, r.to(dtype), PROJ_TOL[dtype], f"{name} vs the float64 reference")
        assert_rel(g, c, PROJ_TOL[dtype], f"{name} vs the CPU kernel")
    return got


# (shape (B, C, H, W), S, chunk): odd maps both ways round, single rows and columns, a square, one
# 64 x 64; C = 5 (one partial group of 8 lanes) and 19 (a partial last group)
LANE_SHAPES = [
    ((1, 5, 17, 23), 8, None),
    ((1, 5, 23, 17), 3, None),
    ((1, 5, 1, 37), 8, None),
    ((1, 5, 37, 1), 16, None),
    ((2, 19, 8, 8), 8, None),
]
LANE_CHUNKS = [1, 3, 4, 5]  # 5 divides neither 17 nor 23


@pytest.mark.parametrize("shape,S,chunk", LANE_SHAPES, ids=_id)
def test_lanes_kernels_match_reference_and_cpu_kernel(emu, shape, S, chunk):
    check_lanes(emu, shape, S, DIRECTIONS, chunk)


@pytest.mark.parametrize("chunk", LANE_CHUNKS)
def test_lanes_kernels_chunked(emu, chunk):
    """Chunked scans, cut into runs of chunks (one CTA per chunk at these sizes)."""
    check_lanes(emu, (1, 5, 17, 23), 8, DIRECTIONS, chunk)


@pytest.mark.parametrize("directions", [("r2l",), ("l2r", "t2b"), ("b2t", "l2r", "r2l")], ids="-".join)
def test_lanes_kernels_direction_subsets(emu, directions):
    check_lanes(emu, (1, 5, 9, 13), 3, directions, 4)


@pytest.mark.parametrize(
    "shape,ctas,chunk",
    [((1, 19, 9, 11), WIDE, None), ((1, 12, 9, 11), WIDE, 3), ((1, 19, 9, 11), NARROW, 2)],
    ids=["G32", "G16-chunked", "G8-runs"],
)
def test_lanes_kernels_channel_groups(emu, shape, ctas, chunk):
    """Groups of 32 and 16 lanes with masked lanes, and 8-lane groups with a run per chunk."""
    check_lanes(emu, shape, 16, DIRECTIONS, chunk, ctas=ctas)


def test_lanes_kernels_float32_and_64x64(emu):
    check_lanes(emu, (1, 5, 17, 23), 16, DIRECTIONS, 3, dtype=torch.float32)
    check_lanes(emu, (1, 5, 64, 64), 8, ("t2b", "l2r"), None, dtype=torch.float32)


def test_lanes_kernels_long_lines_use_the_global_workspace(emu):
    """Lines whose backward buffers do not fit in shared memory (float64, 300 positions) run with
    the line buffers in the global workspace."""
    x = torch.zeros(1, 5, 2, 300, dtype=torch.float64)
    plan = emu.propagate_proj_plan(x, x[:, :3], ["t2b"], 0, True, GPU_CTAS)
    lines_bytes = 6 * (300 + 2) * plan[0] * 8  # three products of this and the next line, float64
    assert plan[6] == 1 and plan[5] < lines_bytes, plan  # shared memory: the projection rows only
    check_lanes(emu, (1, 5, 2, 300), 3, ("t2b", "b2t"), None)


def test_lanes_bfloat16_error_bound(emu):
    """bfloat16 in and out (float32 inside): each output errs at most twice as much as the same
    reference computed by PyTorch in bfloat16, both against float64 (as test_ops'
    test_low_precision_error_bound); and it agrees with the CPU kernel's bfloat16 result."""
    shape, directions, chunk = (1, 19, 9, 13), DIRECTIONS, None
    ins, grad_y = proj_inputs(shape, 8, len(directions))
    exact = proj_reference(ins, grad_y, directions, chunk)
    low = [t.to(torch.bfloat16) for t in ins]
    gy = grad_y.to(torch.bfloat16)
    got = lanes_run(emu, low, gy, directions, chunk)
    torch_bf16 = proj_reference(low, gy, directions, chunk)
    cpu = cpu_kernel_run(low, gy, directions, chunk)
    for name, g, r, e, c in zip(PROJ_NAMES, got, torch_bf16, exact, cpu):
        assert g.dtype == torch.bfloat16, name
        scale = e.abs().max().item()
        err_k = (g.double() - e).abs().max().item()
        err_r = (r.double() - e).abs().max().item()
        assert err_k <= 2 * err_r + 1e-3 * scale, f"{name}: kernel {err_k:.3g} vs PyTorch bf16 {err_r:.3g}"
        assert_rel(g, c, 2e-2, f"{name} vs the CPU kernel")


def test_lanes_outputs_are_channels_last(emu):
    """y, dL/dx and dL/dproxy come back channels-last whatever the inputs' layout, with the same
    values for NCHW and NHWC inputs (the kernels read NHWC; NHWC inputs need no copy)."""
    ins, grad_y = proj_inputs((1, 5, 6, 7), 3, 2)
    dirs = ["t2b", "l2r"]
    nchw = lanes_run(emu, ins, grad_y, dirs, None)
    cl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in ins]
    nhwc = lanes_run(emu, cl, grad_y.contiguous(memory_format=torch.channels_last), dirs, None)
    for out in (nchw, nhwc):
        for t in (out[0], out[1], out[2]):
            assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        assert all(t.is_contiguous() for t in out[3:])
    for a, b in zip(nchw, nhwc):
        assert torch.equal(a, b)


def test_lanes_large_proxy_falls_back_to_materialised_logits(emu):
    """S > 16: the logits are materialised and the per-plane kernels run (emulated here), outputs
    still channels-last."""
    out = check_lanes(emu, (1, 3, 5, 6), 20, DIRECTIONS, None)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in out[:3])
    x = torch.zeros(1, 3, 5, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="at most 16"):
        emu.propagate_proj_plan(x, torch.zeros(1, 20, 5, 6, dtype=torch.float64), ["t2b"], 0, False, GPU_CTAS)


def test_lanes_cases_reach_every_launch_path(emu):
    """The cases above reach what the lane kernels do differently: G = 8, 16 and 32 with masked
    lanes, several channel groups, several runs per direction, and one run of several chunks."""
    plans = []  # (G, P, groups, runs, chunks per run, shared bytes, global lines, workspace)
    cases = [(s, S, c, DIRECTIONS, GPU_CTAS) for s, S, c in LANE_SHAPES]
    cases += [((1, 5, 17, 23), 8, c, DIRECTIONS, GPU_CTAS) for c in LANE_CHUNKS]
    cases += [
        ((1, 19, 9, 11), 16, None, DIRECTIONS, WIDE),
        ((1, 12, 9, 11), 16, 3, DIRECTIONS, WIDE),
        ((1, 19, 9, 11), 16, 2, DIRECTIONS, NARROW),
    ]
    for shape, S, chunk, dirs, ctas in cases:
        x = torch.zeros(shape, dtype=torch.float64)
        proxy = torch.zeros(shape[0], S, *shape[2:], dtype=torch.float64)
        for bwd in (False, True):
            plans.append((shape[1], emu.propagate_proj_plan(x, proxy, list(dirs), chunk or 0, bwd, ctas)))
    assert {p[0] for _, p in plans} == {8, 16, 32}, "every lane-group width"
    assert any(c % p[0] for c, p in plans), "masked lanes"
    assert any(p[2] > 1 for _, p in plans), "several channel groups"
    assert any(p[3] > 1 for _, p in plans), "several runs per direction"
    assert any(p[4] > 1 for _, p in plans), "a run of several chunks"


# ---- the attention kernels of the SD-XL swap (csrc/cuda/gspn_attention_kernels.h) ----

ATTN_NAMES = ("out", "q", "k", "v", "proxy", "weight", "bias", "merge", "u_bias")


def attention_inputs(shape, S, K, dtype=torch.float64, seed=0):
    """q, k, v (B, H, W, E), proxy, tap weight and bias, merge (softmaxed), u_bias, dL/dout."""
    B, H, W, E = shape
    g = torch.Generator().manual_seed(seed)

    def r(*s, mul=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * mul

    ins = (r(*shape, mul=2), r(*shape, mul=2), r(*shape), r(B, H, W, S), r(K * 3 * E, S, mul=2 / S**0.5),
           r(K * 3 * E), torch.softmax(r(K, E), 0), r(E))  # fmt: skip
    return [t.to(dtype) for t in ins], r(*shape).to(dtype)


def attention_runs(emu, ins, grad_out, directions, chunk, ctas=GPU_CTAS):
    """(emulated CUDA kernels, CPU kernel, float64 reference via autograd): out and the 8 gradients."""
    d, c = list(directions), chunk or 0
    got = [emu.attention_fwd(*ins, d, c, ctas, LANES), *emu.attention_bwd(grad_out, *ins, d, c, ctas)]
    assert _build.load_cpu(), _build.build_error("cpu")
    ops = torch.ops.gspn_lightning
    cpu = [ops.attention_fwd(*ins, d, c), *ops.attention_bwd(grad_out, *ins, d, c)]
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    out = attention_reference(*ref_ins, directions, chunk)
    ref = [
        out.detach(),
        *torch.autograd.grad(out, ref_ins, grad_out.double(), allow_unused=True, materialize_grads=True),
    ]
    return got, cpu, ref


def check_attention(emu, shape, S, directions, chunk, dtype=torch.float64, ctas=GPU_CTAS):
    """Every output within PROJ_TOL of the reference's scale, or of 1 where that is smaller (the inputs
    are of order 1; with chunk 1 or lines of one pixel the taps are unused, with one direction the merge
    weight cancels: those gradients are 0 up to rounding)."""
    ins, grad_out = attention_inputs(shape, S, len(directions), dtype)
    got, cpu, ref = attention_runs(emu, ins, grad_out, directions, chunk, ctas)
    for name, g, c, r in zip(ATTN_NAMES, got, cpu, ref):
        assert g.shape == r.shape and g.dtype == dtype, name
        scale = max(r.abs().max().item(), 1.0)
        for want, what in ((r, "the float64 reference"), (c, "the CPU kernel")):
            err = (g.double() - want.double()).abs().max().item()
            assert err <= PROJ_TOL[dtype] * scale, (
                f"{name} vs {what}: max error {err:.3g} at scale {scale:.3g}"
            )


# (shape (B, H, W, E), S, chunk): odd grids both ways round, a single row and column; E = 5 (a partial
# group of 8 lanes) and 19 (a partial last group)
ATTN_SHAPES = [
    ((1, 17, 23, 5), 8, None),
    ((1, 23, 17, 5), 3, 4),
    ((1, 1, 37, 5), 8, None),
    ((1, 37, 1, 5), 16, 3),
    ((2, 8, 8, 19), 8, None),
]


@pytest.mark.parametrize("shape,S,chunk", ATTN_SHAPES, ids=_id)
def test_attention_kernels_match_reference_and_cpu_kernel(emu, shape, S, chunk):
    check_attention(emu, shape, S, DIRECTIONS, chunk)


@pytest.mark.parametrize("chunk", [1, 3, 5])
@pytest.mark.parametrize("directions", [("r2l",), ("l2r", "t2b"), DIRECTIONS], ids="-".join)
def test_attention_kernels_chunked_and_direction_subsets(emu, directions, chunk):
    check_attention(emu, (1, 9, 13, 5), 3, directions, chunk)


@pytest.mark.parametrize(
    "shape,ctas,chunk,G",
    [((1, 9, 11, 19), WIDE, None, 32), ((1, 9, 11, 12), WIDE, 3, 16), ((1, 9, 11, 19), NARROW, 2, 8)],
    ids=["G32", "G16-chunked", "G8-runs"],
)
def test_attention_kernels_channel_groups(emu, shape, ctas, chunk, G):
    """Groups of 32 and 16 lanes with masked lanes, and 8-lane groups with a run per chunk."""
    check_attention(emu, shape, 16, DIRECTIONS, chunk, ctas=ctas)
    plan = emu.attention_plan(
        torch.zeros(shape, dtype=torch.float64), 16, list(DIRECTIONS), chunk or 0, True, ctas
    )
    assert plan[0] == G and plan[3] > (1 if G == 8 else 0), plan  # G; several runs per direction


def test_attention_kernels_float32(emu):
    check_attention(emu, (1, 17, 23, 5), 16, DIRECTIONS, 3, dtype=torch.float32)
    check_attention(emu, (2, 12, 9, 19), 8, ("b2t", "l2r"), None, dtype=torch.float32)


def test_attention_long_lines_use_the_global_workspace(emu):
    """Lines whose backward buffers (twelve lines of products, two states) do not fit in shared memory
    (float64, 300 positions) run with the line buffers in the global workspace."""
    v = torch.zeros(1, 2, 300, 5, dtype=torch.float64)
    plan = emu.attention_plan(v, 3, ["t2b"], 0, True, GPU_CTAS)
    assert plan[6] == 1 and plan[5] == 0, plan
    check_attention(emu, (1, 2, 300, 5), 3, ("t2b", "b2t"), None)


def test_attention_bfloat16_error_bound(emu):
    """bfloat16 in and out (float32 inside): each output errs at most twice as much as the reference
    computed by PyTorch in bfloat16, both against float64; and it agrees with the CPU kernel's."""
    shape, directions, chunk = (1, 9, 13, 19), DIRECTIONS, 4
    ins, grad_out = attention_inputs(shape, 8, len(directions))
    low = [t.to(torch.bfloat16) for t in ins]
    gy = grad_out.to(torch.bfloat16)
    got, cpu, exact = attention_runs(emu, low, gy, directions, chunk)
    ref_ins = [t.detach().requires_grad_() for t in low]
    out = attention_reference(*ref_ins, directions, chunk)
    torch_bf16 = [out.detach(), *torch.autograd.grad(out, ref_ins, gy)]
    for name, g, r, e, c in zip(ATTN_NAMES, got, torch_bf16, exact, cpu):
        assert g.dtype == torch.bfloat16, name
        scale = e.abs().max().item()
        err_k = (g.double() - e).abs().max().item()
        err_r = (r.double() - e).abs().max().item()
        assert err_k <= 2 * err_r + 1e-3 * scale, f"{name}: kernel {err_k:.3g} vs PyTorch bf16 {err_r:.3g}"
        assert_rel(g, c, 2e-2, f"{name} vs the CPU kernel")


# ---- the local tile kernels of chunked layers (csrc/cuda/gspn_tile_kernels.h), forward and propagate_proj's backward ----

# odd maps both ways round, a single row and column, squares; C = 5 (one partial group of 8 lanes)
TILE_SHAPES = [(1, 5, 17, 23), (1, 5, 23, 17), (1, 5, 1, 37), (1, 5, 37, 1), (2, 5, 8, 8), (1, 5, 16, 16)]
TILE_CHUNKS = [1, 2, 3, 4, 5]


def check_tile(emu, shape, S, directions, chunk, dtype=torch.float64, ctas=GPU_CTAS, cross=True):
    """The tile kernel's y against the float64 reference and the CPU kernel, then the backward
    (check_tile_backward).  ``cross``: also against the lane kernels, and the dispatch rule's own run
    gives the same bits; without it (the many shape cases: each emulated run costs seconds) the
    rule's plan is asserted to pick the tile instead of running it again."""
    y = check_tile_forward(emu, shape, S, directions, chunk, dtype, ctas, cross)
    check_tile_backward(emu, shape, S, directions, chunk, dtype, ctas, cross)
    return y


def check_tile_backward(emu, shape, S, directions, chunk, dtype=torch.float64, ctas=GPU_CTAS, cross=True):
    """The tile kernel's five gradients (S <= 16) against the float64 reference's (``cross``: and the
    lane kernels'; the dispatch rule runs it, and a second run gives the same bits: no atomics).
    S > 16: the rule keeps the lane path (the materialised logits) and the forced tile refuses."""
    ins, grad_y = proj_inputs(shape, S, len(directions), dtype)
    d = list(directions)
    if not cross and S <= 16:
        got = emu.propagate_proj_bwd(grad_y, *ins, d, chunk, ctas, TILE)
        ref = proj_reference([t.double() for t in ins], grad_y.double(), directions, chunk)[1:]
        for name, g, r in zip(PROJ_NAMES[1:], got, ref):
            assert_rel(g, r.to(dtype), PROJ_TOL[dtype], f"d{name} vs the float64 reference")
        return got
    auto = emu.propagate_proj_bwd(grad_y, *ins, d, chunk, ctas, AUTO)
    lanes = emu.propagate_proj_bwd(grad_y, *ins, d, chunk, ctas, LANES)
    if S > 16:
        ref = proj_reference([t.double() for t in ins], grad_y.double(), directions, chunk)[1:]
        for name, a, r in zip(PROJ_NAMES[1:], auto, ref):
            assert_rel(a, r.to(dtype), PROJ_TOL[dtype], f"d{name} vs the float64 reference")
        with pytest.raises(RuntimeError, match="proxies of at most 16"):
            emu.propagate_proj_bwd(grad_y, *ins, d, chunk, ctas, TILE)
        return None
    got = emu.propagate_proj_bwd(grad_y, *ins, d, chunk, ctas, TILE)
    ref = proj_reference([t.double() for t in ins], grad_y.double(), directions, chunk)[1:]
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    for name, g, r, lane, a in zip(PROJ_NAMES[1:], got, ref, lanes, auto):
        assert_rel(g, r.to(dtype), PROJ_TOL[dtype], f"d{name} vs the float64 reference")
        assert_rel(g, lane, PROJ_TOL[dtype], f"d{name} vs the lane kernels")
        assert torch.equal(a, g), f"d{name}: the dispatch rule picks the tile, deterministically"
    return got


def check_tile_forward(emu, shape, S, directions, chunk, dtype=torch.float64, ctas=GPU_CTAS, cross=True):
    ins, _ = proj_inputs(shape, S, len(directions), dtype)
    d = list(directions)
    y = emu.propagate_proj_fwd(*ins, d, chunk, ctas, TILE)
    with torch.no_grad():
        ref = propagate_proj_reference(*[t.double() for t in ins], directions, chunk)
    assert _build.load_cpu(), _build.build_error("cpu")
    cpu = torch.ops.gspn_lightning.propagate_proj_fwd(*ins, d, chunk)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_rel(y, ref.to(dtype), PROJ_TOL[dtype], "y vs the float64 reference")
    assert_rel(y, cpu, PROJ_TOL[dtype], "y vs the CPU kernel")
    if not cross:
        plan = emu.tile_plan(torch.zeros(shape, dtype=dtype), S, d, chunk, 1, ctas)
        assert plan[0] == 1, "the dispatch rule picks the tile"
        return y
    lanes = emu.propagate_proj_fwd(*ins, d, chunk, ctas, LANES)
    assert_rel(y, lanes, PROJ_TOL[dtype], "y vs the lane kernels")
    assert torch.equal(emu.propagate_proj_fwd(*ins, d, chunk, ctas, AUTO), y), (
        "the dispatch rule picks the tile"
    )
    return y


@pytest.mark.parametrize("chunk", TILE_CHUNKS)
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=_id)
def test_tile_kernel_matches_reference(emu, shape, chunk):
    """Every shape and chunk against the float64 reference; the lane kernels and the dispatch rule's
    own run are compared at chunk 2 (cross checks cost three more emulated runs each)."""
    check_tile(emu, shape, 3 if shape[2] > shape[3] else 8, DIRECTIONS, chunk, cross=chunk == 2)


@pytest.mark.parametrize(
    "directions", [("r2l",), ("t2b",), ("l2r", "t2b"), ("b2t", "l2r", "r2l")], ids="-".join
)
@pytest.mark.parametrize("chunk", [1, 3])
def test_tile_kernel_direction_subsets(emu, directions, chunk):
    check_tile(emu, (1, 5, 17, 23), 8, directions, chunk, cross=False)


def test_tile_kernel_float32_and_bfloat16(emu):
    """float32 within PROJ_TOL; bfloat16 (float inside) errs at most twice as much as PyTorch's
    bfloat16 reference and agrees with the lane kernels' bfloat16 result (which round each direction's
    term to bfloat16 before the merge: the tile adds them in float)."""
    check_tile(emu, (1, 5, 23, 17), 16, DIRECTIONS, 4, dtype=torch.float32)
    check_tile(emu, (1, 19, 16, 16), 8, DIRECTIONS, 2, dtype=torch.float32)
    ins, _ = proj_inputs((1, 19, 9, 13), 8, 4)
    low = [t.to(torch.bfloat16) for t in ins]
    d = list(DIRECTIONS)
    y = emu.propagate_proj_fwd(*low, d, 3, GPU_CTAS, TILE)
    exact = propagate_proj_reference(*ins, DIRECTIONS, 3)
    torch_bf16 = propagate_proj_reference(*low, DIRECTIONS, 3)
    err_k = (y.double() - exact).abs().max().item()
    err_r = (torch_bf16.double() - exact).abs().max().item()
    assert y.dtype == torch.bfloat16
    assert err_k <= 2 * err_r + 1e-3 * exact.abs().max().item(), (err_k, err_r)
    assert_rel(y, emu.propagate_proj_fwd(*low, d, 3, GPU_CTAS, LANES), 2e-2, "y vs the lane kernels")
    # the backward likewise (its dx sums the directions in float before rounding, as the lanes' merge)
    _, grad_y = proj_inputs((1, 19, 9, 13), 8, 4)
    gy = grad_y.to(torch.bfloat16)
    got = emu.propagate_proj_bwd(gy, *low, d, 3, GPU_CTAS, TILE)
    exact = proj_reference(ins, grad_y, DIRECTIONS, 3)[1:]
    torch_bf16 = proj_reference(low, gy, DIRECTIONS, 3)[1:]
    lanes = emu.propagate_proj_bwd(gy, *low, d, 3, GPU_CTAS, LANES)
    for name, g, r, e, lane in zip(PROJ_NAMES[1:], got, torch_bf16, exact, lanes):
        assert g.dtype == torch.bfloat16, name
        err_k = (g.double() - e).abs().max().item()
        err_r = (r.double() - e).abs().max().item()
        assert err_k <= 2 * err_r + 1e-3 * e.abs().max().item(), (
            f"d{name}: tile {err_k:.3g} vs bf16 {err_r:.3g}"
        )
        assert_rel(g, lane, 2e-2, f"d{name} vs the lane kernels")


@pytest.mark.parametrize(
    "shape,ctas,chunk,G",
    [((1, 19, 9, 11), WIDE, 2, 32), ((1, 12, 9, 11), WIDE, 3, 16), ((2, 19, 9, 11), NARROW, 5, 8)],
    ids=["G32", "G16", "G8"],
)
def test_tile_kernel_channel_groups(emu, shape, ctas, chunk, G):
    """Groups of 32 and 16 lanes with masked lanes, 8-lane groups over several channel groups."""
    check_tile(emu, shape, 16, DIRECTIONS, chunk, ctas=ctas)
    plan = emu.tile_plan(torch.zeros(shape, dtype=torch.float64), 16, list(DIRECTIONS), chunk, 1, ctas)
    assert plan[1] == G and plan[3] == -(-shape[1] // G), plan


@pytest.mark.parametrize(
    "shape,S,chunk,dtype",
    [((1, 5, 17, 23), 24, 3, torch.float64), ((2, 19, 16, 16), 72, 2, torch.float32)],
    ids=["S24", "S72-float32"],
)
def test_tile_kernel_large_proxies_rows_in_shared_memory(emu, shape, S, chunk, dtype):
    """Proxies of more than 16 channels (GSPN-DiT's d_state = D / 16: 72 at XL's 1152): the projection
    rows in shared memory, the proxy read in the projection loop; the lane kernels' path for them is
    the materialised logits (emulated per-plane kernels)."""
    check_tile(emu, shape, S, DIRECTIONS, chunk, dtype=dtype)


def test_tile_kernel_empty_maps(emu):
    for shape in ((1, 5, 0, 7), (1, 5, 7, 0), (0, 5, 7, 7), (1, 0, 7, 7)):
        ins, _ = proj_inputs(shape, 3, 4)
        y = emu.propagate_proj_fwd(*ins, list(DIRECTIONS), 2, GPU_CTAS, AUTO)
        assert y.shape == shape


def test_tile_kernel_large_tiles_and_chunk_8(emu):
    """Chunk 8 (tiles of 32 x 32 positions, a halo of 7) and chunk 6 on a map cut into several tiles
    with a partial last one, in float64 (where the side shrinks until a tile fits)."""
    check_tile(emu, (1, 3, 37, 35), 3, DIRECTIONS, 8, cross=False)
    check_tile(emu, (1, 3, 29, 31), 3, ("b2t", "r2l"), 6, cross=False)


def test_tile_dispatch_rule_and_cases_reach_every_launch_path(emu):
    """The rule: chunked layers with chunks of 1 to 8 lines and proxies of at most 128 channels
    (attention: 16) take the tile kernel, global layers, longer chunks and larger proxies not.  And the cases above reach
    one and several tiles both ways, halos clipped at the map's edges and whole, a partial last tile,
    several item slots per step and steps of more items than slots."""
    x = torch.zeros(1, 5, 17, 23, dtype=torch.float64)
    d = list(DIRECTIONS)
    assert [emu.tile_plan(x, 8, d, c, 1, GPU_CTAS)[0] for c in (0, 1, 4, 8, 9)] == [0, 1, 1, 1, 0]
    assert emu.tile_plan(x, 72, d, 2, 1, GPU_CTAS)[0] == 1  # the rows in shared memory
    assert emu.tile_plan(x, 129, d, 2, 1, GPU_CTAS)[0] == 0
    assert emu.tile_plan(x, 8, d, 2, 2, GPU_CTAS)[0] == 1  # attention: two states, rows in registers
    assert emu.tile_plan(x, 17, d, 2, 2, GPU_CTAS)[0] == 0
    with pytest.raises(RuntimeError, match="chunk sizes 1 to 8"):
        ins, _ = proj_inputs((1, 5, 17, 23), 8, 4)
        emu.propagate_proj_fwd(*ins, d, 0, GPU_CTAS, TILE)
    # (tile, G, P, groups, TH, TW, tiles, shared bytes)
    plans = [
        emu.tile_plan(torch.zeros(s, dtype=torch.float64), 8, d, c, 1, GPU_CTAS)
        for s in TILE_SHAPES
        for c in TILE_CHUNKS
    ]
    plans.append(emu.tile_plan(torch.zeros(1, 3, 37, 35, dtype=torch.float64), 3, d, 8, 1, GPU_CTAS))
    assert all(p[0] == 1 for p in plans)
    assert any(p[6] == 1 for p in plans) and any(p[6] >= 4 for p in plans), "one and several tiles"
    assert any(p[4] == 16 and p[5] == 16 and p[6] == 4 for p in plans), "a 17 x 23 map: partial tiles"
    assert max(p[4] for p in plans) == 24, "chunk 8 in float64: the side shrunk from 32 to fit"
    f32 = emu.tile_plan(torch.zeros(1, 3, 37, 35), 3, d, 8, 1, GPU_CTAS)
    assert f32[4] == f32[5] == 32 and f32[7] <= 96 * 1024, f32
    assert any(p[1] * p[2] == 256 for p in plans), "full CTAs of 256 threads (steps of more items)"


def test_tile_backward_dispatch_rule_and_plan(emu):
    """The backward's rule: chunks of 1 to 8 lines and proxies of at most 16 channels (dL/dweight in
    registers) take the tile kernel; its plan counts the tile's dL/dproxy accumulator (TH TW S values,
    whatever G) in the shared memory and shrinks the side to fit it; GSPN's backward forced to the
    tile refuses what it does not take."""
    x = torch.zeros(1, 5, 17, 23, dtype=torch.float64)
    d = list(DIRECTIONS)
    assert [emu.tile_plan(x, 8, d, c, 0, GPU_CTAS)[0] for c in (0, 1, 4, 8, 9)] == [0, 1, 1, 1, 0]
    assert emu.tile_plan(x, 16, d, 2, 0, GPU_CTAS)[0] == 1
    assert emu.tile_plan(x, 17, d, 2, 0, GPU_CTAS)[0] == 0  # the forward's tile takes it, not the backward's
    assert emu.tile_plan(x, 17, d, 2, 1, GPU_CTAS)[0] == 1
    ins, grad_y = proj_inputs((1, 5, 17, 23), 8, 4)
    with pytest.raises(RuntimeError, match="chunk sizes 1 to 8"):
        emu.propagate_proj_bwd(grad_y, *ins, d, 0, GPU_CTAS, TILE)
    # (tile, G, P, groups, TH, TW, tiles, shared bytes): S only adds TH TW S accumulators
    small, large = (emu.tile_plan(x, S, d, 4, 0, GPU_CTAS) for S in (8, 16))
    assert small[1:7] == large[1:7], (small, large)
    assert large[7] - small[7] == small[4] * small[5] * 8 * 8, (small, large)
    # per lane: the dx accumulator and four line buffers (h and three products), rows walk TH lines of
    # TW + 2 x 3 halo + 2 pads; in float64 the side of 16 (8 lanes: 8 x 14336 + 16384 bytes) shrinks to 12
    G, TH, TW = small[1], small[4], small[5]
    assert (G, TH, TW) == (8, 12, 12), small
    assert small[7] == G * (TH * TW + 4 * TH * (TW + 6 + 2)) * 8 + TH * TW * 8 * 8, small
    assert emu.tile_plan(x.float(), 8, d, 4, 0, GPU_CTAS)[4:6] == [16, 16]  # float32: the full side
    big = emu.tile_plan(torch.zeros(1, 32, 40, 40, dtype=torch.float64), 16, d, 8, 0, GPU_CTAS)
    assert big[0] == 1 and big[4] < 32 and big[7] <= 96 * 1024, big


# (shape (B, H, W, E), S, chunk): the attention tile kernel, out against the reference and CPU kernel
ATTN_TILE_CASES = [
    ((1, 17, 23, 5), 8, 1, DIRECTIONS),
    ((1, 23, 17, 5), 3, 4, DIRECTIONS),
    ((1, 1, 37, 5), 8, 2, DIRECTIONS),
    ((1, 37, 1, 5), 16, 3, DIRECTIONS),
    ((2, 8, 8, 19), 8, 5, DIRECTIONS),
    ((1, 16, 16, 5), 3, 2, ("r2l",)),
    ((1, 9, 13, 12), 3, 3, ("l2r", "t2b")),
]


@pytest.mark.parametrize("shape,S,chunk,directions", ATTN_TILE_CASES, ids=[str(i) for i in range(7)])
def test_attention_tile_kernel_matches_reference(emu, shape, S, chunk, directions):
    ins, _ = attention_inputs(shape, S, len(directions))
    d = list(directions)
    out = emu.attention_fwd(*ins, d, chunk, GPU_CTAS, TILE)
    with torch.no_grad():
        ref = attention_reference(*ins, directions, chunk)
    assert _build.load_cpu(), _build.build_error("cpu")
    cpu = torch.ops.gspn_lightning.attention_fwd(*ins, d, chunk)
    lanes = emu.attention_fwd(*ins, d, chunk, GPU_CTAS, LANES)
    for want, what in ((ref, "the float64 reference"), (cpu, "the CPU kernel"), (lanes, "the lane kernels")):
        err = (out - want).abs().max().item()
        assert err <= PROJ_TOL[torch.float64] * max(want.abs().max().item(), 1.0), f"out vs {what}: {err:.3g}"
    assert torch.equal(emu.attention_fwd(*ins, d, chunk, GPU_CTAS, AUTO), out), (
        "the dispatch rule picks the tile"
    )


def test_attention_tile_kernel_float32(emu):
    ins, _ = attention_inputs((1, 17, 23, 19), 8, 4, torch.float32)
    out = emu.attention_fwd(*ins, list(DIRECTIONS), 4, WIDE, TILE)
    with torch.no_grad():
        ref = attention_reference(*[t.double() for t in ins], DIRECTIONS, 4)
    err = (out.double() - ref).abs().max().item()
    assert err <= PROJ_TOL[torch.float32] * max(ref.abs().max().item(), 1.0), err

"""The CUDA kernels of csrc/cuda executed on the CPU (tests/cuda_emu: one host thread per CUDA thread,
a barrier for ``__syncthreads``, emulated warp collectives), against the float64 reference.

Both ops, forward and backward, float32 and float64, every direction, global and chunked, staged and
in-place (the fused op), on small odd shapes chosen to reach every launch path of the kernels: blocks
of several warps and of several lines or planes, partial blocks, threads striding over lines longer
than a block, and the global workspaces for lines too long for shared memory
(:func:`test_the_cases_reach_every_launch_path` checks that they do).  Then the emulation itself: the
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
    normalize_gates,
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
    """tests/cuda_emu/race_check.cpp runs both ops' kernels, forward and backward, through the launch
    paths above under ThreadSanitizer, which reports any two accesses of different CUDA threads that
    no barrier orders (a missing __syncthreads), whether or not the results came out wrong."""
    exe = tmp_path / "race_check"
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread"]
    cmd += [f"-I{_build.CSRC}", f"-I{cuda_emu.HERE}", str(cuda_emu.HERE / "race_check.cpp"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout.splitlines()) == 4 + 5 * 2, run.stdout  # every launch ran


def test_the_cuda_build_hashes_every_kernel_file():
    """The CUDA extension's cache key covers every file under csrc/cuda (a kernel header edited
    without a rebuild would load a stale library)."""
    hashed = set(_build._CUDA_SOURCES) | set(_build._HEADERS) | set(_build._CUDA_HEADERS)
    files = {p.relative_to(_build.CSRC).as_posix() for p in (_build.CSRC / "cuda").iterdir() if p.is_file()}
    assert files <= hashed, files - hashed

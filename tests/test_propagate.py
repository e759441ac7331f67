"""The fused propagation op (``gspn_propagate``): the kernel against its definition (the composition of
``normalize_gates`` and ``gspn_scan``) forward and in all gradients, for every subset of directions,
chunked and global, on odd and non-square maps; float64 gradcheck; the 16-bit error budget; the
torch.library registration (opcheck, torch.compile); what the forward saves; saturated gates; input
checking; and the mixer's fused and unfused paths."""

import itertools

import pytest
import torch

from gspn_lightning.nn import GSPNMixer
from gspn_lightning.ops import (
    DIRECTIONS,
    GATE_FIELDS,
    _build,
    gspn_propagate,
    gspn_scan,
    normalize_gates,
    propagate_reference,
)

from .conftest import DEVICES
from .test_ops import _run_python, grads

SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(DIRECTIONS, r)]


def rand_propagate_inputs(shape, directions, dtype=torch.float64, device="cpu", scale=2.0, seed=0):
    """x, raw gate logits (spread wide enough that taps differ a lot), merge weights; leaf tensors."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    gates = (
        torch.randn(B, len(directions), len(GATE_FIELDS), C, H, W, generator=g, dtype=torch.float64) * scale
    )
    merge = torch.rand(len(directions), C, generator=g, dtype=torch.float64) + 0.1
    return [t.to(device, dtype).requires_grad_() for t in (x, gates, merge)]


def check_against_reference(ins, directions, chunk, rtol, atol):
    out = gspn_propagate(*ins, directions, chunk, backend="kernel")
    ref = propagate_reference(*ins, directions, chunk)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out)
    for name, a, b in zip(("x", "gates", "merge"), grads(out, ins, go), grads(ref, ins, go)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 4])
def test_long_and_short_lines(device, chunk):
    """Lines of 33 and 34 positions (the CPU kernel's long-line path: boundary positions apart) next to
    lines below its short-line threshold of 32 (one masked loop), in one map and in float64."""
    ins = rand_propagate_inputs((1, 2, 34, 33), DIRECTIONS, device=device, seed=12)
    check_against_reference(ins, DIRECTIONS, chunk, rtol=1e-10, atol=1e-10)
    ins = rand_propagate_inputs((1, 2, 31, 33), ("t2b", "r2l"), device=device, seed=13)
    check_against_reference(ins, ("t2b", "r2l"), chunk, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("directions", SUBSETS, ids="-".join)
@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_every_direction_subset_matches_reference(device, directions, chunk):
    ins = rand_propagate_inputs((2, 3, 5, 7), directions, device=device)
    check_against_reference(ins, directions, chunk, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 7, 4), (2, 2, 1, 5), (1, 2, 6, 1), (1, 3, 9, 2)])
@pytest.mark.parametrize("chunk", [None, 1, 2, 100])
def test_odd_and_degenerate_shapes(device, shape, chunk):
    ins = rand_propagate_inputs(shape, DIRECTIONS, device=device, seed=1)
    check_against_reference(ins, DIRECTIONS, chunk, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("directions", [("r2l",), ("t2b", "l2r"), DIRECTIONS], ids="-".join)
def test_float32_and_strided_inputs(device, directions):
    """float32 against the float32 reference, with gates and x given as non-contiguous views."""
    B, C, H, W, K = 2, 4, 11, 6, len(directions)
    g = torch.Generator().manual_seed(3)
    x_base = torch.randn(B, C, W, H, generator=g).to(device)
    g_base = (torch.randn(B, C, K, 6, H, W, generator=g) * 2).to(device)
    x = x_base.transpose(-1, -2).requires_grad_()  # non-contiguous view of a leaf: grads land on the view
    gates = g_base.permute(0, 2, 3, 1, 4, 5).requires_grad_()
    merge = (torch.rand(K, C, generator=g) + 0.1).to(device).requires_grad_()
    assert not x.is_contiguous() and not gates.is_contiguous()
    check_against_reference([x, gates, merge], directions, 4, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 5])
def test_float32_planes_with_whole_blocks(device, chunk):
    """float32 planes large enough for the CPU kernel's 8 x 8 register transposes of the column
    directions, with rows and columns left over (19 x 21)."""
    ins = [
        t.detach().float().requires_grad_()
        for t in rand_propagate_inputs((2, 3, 19, 21), DIRECTIONS, seed=11)
    ]
    check_against_reference(ins, DIRECTIONS, chunk, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("directions", [("t2b",), ("l2r", "b2t"), DIRECTIONS], ids="-".join)
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck_float64(device, directions, chunk):
    ins = rand_propagate_inputs((1, 2, 4, 3), directions, device=device, seed=2)

    def f(*t):
        return gspn_propagate(*t, directions, chunk, backend="kernel")

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 4])
def test_low_precision_error_budget(device, dtype, chunk):
    """FlashAttention's rule: the 16-bit kernel errs at most about twice as much as the same
    computation done by PyTorch in that dtype, both measured against a float32 result, for the output
    and all three gradients."""
    shape = (2, 4, 33, 19)
    ins64 = rand_propagate_inputs(shape, DIRECTIONS, device=device, seed=4)
    go = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device)

    def run(dtype, kernel):
        ins = [t.detach().to(dtype).requires_grad_() for t in ins64]
        if kernel:
            out = gspn_propagate(*ins, DIRECTIONS, chunk, backend="kernel")
        else:
            out = propagate_reference(*ins, DIRECTIONS, chunk)
        assert out.dtype == dtype
        return [out, *grads(out, ins, go.to(dtype))]

    assert_error_budget(("y", "x", "gates", "merge"), run, dtype)


def assert_error_budget(names, run, dtype):
    """Each of ``run(dtype, kernel=True)``'s results errs against ``run(float32, kernel=False)`` at most
    twice as much as ``run(dtype, kernel=False)`` does (plus 1e-3 of its scale), and has ``dtype``."""
    exact = run(torch.float32, kernel=False)
    for name, k, r, e in zip(names, run(dtype, True), run(dtype, False), exact):
        assert k.dtype == dtype, f"{name}: {k.dtype}"
        err_k = (k.float() - e).abs().max().item()
        err_r = (r.float() - e).abs().max().item()
        scale = e.abs().max().item()
        assert err_k <= 2 * err_r + 1e-3 * scale, f"{name}: kernel {err_k:.3g} vs PyTorch {err_r:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel's plane layouts need a GPU")
@pytest.mark.parametrize(
    "shape, dtype, chunk",
    [
        ((3, 5, 16, 16), torch.float32, None),  # staged: several planes per block, the last block short
        ((2, 3, 14, 14), torch.bfloat16, 4),  # staged without 16-byte copies (a 14 x 14 map is 392 bytes)
        ((1, 3, 9, 40), torch.float64, 3),  # staged, one plane per block, non-square
        ((1, 2, 300, 7), torch.float32, None),  # lines of 300 positions: in place
        ((1, 1, 80, 72), torch.float64, 5),  # a plane over the staging limit: in place
    ],
)
def test_cuda_staged_and_in_place_planes(shape, dtype, chunk):
    """The CUDA kernels stage small planes in shared memory (several per block) and read large ones in
    place: both layouts, forward and every gradient, against the float64 reference."""
    ins64 = rand_propagate_inputs(shape, DIRECTIONS, device="cuda", seed=21)
    ins = [t.detach().to(dtype).requires_grad_() for t in ins64]
    out = gspn_propagate(*ins, DIRECTIONS, chunk, backend="kernel")
    ref = propagate_reference(*ins64, DIRECTIONS, chunk)
    go = torch.randn(shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64).to("cuda")
    tol = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 5e-2}[dtype]
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol * scale
    for name, a, b in zip(("x", "gates", "merge"), grads(out, ins, go.to(dtype)), grads(ref, ins64, go)):
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(b.abs().max().item(), 1.0), f"grad {name}: {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_saturated_gates_stay_finite(device):
    """Logits far below the float32 range of exp (all three taps' sigmoids underflow) still give
    row-stochastic taps: the float32 kernel matches the float64 definition, where nothing underflows."""
    directions = ("t2b", "r2l")
    ins = rand_propagate_inputs((1, 2, 6, 5), directions, device=device, seed=7)
    with torch.no_grad():
        ins[1][:, :, :3] -= 120.0  # g_neg, g_mid, g_pos around -120
    exact = propagate_reference(*ins, directions)
    assert torch.isfinite(exact).all()
    ins32 = [t.detach().float().requires_grad_() for t in ins]
    out = gspn_propagate(*ins32, directions, backend="kernel")
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(out.sum(), ins32)
    assert all(torch.isfinite(t).all() for t in g)


def test_forward_saves_only_its_inputs():
    """The backward recomputes the scans: what autograd keeps from the op is x, gates and merge, no
    per-direction h (the unfused composition keeps several full-size tensors per direction)."""
    B, C, H, W = 2, 3, 8, 6
    ins = rand_propagate_inputs((B, C, H, W), DIRECTIONS, dtype=torch.float32)
    # gates as computed by a layer (not a leaf), so that saving it is visible as a saved activation
    x, gates_leaf, merge = ins

    def saved_numel(backend):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gspn_propagate(x * 1, gates_leaf * 1, merge * 1, DIRECTIONS, backend=backend)
        return total

    inputs_numel = x.numel() + gates_leaf.numel() + merge.numel()
    assert saved_numel("kernel") == inputs_numel
    assert saved_numel("reference") > 2 * inputs_numel


def test_opcheck():
    assert _build.load_cpu(), _build.build_error("cpu")
    op = torch.ops.gspn_lightning.propagate_fwd.default
    for directions, chunk in [(list(DIRECTIONS), 0), (["l2r"], 2), (["b2t", "r2l"], 3)]:
        ins = rand_propagate_inputs((2, 3, 5, 4), directions, dtype=torch.float32, seed=8)
        torch.library.opcheck(op, (*ins, directions, chunk))


def test_torch_compile_fullgraph_mixer():
    torch.manual_seed(0)
    mixer = GSPNMixer(8, d_state=4, chunk_size=3, backend="kernel")
    x = torch.randn(2, 8, 7, 5)
    eager = mixer(x)
    compiled = torch.compile(mixer, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())


@pytest.mark.parametrize("chunk", [None, 2])
def test_mixer_fused_equals_unfused(chunk):
    """The default (fused) mixer computes the same function and gradients as the per-direction path."""
    torch.manual_seed(0)
    fused = GSPNMixer(6, d_inner=8, d_state=3, chunk_size=chunk).double()
    plain = GSPNMixer(6, d_inner=8, d_state=3, chunk_size=chunk, fused=False).double()
    assert fused.fused and not plain.fused
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.5)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    y_f, y_p = fused(x), plain(x)
    torch.testing.assert_close(y_f, y_p, rtol=1e-10, atol=1e-10)
    y_f.square().sum().backward()
    y_p.square().sum().backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def test_reference_is_the_composition():
    """propagate_reference is literally the sum over directions of the scan of normalised gates."""
    ins = rand_propagate_inputs((1, 2, 4, 5), ("b2t", "l2r"), seed=9)
    x, gates, merge = (t.detach() for t in ins)
    expected = 0
    for k, d in enumerate(("b2t", "l2r")):
        gn, gm, gp, lam, u, dd = gates[:, k].unbind(1)
        h = gspn_scan(x, torch.sigmoid(lam), *normalize_gates(gn, gm, gp, d), d, backend="reference")
        expected = expected + merge[k].view(1, -1, 1, 1) * (torch.sigmoid(u) * h + dd * x)
    torch.testing.assert_close(propagate_reference(x, gates, merge, ("b2t", "l2r")), expected)
    torch.testing.assert_close(gspn_propagate(x, gates, merge, ("b2t", "l2r"), backend="reference"), expected)


def _bad_propagate_cases():
    x, gates, merge = (t.detach().float() for t in rand_propagate_inputs((1, 2, 3, 4), DIRECTIONS))
    return [
        ((x, gates[:, :3], merge), {}, ValueError, "gates"),
        ((x, gates, merge[:, :1]), {}, ValueError, "merge"),
        ((x, gates.double(), merge), {}, TypeError, "gates"),
        ((x, gates, merge.half()), {}, TypeError, "merge"),
        ((x.long(), gates, merge), {}, TypeError, "x"),
        ((x[0], gates, merge), {}, ValueError, "4-D"),
        ((x, gates.to("meta"), merge), {}, ValueError, "gates"),
        ((x, gates[:, :2], merge[:2]), {"directions": ("t2b", "t2b")}, ValueError, "distinct"),
        ((x, gates[:, :1], merge[:1]), {"directions": ("up",)}, ValueError, "direction"),
        ((x, gates, merge), {"chunk_size": 0}, ValueError, "chunk_size"),
        ((x, gates, merge), {"backend": "fast"}, ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_propagate_cases())))
def test_bad_input_raises_clear_error(case):
    args, kwargs, exc, word = _bad_propagate_cases()[case]
    with pytest.raises(exc, match=word):
        gspn_propagate(*args, **kwargs)


def test_mixer_falls_back_without_compiler(tmp_path):
    """No C++ compiler: the (fused by default) mixer still runs, on the reference, with one warning."""
    code = """
        import warnings, torch
        from gspn_lightning.nn import GSPNMixer
        torch.manual_seed(0)
        fused, plain = GSPNMixer(6, d_state=3), GSPNMixer(6, d_state=3, fused=False)
        plain.load_state_dict(fused.state_dict())
        x = torch.randn(1, 6, 5, 4, requires_grad=True)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = fused(x)
            y.sum().backward()
        msgs = [str(m.message) for m in w if "GSPN" in str(m.message)]
        assert len(msgs) == 1 and "reference" in msgs[0], msgs
        torch.testing.assert_close(y, plain(x))
        assert torch.isfinite(x.grad).all()
        print("MIXER-FALLBACK-OK")
    """
    r = _run_python(
        code, {"GSPN_EXTENSIONS_DIR": str(tmp_path / "cache"), "CXX": str(tmp_path / "no-such-c++")}
    )
    assert "MIXER-FALLBACK-OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(
    _build.find_cuda_home() is None, reason="no CUDA toolkit (nvcc) to build the CUDA kernels with"
)
def test_cuda_propagate_kernels_register():
    """CI compiles and links the fused CUDA kernels (no GPU to run them): the CUDA dispatch key of
    both ops is filled, behind the same Python entry point as the CPU kernel."""
    assert _build.load_cuda(force=True), _build.build_error("cuda")
    for name in ("gspn_lightning::propagate_fwd", "gspn_lightning::propagate_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")

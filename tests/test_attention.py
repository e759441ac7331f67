"""The fused GSPN attention of the SD-XL swap (``gspn_attention``, issue 25 item 1): its definition
(``attention_reference``) against the composition it replaces (``attention_planes``: ``cat(v, ones)``
through ``gspn_propagate``); the CPU kernel against the definition forward and in the gradients of all
eight inputs, for every subset of directions, global and chunked, odd and degenerate grids; float64
gradcheck; float32 and the 16-bit error budget; the per-task reductions (several tasks sharing a batch
element, run-to-run identical); the torch.library registration (opcheck, torch.compile, double backward
refused, what the forward saves); the backends; input checking."""

import pytest
import torch

from gspn_lightning.ops import (
    DIRECTIONS,
    _backend,
    _build,
    attention_planes,
    attention_reference,
    gspn_attention,
)
from gspn_lightning.ops._backend import resolve_attention_backend

from .conftest import DEVICES
from .test_ops import grads
from .test_propagate import SUBSETS, assert_error_budget

NAMES = ("q", "k", "v", "proxy", "weight", "bias", "merge", "u_bias")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def rand_attention_inputs(shape, S, directions, dtype=torch.float64, seed=0, scale=1.0, device="cpu"):
    """q, k, v (B, H, W, E), proxy (B, H, W, S), weight, bias, merge (softmaxed), u_bias as leaves;
    logits spread wide enough that the taps and lam differ between pixels."""
    B, H, W, E = shape
    K = len(directions)
    g = torch.Generator().manual_seed(seed)

    def r(*s, mul=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * mul

    ins = (
        r(*shape, mul=2.0),
        r(*shape, mul=2.0),
        r(*shape),
        r(B, H, W, S),
        r(K * 3 * E, S, mul=scale / S**0.5),
        r(K * 3 * E, mul=scale),
        torch.softmax(r(K, E), dim=0),
        r(E),
    )
    return [t.to(device, dtype).requires_grad_() for t in ins]


def check_against_reference(ins, directions, chunk, rtol, atol):
    out = gspn_attention(*ins, directions, chunk, backend="kernel")
    ref = attention_reference(*ins, directions, chunk)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out)
    for name, a, b in zip(NAMES, grads(out, ins, go), grads(ref, ins, go)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("chunk", [None, 1, 3])
@pytest.mark.parametrize("directions", [DIRECTIONS, ("r2l", "t2b")], ids="-".join)
def test_reference_is_the_former_composition(directions, chunk):
    """The definition equals the composition the SD-XL swap ran before (numerator and denominator as
    2E channels of one ``gspn_propagate``, the denominator's gate open), through the pure-PyTorch
    propagation and through its kernel, forward and in every gradient."""
    ins = rand_attention_inputs((2, 6, 5, 3), 2, directions, seed=3)
    ref = attention_reference(*ins, directions, chunk)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_grads = grads(ref, ins, go)
    for backend in ("reference", "kernel"):
        old = attention_planes(*ins, directions, chunk, backend=backend)
        torch.testing.assert_close(old, ref, rtol=1e-10, atol=1e-12)
        for name, a, b in zip(NAMES, grads(old, ins, go), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"grad {n}: {m}")


def test_reference_is_a_gated_weighted_average():
    """With the output gate fully open, each output is a convex combination of v (the taps are
    row-stochastic, lam > 0): within v's range per channel, and v itself where v is constant."""
    q, k, v, proxy, weight, bias, merge, u_bias = (
        t.detach() for t in rand_attention_inputs((2, 7, 6, 3), 2, DIRECTIONS)
    )
    u_open = torch.full_like(u_bias, 60.0)
    out = attention_reference(q, k, v, proxy, weight, bias, merge, u_open, DIRECTIONS, None)
    lo, hi = v.amin(dim=(1, 2), keepdim=True), v.amax(dim=(1, 2), keepdim=True)
    assert (out >= lo - 1e-12).all() and (out <= hi + 1e-12).all()
    const = torch.full_like(v, 0.7)
    out = gspn_attention(q, k, const, proxy, weight, bias, merge, u_open, DIRECTIONS, 3, backend="kernel")
    torch.testing.assert_close(out, const, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("directions", SUBSETS, ids="-".join)
@pytest.mark.parametrize("chunk", [None, 2])
def test_every_direction_subset_matches_reference(device, directions, chunk):
    """On CUDA (where a GPU is) the CUDA lane kernels, which the CPU suite runs under the host
    emulation (tests/test_cuda_emulation.py)."""
    ins = rand_attention_inputs((2, 5, 7, 3), 2, directions, device=device)
    check_against_reference(ins, directions, chunk, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "shape, S",
    [((1, 17, 23, 5), 3), ((2, 1, 9, 3), 1), ((1, 9, 1, 2), 2), ((1, 1, 1, 1), 1), ((3, 4, 2, 9), 5)],
    ids=str,
)
@pytest.mark.parametrize("chunk", [None, 1, 3, 4])
def test_odd_and_degenerate_shapes(shape, S, chunk):
    ins = rand_attention_inputs(shape, S, DIRECTIONS, seed=1)
    check_against_reference(ins, DIRECTIONS, chunk, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("chunk", [None, 4])
def test_tasks_sharing_a_batch_element(chunk, dtype, two_torch_threads):
    """B=3, E=19 on a 13 x 11 grid: units of 8 (float32) or 4 (float64) channels give every batch
    element whole units and a partly filled one (padding lanes), and the backward's two tasks split
    batch element 1 between them: their partial proxy, weight, bias, merge and u_bias gradients are
    added correctly, and two runs give bit-identical gradients."""
    ins64 = rand_attention_inputs((3, 13, 11, 19), 4, DIRECTIONS, seed=11)
    ins = [t.detach().to(dtype).requires_grad_() for t in ins64]
    tol = 5e-5 if dtype == torch.float32 else 1e-10
    check_against_reference(ins, DIRECTIONS, chunk, rtol=tol, atol=tol)
    go = torch.randn(3, 13, 11, 19, generator=torch.Generator().manual_seed(2), dtype=dtype)
    first, second = (
        grads(gspn_attention(*ins, DIRECTIONS, chunk, backend="kernel"), ins, go) for _ in range(2)
    )
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"grad {name} differs between two identical runs"


def test_float32_against_float64_reference():
    ins64 = rand_attention_inputs((2, 12, 9, 6), 3, DIRECTIONS, seed=7)
    ins = [t.detach().float().requires_grad_() for t in ins64]
    out = gspn_attention(*ins, DIRECTIONS, None, backend="kernel")
    torch.testing.assert_close(
        out.double(), attention_reference(*ins64, DIRECTIONS, None), rtol=2e-5, atol=2e-5
    )


def test_strided_inputs():
    """Non-contiguous views (q, k, v, proxy transposed grids, weight a transposed view) are accepted."""
    directions = ("t2b", "l2r")
    B, H, W, E, S, K = 2, 6, 5, 3, 2, 2
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, W, H, E, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    proxy = torch.randn(B, W, H, S, generator=g).transpose(1, 2).requires_grad_()
    weight = (torch.randn(S, K * 3 * E, generator=g) * 0.5).t().requires_grad_()
    bias = torch.randn(K * 3 * E, generator=g).requires_grad_()
    merge = torch.softmax(torch.randn(K, E, generator=g), 0).requires_grad_()
    u_bias = torch.randn(E, generator=g).requires_grad_()
    assert not (v.is_contiguous() or proxy.is_contiguous() or weight.is_contiguous())
    check_against_reference(
        [q, k, v, proxy, weight, bias, merge, u_bias], directions, 4, rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("directions", [("t2b",), ("l2r", "b2t"), DIRECTIONS], ids="-".join)
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck_float64(device, directions, chunk):
    ins = rand_attention_inputs((2, 4, 3, 2), 2, directions, seed=2, device=device)

    def f(*t):
        return gspn_attention(*t, directions, chunk, backend="kernel")

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_float64_reference():
    ins = rand_attention_inputs((1, 3, 4, 2), 2, ("b2t", "r2l"), seed=4)
    assert torch.autograd.gradcheck(
        lambda *t: attention_reference(*t, ("b2t", "r2l"), 2), ins, eps=1e-6, atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk", [None, 4])
def test_low_precision_error_budget(dtype, chunk):
    """The 16-bit kernel errs at most about twice as much as the reference computed by PyTorch in that
    dtype, both against a float32 result, for the output and all eight gradients."""
    shape = (2, 17, 13, 5)
    ins64 = rand_attention_inputs(shape, 3, DIRECTIONS, seed=4, scale=2.0)
    go = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def run(dtype, kernel):
        ins = [t.detach().to(dtype).requires_grad_() for t in ins64]
        if kernel:
            out = gspn_attention(*ins, DIRECTIONS, chunk, backend="kernel")
        else:
            out = attention_reference(*ins, DIRECTIONS, chunk)
        assert out.dtype == dtype
        return [out, *grads(out, ins, go.to(dtype))]

    assert_error_budget(("out", *NAMES), run, dtype)


def test_opcheck():
    assert _build.load_cpu(), _build.build_error("cpu")
    op = torch.ops.gspn_lightning.attention_fwd.default
    for directions, chunk, S in [(list(DIRECTIONS), 0, 2), (["l2r"], 2, 1), (["b2t", "r2l"], 3, 3)]:
        ins = rand_attention_inputs((2, 5, 4, 3), S, directions, dtype=torch.float32, seed=8)
        torch.library.opcheck(op, (*ins, directions, chunk))


def test_torch_compile_fullgraph():
    ins = rand_attention_inputs((2, 6, 5, 3), 2, DIRECTIONS, dtype=torch.float32, seed=9)

    def f(q, k, v, proxy, *rest):
        return gspn_attention(q, k, v, proxy * 2, *rest, DIRECTIONS, 2, backend="kernel").square()

    eager = f(*ins)
    out = torch.compile(f, fullgraph=True)(*ins)
    torch.testing.assert_close(out, eager)
    go = torch.ones_like(out)
    for name, a, b in zip(NAMES, grads(out, ins, go), grads(eager, ins, go)):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"grad {n}: {m}")


def test_double_backward_is_refused():
    ins = rand_attention_inputs((1, 3, 4, 2), 2, ("t2b",), seed=10)
    y = gspn_attention(*ins, ("t2b",), backend="kernel")
    (gv,) = torch.autograd.grad(y.sum(), ins[2], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gv.sum().backward()


def test_forward_saves_only_its_inputs():
    """Nothing of 2E channels or of the taps' size is kept for the backward: only the eight inputs."""
    ins = rand_attention_inputs((2, 8, 6, 3), 2, DIRECTIONS, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        gspn_attention(*(t * 1 for t in ins), DIRECTIONS, backend="kernel")
    assert sorted(saved) == sorted(t.numel() for t in ins)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("GSPN_BACKEND", raising=False)


def test_backends(no_env, monkeypatch):
    """CPU: "auto" is the kernel; CUDA: :data:`CUDA_ATTENTION_DEFAULT` ("planes", the former
    composition, until a GPU run shows a kernel correct); "kernel" on CUDA is refused by name while the
    extension registers no CUDA kernel for the op.  Every path computes the definition."""
    ins = rand_attention_inputs((1, 5, 4, 3), 2, DIRECTIONS)
    ref = attention_reference(*ins, DIRECTIONS, 2)
    for backend in ("kernel", "planes", "reference", None):
        torch.testing.assert_close(
            gspn_attention(*ins, DIRECTIONS, 2, backend=backend), ref, rtol=1e-10, atol=1e-12
        )
    assert resolve_attention_backend(None, CPU) == "kernel"
    monkeypatch.setattr(_backend, "kernel_available", lambda device: True)  # as if a CUDA build loaded
    assert _backend.CUDA_ATTENTION_DEFAULT == "planes"
    assert resolve_attention_backend("auto", CUDA) == "planes"
    assert resolve_attention_backend("planes", CUDA) == "planes"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("gspn_lightning::attention_fwd", "CUDA"):
        with pytest.raises(RuntimeError, match="no attention kernel for cuda"):
            resolve_attention_backend("kernel", CUDA)
    monkeypatch.setenv("GSPN_BACKEND", "reference")
    assert resolve_attention_backend(None, CPU) == "reference"


def test_input_checking():
    ins = [t.detach() for t in rand_attention_inputs((1, 4, 3, 2), 2, ("t2b", "l2r"))]
    q, k, v, proxy, weight, bias, merge, u_bias = ins
    dirs = ("t2b", "l2r")
    with pytest.raises(ValueError, match="v must be 4-D"):
        gspn_attention(q, k, v[0], proxy, weight, bias, merge, u_bias, dirs)
    with pytest.raises(ValueError, match=r"weight must have shape \(12, 2\)"):
        gspn_attention(q, k, v, proxy, weight[:-1], bias, merge, u_bias, dirs)
    with pytest.raises(ValueError, match=r"k must have shape"):
        gspn_attention(q, k[:, :2], v, proxy, weight, bias, merge, u_bias, dirs)
    with pytest.raises(ValueError, match=r"merge must have shape \(2, 2\)"):
        gspn_attention(q, k, v, proxy, weight, bias, merge[:1], u_bias, dirs)
    with pytest.raises(TypeError, match="u_bias has dtype torch.float32"):
        gspn_attention(q, k, v, proxy, weight, bias, merge, u_bias.float(), dirs)
    with pytest.raises(ValueError, match="directions must be"):
        gspn_attention(q, k, v, proxy, weight, bias, merge, u_bias, ("t2b", "t2b"))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        gspn_attention(q, k, v, proxy, weight, bias, merge, u_bias, dirs, 0)
    with pytest.raises(TypeError, match="proxy must be a torch.Tensor"):
        gspn_attention(q, k, v, None, weight, bias, merge, u_bias, dirs)

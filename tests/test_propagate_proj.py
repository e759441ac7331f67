"""The fused propagation with the gate projection (``gspn_propagate_proj``): the kernel against its
definition (``project_gates`` then ``propagate_reference``) forward and in the gradients of all five
inputs, for every subset of directions, chunked and global, odd and non-square maps, one and several
proxy channels; float64 gradcheck; the 16-bit error budget; the per-task reductions (several tasks
sharing a batch element, run-to-run identical); the torch.library registration (opcheck,
torch.compile, double backward refused, the fake outputs' strides); what the forward saves; input
checking; and the mixer's three paths.  The CUDA kernels run on the CPU in tests/test_cuda_emulation.py."""

import pytest
import torch

from gspn_lightning.nn import GSPNMixer
from gspn_lightning.ops import (
    DIRECTIONS,
    GATE_FIELDS,
    _build,
    gspn_propagate,
    gspn_propagate_proj,
    project_gates,
    propagate_proj_reference,
)

from .conftest import DEVICES
from .test_ops import grads
from .test_propagate import SUBSETS, assert_error_budget

NAMES = ("x", "proxy", "weight", "bias", "merge")


def rand_proj_inputs(shape, S, directions, dtype=torch.float64, seed=0, scale=1.0, device="cpu"):
    """x, proxy, weight, bias, merge as leaf tensors; logits spread wide enough that taps differ."""
    B, C, H, W = shape
    R = len(directions) * len(GATE_FIELDS) * C
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    proxy = torch.randn(B, S, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(R, S, generator=g, dtype=torch.float64) * scale / S**0.5
    bias = torch.randn(R, generator=g, dtype=torch.float64) * scale
    merge = torch.rand(len(directions), C, generator=g, dtype=torch.float64) + 0.1
    return [t.to(device, dtype).requires_grad_() for t in (x, proxy, weight, bias, merge)]


def check_against_reference(ins, directions, chunk, rtol, atol):
    out = gspn_propagate_proj(*ins, directions, chunk, backend="kernel")
    ref = propagate_proj_reference(*ins, directions, chunk)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out)
    for name, a, b in zip(NAMES, grads(out, ins, go), grads(ref, ins, go)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("directions", SUBSETS, ids="-".join)
@pytest.mark.parametrize("chunk", [None, 2])
def test_every_direction_subset_matches_reference(device, directions, chunk):
    ins = rand_proj_inputs((2, 3, 5, 7), 2, directions, device=device)
    check_against_reference(ins, directions, chunk, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "shape, S", [((1, 1, 1, 1), 1), ((1, 2, 7, 4), 3), ((2, 2, 1, 5), 1), ((1, 2, 6, 1), 2), ((3, 2, 9, 2), 5)]
)
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_odd_and_degenerate_shapes(shape, S, chunk):
    ins = rand_proj_inputs(shape, S, DIRECTIONS, seed=1)
    check_against_reference(ins, DIRECTIONS, chunk, rtol=1e-10, atol=1e-10)


def test_long_lines():
    """Lines of 33 and 34 positions: the CPU kernel's long-line path (boundary positions apart)."""
    ins = rand_proj_inputs((1, 2, 34, 33), 2, DIRECTIONS, seed=13)
    check_against_reference(ins, DIRECTIONS, 5, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("chunk", [None, 5])
def test_tasks_sharing_a_batch_element(chunk, dtype, two_torch_threads):
    """B=3, C=19 on 19 x 21 planes: the CPU kernel's units of 8 (float32) or 4 (float64) channels
    give every batch element whole units and a partly filled one (padding lanes), and the backward's
    two tasks (2 threads) split batch element 1 between them: their partial proxy, weight and bias
    gradients are added correctly, and two runs give bit-identical gradients."""
    ins = [t.detach().to(dtype).requires_grad_() for t in rand_proj_inputs((3, 19, 19, 21), 4, DIRECTIONS, seed=11)]
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    check_against_reference(ins, DIRECTIONS, chunk, rtol=tol, atol=tol)
    go = torch.randn(3, 19, 19, 21, generator=torch.Generator().manual_seed(2), dtype=dtype)
    first, second = (grads(gspn_propagate_proj(*ins, DIRECTIONS, chunk, backend="kernel"), ins, go) for _ in range(2))
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"grad {name} differs between two identical runs"


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (1, 5, 40, 41)], ids=str)
def test_proxy_gradient_on_both_sides_of_the_lane_sum_threshold(shape):
    """The CPU backward keeps dL/dproxy per lane and pixel (summed over the lanes once per batch
    element) while those sums fit kLaneProxyBytes, and sums over the lanes per pixel at once on larger
    grids: a small grid takes the first path and a 40 x 41 one the second on every instruction set, with
    a chunk (first lines whose tap logits are skipped) and every direction."""
    ins = rand_proj_inputs(shape, 3, DIRECTIONS, seed=21)
    check_against_reference(ins, DIRECTIONS, 2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("directions", [("l2r",), ("r2l", "b2t")], ids="-".join)
@pytest.mark.parametrize("shape", [(2, 10, 18, 35), (1, 9, 37, 17)], ids=str)
def test_column_directions_on_planes_wider_than_a_transpose_block(shape, directions):
    """The CPU kernel's column directions run on copies of x, dL/dy and the proxy in the transposed
    pixel order, moved in blocks of 16 x 16 pixels, and their parts of y, dL/dx and dL/dproxy are
    transposed back: planes with partial blocks on both sides, several units per batch element
    (C > 4 float64 lanes), column directions alone and beside a row direction."""
    ins = rand_proj_inputs(shape, 3, directions, seed=17)
    check_against_reference(ins, directions, None, rtol=1e-10, atol=1e-10)
    check_against_reference(ins, directions, 4, rtol=1e-10, atol=1e-10)


def test_float32_strided_inputs():
    """Non-contiguous views (x and proxy transposed, weight a transposed view) are accepted."""
    directions = ("t2b", "l2r")
    B, C, H, W, S, K = 2, 4, 11, 6, 3, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, W, H, generator=g).transpose(-1, -2).requires_grad_()
    proxy = torch.randn(B, S, W, H, generator=g).transpose(-1, -2).requires_grad_()
    weight = (torch.randn(S, K * 6 * C, generator=g) * 0.5).t().requires_grad_()
    bias = torch.randn(K * 6 * C, generator=g).requires_grad_()
    merge = (torch.rand(K, C, generator=g) + 0.1).requires_grad_()
    assert not (x.is_contiguous() or proxy.is_contiguous() or weight.is_contiguous())
    check_against_reference([x, proxy, weight, bias, merge], directions, 4, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("directions", [("t2b",), ("l2r", "b2t"), DIRECTIONS], ids="-".join)
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck_float64(device, directions, chunk):
    ins = rand_proj_inputs((2, 2, 4, 3), 2, directions, seed=2, device=device)

    def f(*t):
        return gspn_propagate_proj(*t, directions, chunk, backend="kernel")

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 4])
def test_low_precision_error_budget(dtype, chunk):
    """FlashAttention's rule: the 16-bit kernel errs at most about twice as much as the reference
    computed by PyTorch in that dtype, both against a float32 result, for y and all five gradients."""
    shape = (2, 4, 33, 19)
    ins64 = rand_proj_inputs(shape, 3, DIRECTIONS, seed=4, scale=2.0)
    go = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def run(dtype, kernel):
        ins = [t.detach().to(dtype).requires_grad_() for t in ins64]
        if kernel:
            out = gspn_propagate_proj(*ins, DIRECTIONS, chunk, backend="kernel")
        else:
            out = propagate_proj_reference(*ins, DIRECTIONS, chunk)
        assert out.dtype == dtype
        return [out, *grads(out, ins, go.to(dtype))]

    assert_error_budget(("y", *NAMES), run, dtype)


def test_opcheck():
    assert _build.load_cpu(), _build.build_error("cpu")
    op = torch.ops.gspn_lightning.propagate_proj_fwd.default
    for directions, chunk, S in [(list(DIRECTIONS), 0, 2), (["l2r"], 2, 1), (["b2t", "r2l"], 3, 3)]:
        ins = rand_proj_inputs((2, 3, 5, 4), S, directions, dtype=torch.float32, seed=8)
        torch.library.opcheck(op, (*ins, directions, chunk))


def test_torch_compile_fullgraph():
    ins = rand_proj_inputs((2, 3, 6, 5), 2, DIRECTIONS, dtype=torch.float32, seed=9)

    def f(x, proxy, weight, bias, merge):
        return gspn_propagate_proj(x, proxy * 2, weight, bias, merge, DIRECTIONS, 2, backend="kernel").square()

    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    eager = f(*ins)
    # compiled afresh: inductor's on-disk caches key a graph without the op's fake implementation, so an
    # entry written by a checkout whose fakes had other strides would be reused and fail its stride checks
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        out = torch.compile(f, fullgraph=True)(*ins)
        torch.testing.assert_close(out, eager)
        go = torch.ones_like(out)
        for name, a, b in zip(NAMES, grads(out, ins, go), grads(eager, ins, go)):
            torch.testing.assert_close(a, b, msg=lambda m, n=name: f"grad {n}: {m}")


def test_double_backward_is_refused():
    ins = rand_proj_inputs((1, 2, 3, 4), 2, ("t2b",), seed=10)
    y = gspn_propagate_proj(*ins, ("t2b",), backend="kernel")
    (gx,) = torch.autograd.grad(y.sum(), ins[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_forward_saves_only_its_inputs():
    """Nothing of the logits' size is kept for the backward: only x, proxy, weight, bias and merge."""
    x, proxy, weight, bias, merge = rand_proj_inputs((2, 3, 8, 6), 2, DIRECTIONS, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        gspn_propagate_proj(x * 1, proxy * 1, weight * 1, bias * 1, merge * 1, DIRECTIONS, backend="kernel")
    assert sorted(saved) == sorted(t.numel() for t in (x, proxy, weight, bias, merge))


def test_fake_outputs_have_the_kernels_strides():
    """torch.compile traces the op with fake tensors whose strides are the kernels': the CUDA kernels
    (csrc/cuda/gspn_lanes_kernels.h, executed on the CPU by tests/test_cuda_emulation.py, which also
    covers their fallback for proxies of more than 16 channels) return y, dL/dx and dL/dproxy
    channels-last, and so does the CPU kernel (checked on real tensors too); the parameter gradients
    are contiguous on both."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert _build.load_cpu(), _build.build_error("cpu")
    ops = torch.ops.gspn_lightning
    dirs = ["t2b", "l2r"]
    with FakeTensorMode():
        for device in ("cuda", "cpu"):
            x, proxy = torch.empty(2, 3, 4, 5, device=device), torch.empty(2, 4, 4, 5, device=device)
            weight, bias = torch.empty(36, 4, device=device), torch.empty(36, device=device)
            merge = torch.empty(2, 3, device=device)
            y = ops.propagate_proj_fwd(x, proxy, weight, bias, merge, dirs, 0)
            grads = ops.propagate_proj_bwd(x, x, proxy, weight, bias, merge, dirs, 0)
            for t in (y, grads[0], grads[1]):
                assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous(), device
            assert all(t.is_contiguous() for t in grads[2:])
    # the CPU kernel's real outputs have the fakes' strides, for contiguous and channels-last inputs
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 4, 5).contiguous(memory_format=fmt)
        proxy = torch.randn(2, 4, 4, 5).contiguous(memory_format=fmt)
        weight, bias, merge = torch.randn(36, 4), torch.randn(36), torch.rand(2, 3)
        y = ops.propagate_proj_fwd(x, proxy, weight, bias, merge, dirs, 0)
        grads = ops.propagate_proj_bwd(x, x, proxy, weight, bias, merge, dirs, 0)
        for t in (y, grads[0], grads[1]):
            assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous(), fmt
        assert all(t.is_contiguous() for t in grads[2:])


def test_definition_is_projection_then_propagate():
    ins = [t.detach() for t in rand_proj_inputs((1, 2, 4, 5), 3, ("b2t", "l2r"), seed=9)]
    x, proxy, weight, bias, merge = ins
    gates = torch.einsum("rs,bshw->brhw", weight, proxy) + bias.view(1, -1, 1, 1)
    gates = gates.view(1, 2, 6, 2, 4, 5)
    torch.testing.assert_close(project_gates(proxy, weight, bias, 2), gates)
    expected = gspn_propagate(x, gates, merge, ("b2t", "l2r"), backend="reference")
    torch.testing.assert_close(gspn_propagate_proj(*ins, ("b2t", "l2r"), backend="reference"), expected)


def _bad_proj_cases():
    x, proxy, weight, bias, merge = (t.detach().float() for t in rand_proj_inputs((1, 2, 3, 4), 2, DIRECTIONS))
    return [
        ((x, proxy[:, :, :2], weight, bias, merge), {}, ValueError, "proxy"),
        ((x, proxy[0], weight, bias, merge), {}, ValueError, "proxy"),
        ((x, proxy, weight[:, :1], bias, merge), {}, ValueError, "weight"),
        ((x, proxy, weight[:-1], bias, merge), {}, ValueError, "weight"),
        ((x, proxy, weight, bias[:-1], merge), {}, ValueError, "bias"),
        ((x, proxy, weight, bias, merge[:, :1]), {}, ValueError, "merge"),
        ((x, proxy.double(), weight, bias, merge), {}, TypeError, "proxy"),
        ((x, proxy, weight.half(), bias, merge), {}, TypeError, "weight"),
        ((x, proxy, weight, bias.to("meta"), merge), {}, ValueError, "bias"),
        ((x, proxy, weight.numpy(), bias, merge), {}, TypeError, "weight"),
        ((x.long(), proxy, weight, bias, merge), {}, TypeError, "x"),
        ((x, proxy, weight, bias, merge), {"directions": ("t2b", "t2b", "l2r", "r2l")}, ValueError, "distinct"),
        ((x, proxy, weight, bias, merge), {"chunk_size": 0}, ValueError, "chunk_size"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_proj_cases())))
def test_bad_input_raises_clear_error(case):
    args, kwargs, exc, word = _bad_proj_cases()[case]
    with pytest.raises(exc, match=word):
        gspn_propagate_proj(*args, **kwargs)


@pytest.mark.parametrize("chunk", [None, 2])
def test_mixer_three_paths_agree(chunk):
    """The default mixer (projection fused into the op), the previous fused path (logits materialised)
    and the unfused composition: same output and parameter gradients, same state dict keys."""
    torch.manual_seed(0)
    mixer = GSPNMixer(6, d_inner=8, d_state=3, chunk_size=chunk).double()
    assert mixer.fused and mixer.fuse_gates
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    results = {}
    for fused, fuse_gates in [(True, True), (True, False), (False, True)]:
        mixer.fused, mixer.fuse_gates = fused, fuse_gates
        mixer.zero_grad()
        y = mixer(x)
        y.square().sum().backward()
        results[(fused, fuse_gates)] = (y.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()})
    y_ref, g_ref = results[(False, True)]
    for y, g in results.values():
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert "gates.weight" in mixer.state_dict() and mixer.gates.weight.shape == (4 * 6 * 8, 3, 1, 1)

"""The fused LayerNorm + GRN op (``gspn_lightning.ops.layer_norm_grn``, ``csrc/cpu/gspn_norm_cpu.cpp``)
against its definition, the :class:`LayerNorm2d` and :class:`GRN` modules composed: values and
gradients in float64 (and ``gradcheck``), float32 and bfloat16 tolerances, odd shapes, channels-last
and contiguous inputs, float32 parameters of a bfloat16 map (autocast), the backend choice, and
``torch.compile(fullgraph=True)`` through the fake implementation.  The CUDA kernels' bodies are run
under the host emulation in ``tests/test_cuda_emulation.py``."""

from __future__ import annotations

import pytest
import torch

from gspn_lightning.nn import GRN, LayerNorm2d
from gspn_lightning.nn.norm import norm_grn
from gspn_lightning.ops import kernel_available, layer_norm_grn

pytestmark = pytest.mark.skipif(not kernel_available("cpu"), reason="the CPU kernels did not build")

SHAPES = [(2, 5, 1, 37), (1, 13, 17, 23), (3, 8, 4, 4), (2, 20, 9, 1)]


def modules(C: int, seed: int = 0, dtype=torch.float64) -> tuple[LayerNorm2d, GRN]:
    torch.manual_seed(seed)
    ln, grn = LayerNorm2d(C), GRN(C)
    with torch.no_grad():  # away from the identity init, so every term is live
        for p in (*ln.parameters(), *grn.parameters()):
            p.copy_(torch.randn_like(p))
    return ln.to(dtype), grn.to(dtype)


def params(ln: LayerNorm2d, grn: GRN) -> list[torch.Tensor]:
    return [ln.weight, ln.bias, grn.gamma, grn.beta]


def grads(out, inputs, go):
    return torch.autograd.grad(out, inputs, go)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64_equals_the_composition(shape, channels_last):
    ln, grn = modules(shape[1])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=fmt).requires_grad_()
    out, ref = norm_grn(ln, grn, y, backend="kernel"), grn(ln(y))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(ref)
    inputs = [y, *params(ln, grn)]
    for name, a, b in zip(["y", "weight", "bias", "gamma", "beta"], grads(out, inputs, go), grads(ref, inputs, go),
                          strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda s, n=name: f"{n}: {s}")


def test_gradcheck():
    ln, grn = modules(7, seed=1)
    y = torch.randn(2, 7, 5, 3, dtype=torch.float64, requires_grad=True)
    ps = [p.detach().clone().requires_grad_() for p in params(ln, grn)]
    assert torch.autograd.gradcheck(lambda *t: layer_norm_grn(*t), (y, *ps))


def test_a_zero_channel_gets_zero_gradient():
    """A channel whose normalised map is 0 everywhere (weight 0, bias 0) has g = 0: finite gradients
    (the ``dg / g`` term is 0 there), equal to the composition's."""
    ln, grn = modules(6, seed=2)
    with torch.no_grad():
        ln.weight[2] = 0
        ln.bias[2] = 0
    y = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    out, ref = norm_grn(ln, grn, y, backend="kernel"), grn(ln(y))
    go = torch.randn_like(ref)
    for a, b in zip(grads(out, [y, *params(ln, grn)], go), grads(ref, [y, *params(ln, grn)], go), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_and_bfloat16_close_to_float64(dtype):
    """Against the float64 composition: the op's error is within that of the composition run in the
    same dtype (bfloat16: the op keeps the normalised map in float32, the composition rounds it)."""
    shape = (2, 24, 9, 11)
    ln64, grn64 = modules(shape[1], seed=3)
    ln, grn = modules(shape[1], seed=3, dtype=dtype)
    y64 = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = y64.to(dtype).requires_grad_()
    y64 = y.detach().double().requires_grad_()
    exact = grn64(ln64(y64))
    go = torch.randn_like(exact)
    out, comp = norm_grn(ln, grn, y, backend="kernel"), grn(ln(y))
    assert out.dtype == dtype
    scale = exact.abs().max()
    err_op, err_comp = (out.double() - exact).abs().max(), (comp.double() - exact).abs().max()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert err_op <= tol * scale and err_op <= 2 * err_comp + 1e-6 * scale
    g_exact = grads(exact, [y64, *params(ln64, grn64)], go)
    g_op = grads(out, [y, *params(ln, grn)], go.to(dtype))
    g_comp = grads(comp, [y, *params(ln, grn)], go.to(dtype))
    for name, a, c, e in zip(["y", "weight", "bias", "gamma", "beta"], g_op, g_comp, g_exact, strict=True):
        assert a.dtype == dtype
        s = e.abs().max()
        ea, ec = (a.double() - e).abs().max(), (c.double() - e).abs().max()
        assert ea <= max(tol * 10, 2 * ec / s) * s, f"{name}: {ea} vs composition {ec} (scale {s})"


def test_float32_parameters_of_a_bfloat16_map():
    """Under autocast the mixer's map is bfloat16 and the parameters float32: the op takes them as
    they are (no casts), returns a bfloat16 map and float32 parameter gradients."""
    ln, grn = modules(16, seed=4, dtype=torch.float32)
    y = torch.randn(2, 16, 6, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = norm_grn(ln, grn, y, backend="kernel")
    assert out.dtype == torch.bfloat16
    ref = grn(ln(y.detach().float().requires_grad_()))
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    gs = grads(out, [y, *params(ln, grn)], torch.ones_like(out))
    assert [g.dtype for g in gs] == [torch.bfloat16] + [torch.float32] * 4


def test_backends():
    """``"planes"`` and ``"reference"`` compose the modules (differentiable twice); ``"kernel"`` runs
    the op, whose backward is not differentiable again (a clear error)."""
    ln, grn = modules(5)
    y = torch.randn(1, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    for backend in ("planes", "reference"):
        out = norm_grn(ln, grn, y, backend=backend)
        assert out.grad_fn is not None and "GRN" in type(out.grad_fn).__name__
        (g,) = torch.autograd.grad(out.pow(2).sum(), y, create_graph=True)
        g.sum().backward()
    out = norm_grn(ln, grn, y, backend="kernel")
    (g,) = torch.autograd.grad(out.pow(2).sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_auto_resolves_per_device_type(monkeypatch):
    """"auto" is the op on the CPU and, on CUDA, :data:`CUDA_NORM_DEFAULT` ("planes": the modules
    composed, until a GPU run shows the CUDA kernels correct); flipping that constant flips it."""
    from gspn_lightning.ops import _backend

    monkeypatch.delenv("GSPN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "kernel_available", lambda device: True)  # as if a CUDA build loaded
    monkeypatch.setattr(_backend, "_has_kernel", lambda op, key: True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _backend.CUDA_NORM_DEFAULT == "planes"
    assert _backend.resolve_norm_backend(None, cpu) == _backend.resolve_norm_backend("auto", cpu) == "kernel"
    assert _backend.resolve_norm_backend("auto", cuda) == "planes"
    for backend in ("kernel", "planes", "reference"):
        assert _backend.resolve_norm_backend(backend, cuda) == backend
    monkeypatch.setattr(_backend, "CUDA_NORM_DEFAULT", "kernel")
    assert _backend.resolve_norm_backend("auto", cuda) == "kernel"


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_opcheck(channels_last):
    """The registration (schema, fake implementation with the kernel's strides, autograd) passes
    ``torch.library.opcheck``."""
    ln, grn = modules(6, seed=6, dtype=torch.float32)
    y = torch.randn(2, 6, 5, 3)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    ps = [p.detach().reshape(-1).clone().requires_grad_() for p in params(ln, grn)]
    op = torch.ops.gspn_lightning.layer_norm_grn_fwd.default
    torch.library.opcheck(op, (y.requires_grad_(), *ps, 1e-6, 1e-6))


def test_compiles_with_fullgraph():
    ln, grn = modules(9)
    y = torch.randn(2, 9, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)

    def f(t):
        return norm_grn(ln, grn, t, backend="kernel")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(y), f(y))


def test_empty_map():
    ln, grn = modules(4)
    y = torch.randn(0, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    out = norm_grn(ln, grn, y, backend="kernel")
    assert out.shape == y.shape
    out.sum().backward()
    assert y.grad.shape == y.shape


# --- the CUDA kernels (csrc/cuda/gspn_norm_kernels.h) under the host emulation (tests/cuda_emu) -------

# (shape, dtype, target CTAs): fewer channels than a warp's lanes, channels past a warp and not a multiple
# of 32, one pixel per batch element, one column; many channels (float64: fewer warps per CTA, one in
# the backward); a small CTA target (several pixels per warp, a partial last tile) and the GPU's.
EMU_CASES = [
    ((2, 5, 1, 37), torch.float64, 264),
    ((1, 45, 17, 23), torch.float64, 3),
    ((3, 8, 1, 1), torch.float64, 264),
    ((2, 37, 9, 1), torch.float64, 2),
    ((1, 3000, 1, 3), torch.float64, 264),
    ((2, 45, 7, 5), torch.float32, 3),
    ((2, 45, 7, 5), torch.bfloat16, 3),
]


@pytest.fixture(scope="module")
def emu():
    from . import cuda_emu

    cuda_emu.load()
    return torch.ops.gspn_cuda_emu


def emu_inputs(shape, dtype, param_dtype=None, seed=5):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    y = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.3).to(dtype)
    ps = [torch.randn(C, generator=g, dtype=torch.float64).to(param_dtype or dtype) for _ in range(4)]
    go = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return y.contiguous(memory_format=torch.channels_last), ps, go


@pytest.mark.parametrize(("shape", "dtype", "ctas"), EMU_CASES, ids=lambda v: _id(v))
def test_cuda_kernels_under_emulation(emu, shape, dtype, ctas):
    """The CUDA op's forward and backward equal the CPU kernel's (float64: to rounding; float32 and
    bfloat16: within their resolution) and the float64 composition."""
    y, ps, go = emu_inputs(shape, dtype)
    ops = torch.ops.gspn_lightning
    fwd = emu.layer_norm_grn_fwd(y, *ps, 1e-6, 1e-6, ctas)
    ref = ops.layer_norm_grn_fwd(y, *ps, 1e-6, 1e-6)
    assert fwd[0].is_contiguous(memory_format=torch.channels_last) and fwd[0].dtype == dtype
    bwd = emu.layer_norm_grn_bwd(go, y, *ps, *fwd[1:], 1e-6, ctas)
    bwd_ref = ops.layer_norm_grn_bwd(go, y, *ps, *ref[1:], 1e-6)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, a, b in zip(["out", "mean", "rstd", "gnorm", "dy", "dweight", "dbias", "dgamma", "dbeta"],
                          [*fwd, *bwd], [*ref, *bwd_ref], strict=True):
        scale = b.double().abs().max().clamp_min(1)
        assert (a.double() - b.double()).abs().max() <= tol * scale, name
    if dtype == torch.float64:  # and the composition of the modules, with autograd
        ln, grn = LayerNorm2d(shape[1]).double(), GRN(shape[1]).double()
        with torch.no_grad():
            for p, v in zip(params(ln, grn), ps, strict=True):
                p.copy_(v.view_as(p))
        yr = y.clone().requires_grad_()
        out = grn(ln(yr))
        torch.testing.assert_close(fwd[0], out, rtol=1e-10, atol=1e-10)
        expected = grads(out, [yr, *params(ln, grn)], go)
        for a, b in zip(bwd, expected, strict=True):
            torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-9, atol=1e-9)


def test_cuda_kernels_float32_parameters_of_a_bfloat16_map(emu):
    y, ps, go = emu_inputs((2, 40, 3, 5), torch.bfloat16, param_dtype=torch.float32)
    fwd = emu.layer_norm_grn_fwd(y, *ps, 1e-6, 1e-6, 264)
    ref = torch.ops.gspn_lightning.layer_norm_grn_fwd(y, *ps, 1e-6, 1e-6)
    bwd = emu.layer_norm_grn_bwd(go, y, *ps, *fwd[1:], 1e-6, 264)
    bwd_ref = torch.ops.gspn_lightning.layer_norm_grn_bwd(go, y, *ps, *ref[1:], 1e-6)
    assert [g.dtype for g in bwd] == [torch.bfloat16] + [torch.float32] * 4
    for a, b in zip([*fwd, *bwd], [*ref, *bwd_ref], strict=True):
        assert (a.double() - b.double()).abs().max() <= 2e-2 * b.double().abs().max().clamp_min(1)


def test_emulation_cases_reach_every_launch_path(emu):
    """The cases above run CTAs of 8 warps and of fewer (1 in a backward), several tiles per batch
    element, warps with several pixels, and a partial last tile."""
    plans = []  # (tiles, pixels per tile, warps, shared bytes)
    for shape, dtype, ctas in EMU_CASES:
        y = torch.empty(shape, dtype=dtype)
        plans += [(shape, emu.layer_norm_grn_plan(y, values, ctas)) for values in (1, 2)]
    assert any(p[2] == 8 for _, p in plans) and any(p[2] == 1 for _, p in plans)
    assert any(1 < p[2] < 8 for _, p in plans)
    assert any(p[0] > 1 for _, p in plans), "several tiles per batch element"
    assert any(p[1] > p[2] for _, p in plans), "warps with several pixels"
    assert any(s[2] * s[3] % p[1] != 0 and p[0] > 1 for s, p in plans), "a partial last tile"


def _id(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)

"""GSPN layers: mixer shapes and gradients on odd / non-square maps, the reach of local and global
layers and of single directions (by the gradient support of one output pixel), the token adapter,
and the small blocks (LayerNorm2d, GRN, DropPath, Mlp, GSPNBlock)."""

import pytest
import torch
import torch.nn.functional as F

from gspn_lightning.nn import GRN, DropPath, GSPNBlock, GSPNMixer, GSPNTokenMixer, LayerNorm2d, Mlp
from gspn_lightning.ops import DIRECTIONS


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.5) -> torch.nn.Module:
    """Random parameters everywhere (not the near-uniform gates of the init), in float64."""
    g = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def expected_reach(r, c, H, W, chunk, directions):
    """Pixels whose input can reach output pixel (r, c): for each direction, the lines of the same
    chunk group that come before it in scan order, within the +-distance cone of the three taps."""
    reach = torch.zeros(H, W, dtype=torch.bool)
    for d in directions:
        vertical = d in ("t2b", "b2t")
        length, width = (H, W) if vertical else (W, H)
        s0, t0 = (r, c) if vertical else (c, r)
        k = chunk or length
        for s in range(length):
            dist = s0 - s if d in ("t2b", "l2r") else s - s0
            if dist < 0 or s // k != s0 // k:
                continue
            for t in range(max(0, t0 - dist), min(width, t0 + dist + 1)):
                reach[(s, t) if vertical else (t, s)] = True
    return reach


def grad_support(mixer, shape, r, c):
    """Which input pixels the scan part (before LN/GRN, which GRN would make global) of output (r, c)
    depends on.  With ``dw_kernel=1`` everything else in the mixer is pointwise."""
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    mixer.propagate(x)[0, :, r, c].sum().backward()
    return x.grad[0].abs().sum(0) > 0


@pytest.mark.parametrize("shape", [(2, 8, 9, 6), (1, 8, 7, 5), (1, 8, 1, 5), (2, 8, 6, 1)])
@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_mixer_shapes_and_backward(shape, chunk):
    mixer = GSPNMixer(8, d_state=4, chunk_size=chunk)
    x = torch.randn(shape, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_mixer_defaults_and_validation():
    mixer = GSPNMixer(16)
    assert mixer.d_inner == 24 and mixer.d_state == 8 and mixer.directions == DIRECTIONS
    assert mixer.dwconv.kernel_size == (7, 7)
    assert mixer.gates.out_channels == 4 * 6 * 24  # three taps, lam, u, d per direction
    with pytest.raises(ValueError, match="directions"):
        GSPNMixer(8, directions=("t2b", "up"))
    with pytest.raises(ValueError, match="chunk_size"):
        GSPNMixer(8, chunk_size=0)
    with pytest.raises(ValueError, match="dw_kernel"):
        GSPNMixer(8, dw_kernel=4)


@pytest.mark.parametrize("r, c", [(4, 3), (5, 2), (0, 0), (8, 6)])
def test_local_layer_reaches_only_its_chunk(r, c):
    shape = (1, 4, 9, 7)
    mixer = randomize_(GSPNMixer(4, d_inner=6, d_state=3, chunk_size=2, dw_kernel=1))
    support = grad_support(mixer, shape, r, c)
    expected = expected_reach(r, c, 9, 7, 2, DIRECTIONS)
    assert torch.equal(support, expected)
    # nothing two or more lines away along either axis
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(7), indexing="ij")
    assert not support[((rows - r).abs() >= 2) | ((cols - c).abs() >= 2)].any()


def test_global_layer_reaches_everywhere():
    shape = (1, 4, 9, 7)
    mixer = randomize_(GSPNMixer(4, d_inner=6, d_state=3, chunk_size=None, dw_kernel=1))
    support = grad_support(mixer, shape, 4, 3)
    assert torch.equal(support, expected_reach(4, 3, 9, 7, None, DIRECTIONS))
    assert support.all()  # the four cones cover the image


def test_chunk_size_takes_effect():
    local = randomize_(GSPNMixer(4, d_state=3, chunk_size=2))
    glob = randomize_(GSPNMixer(4, d_state=3, chunk_size=None))
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    assert not torch.allclose(local(x), glob(x))
    # chunk >= the longest axis is the global scan
    wide = randomize_(GSPNMixer(4, d_state=3, chunk_size=8))
    torch.testing.assert_close(wide(x), glob(x))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_direction_flows_one_way(direction):
    H, W, r, c = 8, 7, 4, 3
    mixer = randomize_(GSPNMixer(4, d_inner=6, d_state=3, dw_kernel=1, directions=(direction,)))
    support = grad_support(mixer, (1, 4, H, W), r, c)
    assert torch.equal(support, expected_reach(r, c, H, W, None, (direction,)))
    downstream = {
        "t2b": support[r + 1 :],
        "b2t": support[:r],
        "l2r": support[:, c + 1 :],
        "r2l": support[:, :c],
    }
    assert not downstream[direction].any()  # nothing from pixels the scan visits later
    upstream = {
        "t2b": support[:r],
        "b2t": support[r + 1 :],
        "l2r": support[:, :c],
        "r2l": support[:, c + 1 :],
    }
    assert upstream[direction].any()


def test_full_mixer_is_local_while_grn_is_identity():
    """At init (GRN gamma = 0) the whole mixer, not only its scan part, is as local as its scans."""
    mixer = randomize_(GSPNMixer(4, d_inner=6, d_state=3, chunk_size=2, dw_kernel=1))
    torch.nn.init.zeros_(mixer.grn.gamma)
    x = torch.randn(1, 4, 9, 7, dtype=torch.float64, requires_grad=True)
    mixer(x)[0, :, 4, 3].sum().backward()
    assert torch.equal(x.grad[0].abs().sum(0) > 0, expected_reach(4, 3, 9, 7, 2, DIRECTIONS))


def test_token_mixer_round_trip():
    B, H, W, C = 2, 5, 7, 8
    tok = GSPNTokenMixer(C, d_state=4, chunk_size=2)
    img = GSPNMixer(C, d_state=4, chunk_size=2)
    img.load_state_dict(tok.state_dict())  # same parameters, interchangeable
    x = torch.randn(B, H * W, C, requires_grad=True)
    y = tok(x, (H, W))
    assert y.shape == (B, H * W, C)
    ref = img(x.detach().transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match="tokens"):
        tok(x, (H, W + 1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_layernorm2d_matches_layernorm(channels_last):
    """Contiguous and channels-last inputs give nn.LayerNorm's result per pixel (a channels-last
    output); a channels-last input is normalised in place of a view: no copy op runs."""
    from .dispatch_guard import OpRecorder

    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 6, 5, 3)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with OpRecorder() as rec:
        out = ln(x)
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert [r.name for r in rec.launches()] == ["aten.native_layer_norm.default"], rec.table()


def test_layernorm2d_autocast_keeps_16_bit_maps():
    """Under autocast a bfloat16 map gives a bfloat16 output (statistics in float32 inside the op, not on
    a float32 copy of the map), equal to the float32 result rounded; a float32 map is left to autocast."""
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ln(x.bfloat16())
        assert ln(x).dtype == torch.float32
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ln(x.bfloat16().float()), rtol=2e-2, atol=2e-2)


def test_grn():
    grn = GRN(4)
    x = torch.randn(2, 4, 5, 3)
    torch.testing.assert_close(grn(x), x)  # identity at init
    with torch.no_grad():
        grn.gamma.fill_(0.5)
        grn.beta.fill_(0.1)
    gx = x.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), 0.5 * x * nx + 0.1 + x)


def grn_formula(grn, x):
    """GRN as ConvNeXt-V2 writes it, gamma * (x * N) + beta + x, with autograd's backward (N in x's
    dtype: GRN takes its statistics in float64 for a float64 input)."""
    g = torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True)
    n = g / (g.mean(dim=1, keepdim=True) + grn.eps)
    return grn.gamma * (x * n) + grn.beta + x


@pytest.mark.parametrize("channels_last", [False, True])
def test_grn_gradients_match_formula(channels_last):
    """GRN (computed as x * (gamma N + 1) + beta, with its own backward) against
    gamma * (x * N) + beta + x: output and the gradients of x, gamma and beta, per-channel random
    parameters, float64, one channel of x all zeros (its norm is 0: the formula's gradient there is
    autograd's masked one); contiguous and channels-last input (the output keeps the layout)."""
    grn = randomize_(GRN(6), seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64, generator=gen)
    x[1, 2] = 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    go = torch.randn(2, 6, 5, 3, dtype=torch.float64, generator=gen)
    ref = grn_formula(grn, x)
    out = grn(x)
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    params = (x, grn.gamma, grn.beta)
    ref_grads = torch.autograd.grad(ref, params, go, retain_graph=True)
    for a, b in zip(torch.autograd.grad(out, params, go), ref_grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    # only some inputs needing a gradient
    (gx,) = torch.autograd.grad(grn(x), (x,), go)
    torch.testing.assert_close(gx, ref_grads[0])


def test_grn_double_backward():
    """A gradient of the gradient (create_graph=True) differentiates the formula: gradgradcheck passes."""
    grn = randomize_(GRN(3), seed=4)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(grn, (x,))
    torch.autograd.gradgradcheck(grn, (x,))


def test_grn_bf16_makes_no_float32_map_and_matches_the_float32_result():
    """A bfloat16 map stays bfloat16 through GRN, forward and backward (float32 only in the per-channel
    statistics), and agrees with the float32 computation to bfloat16's resolution."""
    from .dispatch_guard import OpRecorder

    grn = randomize_(GRN(8), seed=5).float()
    x32 = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    go = torch.randn(2, 8, 6, 5)
    x16 = x32.detach().bfloat16().requires_grad_()
    grn16 = GRN(8).bfloat16()
    grn16.load_state_dict(grn.state_dict())
    with OpRecorder() as rec:
        out16 = grn16(x16)
        out16.backward(go.bfloat16())
    assert out16.dtype == x16.grad.dtype == torch.bfloat16
    assert rec.of_dtype(torch.float32, x16.numel()) == [], rec.table()
    out32 = grn(x32)
    out32.backward(go)
    for a, b in ((out16, out32), (x16.grad, x32.grad), (grn16.gamma.grad, grn.gamma.grad)):
        assert (a.float() - b).abs().max() <= 3e-2 * b.abs().max()


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 2, 2)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(DropPath(0.0).train()(x), x)
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_mlp_and_block():
    mlp = Mlp(8)
    assert mlp.fc1.out_channels == 32 and isinstance(mlp.act, torch.nn.GELU)
    block = GSPNBlock(8, drop_path=0.1, chunk_size=2, d_state=4, d_inner=10, dw_kernel=3)
    assert block.chunk_size == 2 and block.mixer.d_inner == 10 and block.mixer.dwconv.kernel_size == (3, 3)
    x = torch.randn(2, 8, 7, 5, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    block.eval()
    torch.testing.assert_close(block(x), block(x))


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv2d_matches_conv2d(k, bias):
    """DepthwiseConv2d (its own CPU backward) against nn.Conv2d: output and all gradients, on an odd,
    non-square map smaller than the kernel along one side, in float64; gradcheck and double backward."""
    from gspn_lightning.nn import DepthwiseConv2d

    torch.manual_seed(0)
    conv = DepthwiseConv2d(5, k, bias=bias).double()
    ref = torch.nn.Conv2d(5, 5, k, padding=k // 2, groups=5, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(3, 5, 4, 9, dtype=torch.float64, requires_grad=True)
    go = torch.randn(3, 5, 4, 9, dtype=torch.float64)
    y, yr = conv(x), ref(x)
    torch.testing.assert_close(y, yr)
    params = [x, *conv.parameters()]
    grads = torch.autograd.grad(y, params, go)
    grads_ref = torch.autograd.grad(yr, [x, *ref.parameters()], go)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda x: conv(x), (x,))
    torch.autograd.gradgradcheck(lambda x: conv(x), (x,))
    with torch.no_grad():
        torch.testing.assert_close(conv(x), yr)

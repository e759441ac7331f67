"""GSPN-2's compact propagation (``MixerOptions.d_prop``): the option's validation, fewer gate maps per
pixel, the compact path against its float64 definition (project into ``d_prop`` channels, the pure
PyTorch propagation reference, lift back) for each of the mixer's three paths, gradients (gradcheck),
and the option reached from a GSPN-DiT's ``mixer`` dict with both blocks."""

import pytest
import torch
import torch.nn.functional as F

from gspn_lightning.models import create_model
from gspn_lightning.models.gspn_dit import ReleaseMixer
from gspn_lightning.nn import GSPNMixer, MixerOptions
from gspn_lightning.ops import GATE_FIELDS, propagate_reference


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.4) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def compact_definition(m: GSPNMixer, x: torch.Tensor) -> torch.Tensor:
    """What ``m.propagate`` computes with ``d_prop``, term by term: features, proxy, the projection into
    the compact space, the gates of its channels, the reference propagation, the lift back."""
    feats = F.silu(F.conv2d(F.conv2d(x, m.in_proj.weight, m.in_proj.bias), m.dwconv.weight, m.dwconv.bias,
                            padding=m.dwconv.kernel_size[0] // 2, groups=m.d_inner))  # fmt: skip
    p = F.conv2d(feats, m.proxy.weight, m.proxy.bias)
    xc = F.conv2d(feats, m.prop_down.weight, m.prop_down.bias)  # (B, d_prop, H, W)
    B, _, H, W = x.shape
    g = F.conv2d(p, m.gates.weight, m.gates.bias).view(B, len(m.directions), len(GATE_FIELDS), m.d_prop, H, W)
    merge = torch.softmax(m.merge_logits.float(), dim=0).to(x.dtype)  # the mixer's softmax runs in float32
    y = propagate_reference(xc, g, merge, m.directions, m.chunk_size)
    return F.conv2d(y, m.prop_up.weight, m.prop_up.bias)  # (B, d_inner, H, W)


def test_option_validation():
    assert MixerOptions().d_prop is None and MixerOptions(d_prop="4").d_prop == 4
    assert MixerOptions.build({"d_prop": 4}).as_dict()["d_prop"] == 4
    for bad in (0, -2, True):
        with pytest.raises(ValueError, match="d_prop"):
            MixerOptions(d_prop=bad)
    with pytest.raises(ValueError, match="d_prop must be below d_inner=8"):
        GSPNMixer(6, d_inner=8, d_prop=8)
    with pytest.raises(ValueError, match="d_prop must be below the width 16"):
        ReleaseMixer(16, d_prop=16)
    plain = GSPNMixer(6, d_inner=8)
    assert plain.prop_down is None and plain.prop_up is None and plain.d_prop == 8


def test_fewer_gate_maps():
    """K * 6 * d_prop gate maps per pixel instead of K * 6 * d_inner, and a merge over d_prop channels."""
    m = GSPNMixer(6, d_inner=8, d_state=3, d_prop=2)
    assert m.gates.out_channels == 4 * 6 * 2 and m.merge_logits.shape == (4, 2)
    assert (m.prop_down.in_channels, m.prop_down.out_channels) == (8, 2)
    assert (m.prop_up.in_channels, m.prop_up.out_channels) == (2, 8)
    assert "d_prop=2" in repr(m)
    r = ReleaseMixer(16, d_state=2, d_prop=4)  # the release block's path is d_prop wide: no extra layers
    assert r.in_proj.out_channels == 4 and r.out_conv.in_channels == 4 and r.gates.out_channels == 4 * 6 * 4
    assert r.prop_down is None and r.options.d_prop == 4


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("fused, fuse_gates", [(True, True), (True, False), (False, True)])
def test_compact_path_matches_its_definition(chunk, fused, fuse_gates):
    m = randomize_(GSPNMixer(6, d_inner=8, d_state=3, d_prop=3, chunk_size=chunk, fused=fused, fuse_gates=fuse_gates))
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    out, ref = m.propagate(x), compact_definition(m, x)
    assert out.shape == (2, 8, 7, 5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = [x, *m.parameters()]
    names = ["x", *(n for n, _ in m.named_parameters())]
    used = [(n, p) for n, p in zip(names, params) if p.requires_grad and not n.startswith(("norm", "grn", "out_proj"))]
    ga = torch.autograd.grad(out, [p for _, p in used], go)
    gb = torch.autograd.grad(ref, [p for _, p in used], go)
    for (name, _), a, b in zip(used, ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda msg, n=name: f"{n}: {msg}")
        assert a.abs().sum() > 0, name


def test_gradcheck():
    m = randomize_(GSPNMixer(4, d_inner=6, d_state=2, d_prop=2, dw_kernel=3, chunk_size=2))
    x = torch.randn(1, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", ["release", "compact"])
def test_gspn_dit_reaches_the_option(block):
    """``model_kwargs.mixer.d_prop`` (what a config sets) builds every block's mixer compact."""
    torch.manual_seed(0)
    m = create_model("gspn_dit_s_2", hidden_size=32, depth=2, num_classes=3, block=block, mixer={"d_prop": 8})
    assert m.mixer_options.d_prop == 8
    assert all(b.mixer.gates.out_channels == 4 * 6 * 8 for b in m.blocks())
    for p in m.final.parameters():
        torch.nn.init.normal_(p, std=0.1)
    out = m(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([0, 1]))
    assert out.shape == (2, 8, 8, 8)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    full = create_model("gspn_dit_s_2", hidden_size=32, depth=2, num_classes=3, block=block)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in full.parameters())

"""The SD-XL swap's layer on the fused attention op (issue 25, item 1): :class:`GSPNSelfAttention`
gives the output and gradients of its former forward (copied below: ``cat(v, ones)`` through one
``gspn_propagate`` with a materialised ``(B, K, 6, 2E, H, W)`` gate tensor), keeps its state dict, and,
under the op recorder (``tests/dispatch_guard.py``), allocates nothing of ``2E`` channels and no
tensor of more than 4 times ``v``'s size in its forward and backward; the same guard catches the former
forward."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from gspn_lightning.models.sdxl import GSPNSelfAttention
from gspn_lightning.ops import gspn_propagate, gspn_scan, propagate_reference

from .dispatch_guard import OpRecorder
from .test_ops import grads

QUERY_DIM, HEADS, DIM_HEAD = 40, 2, 24
E = HEADS * DIM_HEAD  # 48: 2E = 96 is no other size in the layer
B, H, W = 2, 12, 10


def former_forward(layer: GSPNSelfAttention, hidden_states: torch.Tensor) -> torch.Tensor:
    """GSPNSelfAttention.forward before the fused op (copied from models/sdxl.py as it was)."""
    Bh, N, _ = hidden_states.shape
    Hh, Wh = layer.spatial_size

    def grid(t):
        return t.transpose(1, 2).reshape(Bh, -1, Hh, Wh).contiguous()

    q, k, v = (grid(p(hidden_states)) for p in (layer.to_q, layer.to_k, layer.to_v))
    Eh, K = layer.inner_dim, len(layer.directions)
    proxy = layer.proxy(hidden_states).transpose(1, 2)
    weight = layer.gates.weight.expand(Bh, -1, -1)
    taps = torch.baddbmm(layer.gates.bias.view(1, -1, 1), weight, proxy).view(Bh, K, 3, 1, Eh, Hh, Wh)
    gates = v.new_empty(Bh, K, 6, 2, Eh, Hh, Wh)
    gates[:, :, :3] = taps
    gates[:, :, 3] = k.view(Bh, 1, 1, Eh, Hh, Wh)
    gates[:, :, 4, 0] = (q + layer.u_bias.view(1, Eh, 1, 1)).view(Bh, 1, Eh, Hh, Wh)
    gates[:, :, 4, 1] = 40.0
    gates[:, :, 5] = 0
    gates = gates.view(Bh, K, 6, 2 * Eh, Hh, Wh)
    x = torch.cat([v, torch.ones_like(v)], dim=1)
    logits = layer.merge_logits
    merge = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=0)
    merge = merge.to(v.dtype).repeat(1, 2)
    if layer.fused:
        y = gspn_propagate(x, gates, merge, layer.directions, layer.chunk_size, backend=layer.backend)
    else:
        y = propagate_reference(
            x,
            gates,
            merge,
            layer.directions,
            layer.chunk_size,
            scan=lambda *a: gspn_scan(*a, backend=layer.backend),
        )
    num, den = y.split(Eh, dim=1)
    out = (num / den.clamp_min(torch.finfo(den.dtype).tiny)).flatten(2).transpose(1, 2)
    for m in layer.to_out:
        out = m(out)
    return out / layer.rescale_output_factor


def make_layer(dtype=torch.float64, seed=0, **options) -> GSPNSelfAttention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=QUERY_DIM, heads=HEADS, dim_head=DIM_HEAD)
    layer = GSPNSelfAttention(attn, d_state=4, **options).to(dtype)
    with torch.no_grad():  # away from the near-uniform initialisation, so that the taps differ
        layer.gates.weight.normal_(0, 0.5)
        layer.gates.bias.normal_(0, 0.5)
        layer.merge_logits.normal_(0, 1)
    layer.spatial_size = (H, W)
    return layer


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("directions", [("t2b", "b2t", "l2r", "r2l"), ("l2r", "b2t")], ids="-".join)
def test_output_and_gradients_unchanged(fused, chunk_size, directions):
    layer = make_layer(chunk_size=chunk_size, directions=directions, fused=fused)
    x = torch.randn(B, H * W, QUERY_DIM, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.parameters()]
    out = layer(x)
    old = former_forward(layer, x)
    torch.testing.assert_close(out, old, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    for i, (a, b) in enumerate(zip(grads(out, params, go), grads(old, params, go))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)], ids=str)
def test_low_precision_output_close_to_former(dtype, tol):
    layer = make_layer(dtype=dtype, chunk_size=4)
    x = torch.randn(B, H * W, QUERY_DIM).to(dtype)
    with torch.no_grad():
        out, old = layer(x), former_forward(layer, x)
        exact = former_forward(make_layer(chunk_size=4), x.double())
    assert out.dtype == dtype
    scale = exact.abs().max()
    err_new, err_old = (out.double() - exact).abs().max(), (old.double() - exact).abs().max()
    assert err_new <= max(2 * err_old, tol * scale), (err_new, err_old)


def test_state_dict_unchanged():
    layer = make_layer(dtype=torch.float32)
    K, S = 4, 4
    expected = {
        "to_q.weight": (E, QUERY_DIM),
        "to_k.weight": (E, QUERY_DIM),
        "to_v.weight": (E, QUERY_DIM),
        "to_out.0.weight": (QUERY_DIM, E),
        "to_out.0.bias": (QUERY_DIM,),
        "proxy.weight": (S, QUERY_DIM),
        "proxy.bias": (S,),
        "gates.weight": (K * 3 * E, S),
        "gates.bias": (K * 3 * E,),
        "merge_logits": (K, E),
        "u_bias": (E,),
    }
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected


def violations(rec: OpRecorder, numel_v: int) -> list:
    """Ops that returned a tensor with a dimension of 2E, or of more than 4 times v's elements."""
    return [
        r
        for r in rec.launches()
        if r.max_numel > 4 * numel_v or any(2 * E in shape for shape, _, _ in r.outputs)
    ]


def record(fn, layer, x) -> OpRecorder:
    go = torch.randn(B, H * W, QUERY_DIM)
    with OpRecorder() as rec:
        with rec.phase("fwd"):
            out = fn(layer, x)
        with rec.phase("bwd"):
            out.backward(go)
    return rec


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_layer_allocates_nothing_of_2e_channels(chunk_size):
    """The swapped layer's forward and backward (float32, the CPU kernel) make no tensor of 2E channels
    and none above 4 maps of v's size (the former forward made a gate tensor of 48 E maps and
    ``cat(v, ones)``); the guard is shown to bite on the former forward."""
    layer = make_layer(dtype=torch.float32, chunk_size=chunk_size)
    x = torch.randn(B, H * W, QUERY_DIM, requires_grad=True)
    numel_v = B * H * W * E
    rec = record(lambda m, t: m(t), layer, x)
    bad = violations(rec, numel_v)
    assert not bad, rec.table(records=bad)
    assert rec.counts("fwd")["gspn_lightning.attention_fwd"] == 1
    assert rec.counts("bwd")["gspn_lightning.attention_bwd"] == 1
    former = violations(record(former_forward, layer, x), numel_v)
    assert any(r.max_numel >= 48 * numel_v for r in former)  # the (B, K, 6, 2E, H, W) gates
    assert any(r.packet == "aten.cat" for r in former)  # cat(v, ones)

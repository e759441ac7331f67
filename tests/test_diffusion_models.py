"""The generation model families: GSPN-DiT and the DiT baseline (shapes, any grid, initialisation,
conditioning, local/global blocks, sizes)."""

from __future__ import annotations

import pytest
import torch

from gspn_lightning.models import create_model, list_models
from gspn_lightning.models.gspn_dit import GSPNDiT
from gspn_lightning.nn.embeddings import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d

TINY = {
    "gspn_dit": dict(name="gspn_dit_s_2", hidden_size=32, depth=2, num_classes=10, mixer={"backend": "reference"}),
    "dit": dict(name="dit_s_2", hidden_size=32, depth=2, num_heads=4, num_classes=10),
}


def tiny(kind: str, **kw):
    cfg = {**TINY[kind], **kw}
    return create_model(cfg.pop("name"), **cfg)


def test_registry_names():
    names = set(list_models("diffusion"))
    for size in ("s", "b", "l", "xl"):
        assert {f"gspn_dit_{size}_2", f"gspn_dit_{size}_4"} <= names
        assert {f"dit_{size}_2", f"dit_{size}_4", f"dit_{size}_8"} <= names


@pytest.mark.parametrize(
    "name, params_m",
    [("dit_xl_2", 674.83), ("dit_b_2", 130.32), ("gspn_dit_b_2", 119.61), ("gspn_dit_xl_2", 597.41)],
)
def test_sizes_on_meta(name, params_m):
    """DiT's published sizes come out exactly (675M for XL/2); GSPN-DiT's are recorded in docs."""
    with torch.device("meta"):
        m = create_model(name)
    assert sum(p.numel() for p in m.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


@pytest.mark.parametrize("kind", ["gspn_dit", "dit"])
@pytest.mark.parametrize("hw, patch", [((16, 16), 2), ((8, 12), 2), ((12, 20), 4)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_any_grid_shapes_and_backward(kind, hw, patch, learn_sigma):
    torch.manual_seed(0)
    m = tiny(kind, patch_size=patch, learn_sigma=learn_sigma, in_channels=3)
    x = torch.randn(2, 3, *hw)
    out = m(x, torch.tensor([0, 999]), torch.tensor([1, 10]))  # label 10 = the null class
    assert out.shape == (2, 6 if learn_sigma else 3, *hw)
    # adaLN-Zero: the untrained model predicts exactly 0, and gradients reach the output layer
    assert torch.equal(out, torch.zeros_like(out))
    out.square().add(out).sum().backward()
    assert m.final.linear.weight.grad is not None and m.final.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["gspn_dit", "dit"])
def test_conditioning_changes_the_output(kind):
    torch.manual_seed(0)
    m = tiny(kind)
    for p in m.final.parameters():  # leave the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=0.1)
    m.eval()
    x = torch.randn(1, 4, 8, 8)
    base = m(x, torch.tensor([10]), torch.tensor([3]))
    assert not torch.allclose(base, m(x, torch.tensor([500]), torch.tensor([3])))  # timestep matters
    assert not torch.allclose(base, m(x, torch.tensor([10]), torch.tensor([4])))  # class matters
    forced = m(x, torch.tensor([10]), torch.tensor([3]), force_drop=torch.tensor([True]))
    torch.testing.assert_close(forced, m(x, torch.tensor([10]), torch.tensor([10])))  # null class


def test_adaln_blocks_start_as_identity_and_condition_every_block():
    """``adaln_blocks``: each block's residual branch is gated by c and starts closed (adaLN-Zero), so
    the model first computes exactly what the same weights compute with the gates fully closed; once
    the modulation is trained, the timestep reaches the blocks themselves, not only the input tokens."""
    torch.manual_seed(0)
    m = tiny("gspn_dit", adaln_blocks=True, in_channels=1)
    assert all(b.ada is not None for b in m.blocks())
    assert all(torch.count_nonzero(b.ada[1].weight) == 0 for b in m.blocks())
    feats = {}
    m.mid_block.register_forward_hook(lambda mod, inp, out: feats.__setitem__("mid", (inp[0], out)))
    x = torch.randn(2, 1, 8, 12)
    m(x, torch.tensor([5, 900]), torch.tensor([1, 2]))
    inp, out = feats["mid"]
    torch.testing.assert_close(out, inp)  # gate 0: the block is the identity
    for b in m.blocks():
        torch.nn.init.normal_(b.ada[1].weight, std=0.1)
    m(x, torch.tensor([5, 900]), torch.tensor([1, 2]))
    assert not torch.allclose(feats["mid"][1], feats["mid"][0])
    # the same tokens at two timesteps: the middle block's update differs (it sees c itself)
    h = torch.randn(1, 32, 4, 6)
    c1, c2 = m.t_embed(torch.tensor([5])), m.t_embed(torch.tensor([900]))
    assert not torch.allclose(m.mid_block(h, c=c1), m.mid_block(h, c=c2))
    with pytest.raises(ValueError, match="condition c"):
        m.mid_block(h)
    plain = tiny("gspn_dit", in_channels=1)
    assert all(b.ada is None for b in plain.blocks())
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in plain.parameters()) == len(
        m.blocks()
    ) * (32 * 96 + 96)


@pytest.mark.parametrize("kind", ["gspn_dit", "dit"])
def test_label_init_std(kind):
    torch.manual_seed(0)
    assert tiny(kind).y_embed.table.weight.std().item() == pytest.approx(0.02, rel=0.3)  # DiT's
    assert tiny(kind, label_init_std=1.0).y_embed.table.weight.std().item() == pytest.approx(1.0, rel=0.3)
    with pytest.raises(ValueError, match="init_std"):
        LabelEmbedder(10, 8, init_std=0.0)


def test_label_dropout_and_validation():
    emb = LabelEmbedder(5, 8, dropout=0.5).train()
    torch.manual_seed(0)
    y = torch.zeros(4000, dtype=torch.long)
    out = emb(y)
    dropped = (out == emb.table.weight[5]).all(dim=1).float().mean().item()
    assert 0.45 < dropped < 0.55
    emb.eval()
    assert torch.equal(emb(y[:3]), emb.table.weight[[0, 0, 0]])
    with pytest.raises(ValueError, match="class labels must be in"):
        emb(torch.tensor([6]))
    with pytest.raises(ValueError, match="dropout"):
        LabelEmbedder(5, 8, dropout=1.0)


def test_timestep_embedding_distinguishes_steps():
    emb = TimestepEmbedder(16, freq_dim=9)
    f = emb.sinusoid(torch.tensor([0.0, 1.0, 999.0]))
    assert f.shape == (3, 9) and torch.all(f[:, -1] == 0)
    assert (f[0] - f[1]).abs().max() > 0.1 and (f[1] - f[2]).abs().max() > 0.1


def test_sincos_positions():
    pe = sincos_pos_embed_2d(8, 3, 5)
    assert pe.shape == (15, 8)
    assert len({tuple(r.tolist()) for r in pe}) == 15  # every position distinct
    # rows share the first half of channels, columns the second half
    grid = pe.view(3, 5, 8)
    assert torch.equal(grid[1, 0, :4], grid[1, 4, :4]) and torch.equal(grid[0, 2, 4:], grid[2, 2, 4:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2, 2)


def _far_influence(model: GSPNDiT) -> float:
    """|d out[0, :, 0, 0] / d x[0, :, -1, -1]|: does the far corner reach the first pixel?"""
    for p in model.final.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    out = model(x, torch.tensor([5]), torch.tensor([1]))
    (g,) = torch.autograd.grad(out[0, :, 0, 0].sum(), x)
    return g[0, :, -1, -1].abs().sum().item()


def test_local_and_global_blocks_take_effect():
    torch.manual_seed(0)
    kw = dict(patch_size=1, mixer={"dw_kernel": 1, "chunk_size": 2, "backend": "reference"})
    local = tiny("gspn_dit", global_blocks="none", **kw)
    assert local.chunk_sizes() == [2, 2, 2]
    assert _far_influence(local) == 0.0  # three local blocks cannot carry 15 lines
    torch.manual_seed(0)
    glob = tiny("gspn_dit", global_blocks=[1], **kw)
    assert glob.chunk_sizes() == [2, None, 2]
    assert _far_influence(glob) > 0.0
    default = tiny("gspn_dit", depth=6)
    assert default.chunk_sizes() == [2, 2, 2, 2, 2, None, None]  # the last two out blocks are global
    with pytest.raises(ValueError, match="out of range"):
        tiny("gspn_dit", global_blocks=[3])


def test_bad_inputs():
    m = tiny("gspn_dit")
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 4, 7, 8), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="even"):
        tiny("gspn_dit", depth=3)
    with pytest.raises(ValueError, match="divisible"):
        tiny("dit", num_heads=5)

"""The generation model families: GSPN-DiT (both blocks: the release's and the compact one) and the DiT
baseline (shapes, any grid, initialisation, conditioning, local/global blocks, sizes, saving and
loading across the two blocks)."""

from __future__ import annotations

import json

import pytest
import torch

from gspn_lightning.models import create_model, from_pretrained, list_models, save_pretrained
from gspn_lightning.models.gspn_dit import GSPNDiT, ReleaseMixer
from gspn_lightning.nn import GSPNMixer
from gspn_lightning.nn.embeddings import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d

TINY = {
    "gspn_dit": dict(name="gspn_dit_s_2", hidden_size=32, depth=2, num_classes=10, mixer={"backend": "reference"}),
    "gspn_dit_compact": dict(
        name="gspn_dit_s_2", hidden_size=32, depth=2, num_classes=10, mixer={"backend": "reference"}, block="compact"
    ),
    "dit": dict(name="dit_s_2", hidden_size=32, depth=2, num_heads=4, num_classes=10),
}
GSPN_KINDS = ["gspn_dit", "gspn_dit_compact"]


def tiny(kind: str, **kw):
    cfg = {**TINY[kind], **kw}
    return create_model(cfg.pop("name"), **cfg)


def test_registry_names():
    names = set(list_models("diffusion"))
    for size in ("s", "b", "l", "xl"):
        assert {f"gspn_dit_{size}_2", f"gspn_dit_{size}_4"} <= names
        assert {f"dit_{size}_2", f"dit_{size}_4", f"dit_{size}_8"} <= names


#: GSPN-DiT's parameters (M) per block kind, and the paper's (Table 5); docs/model_sizes.md
GSPN_DIT_PARAMS = {
    "gspn_dit_b_2": {"release": 144.85, "compact": 119.61, "paper": 137},
    "gspn_dit_l_2": {"release": 467.29, "compact": 384.86, "paper": 443},
    "gspn_dit_xl_2": {"release": 726.08, "compact": 597.41, "paper": 690},
}


def params_m(name: str, **kw) -> float:
    with torch.device("meta"):
        m = create_model(name, **kw)
    return sum(p.numel() for p in m.parameters()) / 1e6


@pytest.mark.parametrize("name, params", [("dit_xl_2", 674.83), ("dit_b_2", 130.32)])
def test_dit_sizes_on_meta(name, params):
    """DiT's published sizes come out exactly (675M for XL/2)."""
    assert params_m(name) == pytest.approx(params, abs=0.01)


def release_definition_params(D: int, depth: int, patch: int = 2, channels: int = 4, classes: int = 1000) -> int:
    """The parameters of the release's GSPN-DiT module definition (NVlabs/GSPN, generation), counted
    from its layer shapes: per block LayerNorm 2D, in-projection D^2, 7x7 depthwise conv with bias 50D,
    gate proxy D*s and the 24 D gate maps from it (s = D // 16, no biases), 4 merge weights, 1x1 output
    conv D^2, 3x3 depthwise 9D, out-projection D^2, and in every out block a long-skip linear 2D^2 + D;
    the patch embedding, timestep MLP (256 frequencies), label table (+ the null class), final norm and
    adaLN output layer (learned sigma: 2 * channels out)."""
    s = D // 16
    block = 2 * D + D * D + 50 * D + D * s + 24 * D * s + 4 + D * D + 9 * D + D * D
    out = patch * patch * 2 * channels
    rest = (patch * patch * channels * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D + 2 * D
    rest += D * 2 * D + 2 * D + D * out + out
    return (depth + 1) * block + depth // 2 * (2 * D * D + D) + rest


@pytest.mark.parametrize("name, sizes", list(GSPN_DIT_PARAMS.items()))
def test_gspn_dit_sizes_on_meta(name, sizes):
    """Both blocks' counts as docs/model_sizes.md records them; the release block (the default) within
    0.6 % of the release's own definition (biases and the per-channel merge) and within 6 % of the
    paper's rounded figures (the release's definition itself is 5 % above them)."""
    release = params_m(name)
    assert release == pytest.approx(sizes["release"], abs=0.01)
    assert params_m(name, block="compact") == pytest.approx(sizes["compact"], abs=0.01)
    with torch.device("meta"):
        m = create_model(name)
    D, depth = m.hidden_size, len(m.in_blocks) * 2
    ref = release_definition_params(D, depth) / 1e6
    assert 0 < release / ref - 1 < 0.006
    assert abs(release / sizes["paper"] - 1) < 0.06 and abs(ref / sizes["paper"] - 1) < 0.052


@pytest.mark.parametrize("kind", [*GSPN_KINDS, "dit"])
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


@pytest.mark.parametrize("kind", [*GSPN_KINDS, "dit"])
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


@pytest.mark.parametrize("kind", GSPN_KINDS)
def test_adaln_blocks_start_as_identity_and_condition_every_block(kind):
    """``adaln_blocks``: each block's residual branch is gated by c and starts closed (adaLN-Zero), so
    the model first computes exactly what the same weights compute with the gates fully closed; once
    the modulation is trained, the timestep reaches the blocks themselves, not only the input tokens.
    Both blocks."""
    torch.manual_seed(0)
    m = tiny(kind, adaln_blocks=True, in_channels=1)
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
    plain = tiny(kind, in_channels=1)
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


#: the state-dict keys of the compact block's mixer, as every checkpoint before ``block`` existed has them
COMPACT_MIXER_KEYS = {
    "in_proj.weight", "in_proj.bias", "dwconv.weight", "dwconv.bias", "proxy.weight", "proxy.bias",
    "gates.weight", "gates.bias", "merge_logits", "norm.weight", "norm.bias", "grn.gamma", "grn.beta",
    "out_proj.weight", "out_proj.bias",
}  # fmt: skip


def test_the_two_blocks():
    """The release block (default): the propagation, then a 1x1 conv, a 3x3 depthwise conv, the gate
    z * relu(z) and the out-projection, with d_state = D // 16; the compact block keeps its keys."""
    release, compact = tiny("gspn_dit"), tiny("gspn_dit_compact")
    assert release.block == "release" and compact.block == "compact"
    mixer = release.mid_block.mixer
    assert isinstance(mixer, ReleaseMixer) and type(compact.mid_block.mixer) is GSPNMixer
    assert mixer.d_state == 32 // 16 and mixer.out_conv.kernel_size == (1, 1) and mixer.out_conv.bias is None
    assert mixer.out_dconv.kernel_size == (3, 3) and mixer.out_dconv.groups == 32
    keys = {k.removeprefix("mid_block.mixer.") for k in compact.state_dict() if k.startswith("mid_block.mixer.")}
    assert keys == COMPACT_MIXER_KEYS
    # the release mixer's forward is its definition
    torch.manual_seed(1)
    x = torch.randn(2, 32, 4, 6)
    z = mixer.out_dconv(mixer.out_conv(mixer.propagate(x)))
    torch.testing.assert_close(mixer(x), mixer.out_proj(z * torch.relu(z)))
    with pytest.raises(ValueError, match="block must be one of"):
        tiny("gspn_dit", block="mamba")


def test_release_block_starts_with_a_visible_update():
    """The quadratic gate z * relu(z) squares small features: initialised as the release does (Xavier
    projections, PyTorch's depthwise convs), an untrained block's update is a few % of its input, not the
    ~1e-5 that the mixer's N(0, 0.02) everywhere would give."""
    torch.manual_seed(0)
    m = tiny("gspn_dit")
    h = torch.randn(4, 32, 8, 8)
    ratio = (m.mid_block(h) - h).std() / h.std()
    assert 0.005 < ratio < 0.5
    for mod in m.mid_block.mixer.modules():  # the mixer's own small init everywhere: the update vanishes
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.trunc_normal_(mod.weight, std=0.02)
    assert (m.mid_block(h) - h).std() / h.std() < ratio / 20


@pytest.mark.parametrize("adaln", [False, True])
def test_release_block_trains_every_parameter(adaln):
    """Every parameter of the release-block model gets a finite gradient, with the paper's additive
    conditioning and with adaLN-Zero blocks (the output layer and block gates opened)."""
    torch.manual_seed(0)
    m = tiny("gspn_dit", adaln_blocks=adaln, in_channels=1)
    for p in m.final.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for b in m.blocks():
        if b.ada is not None:
            torch.nn.init.normal_(b.ada[1].weight, std=0.1)
    out = m(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]))
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", GSPN_KINDS)
def test_save_and_load_each_block(kind, tmp_path):
    torch.manual_seed(0)
    m = tiny(kind).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([2])
    again = from_pretrained(save_pretrained(m, tmp_path / kind)).eval()
    assert again.block == m.block
    torch.testing.assert_close(again(x, t, y), m(x, t, y))


@pytest.mark.parametrize("saved, loaded", [("gspn_dit_compact", "gspn_dit"), ("gspn_dit", "gspn_dit_compact")])
def test_the_other_blocks_weights_are_one_clear_error(saved, loaded, tmp_path):
    """A checkpoint of one block loaded into the other: an error naming both blocks and the option, from
    load_state_dict (task checkpoints, EMA) and from a save_pretrained folder whose config lacks the
    block (folders written before the option existed are compact ones; the default is now release)."""
    src, dst = tiny(saved), tiny(loaded)
    with pytest.raises(ValueError, match=f"block='{src.block}', this model has block='{dst.block}'"):
        dst.load_state_dict(src.state_dict())
    wrapped = torch.nn.Sequential(dst)  # a prefix, as a task's "model." keys have
    with pytest.raises(ValueError, match=f"build it with block: {src.block}"):
        wrapped.load_state_dict(torch.nn.Sequential(src).state_dict())
    folder = save_pretrained(src, tmp_path / "saved")
    config = json.loads((folder / "config.json").read_text())
    if src.block == "compact":  # written before the option: no block in the config, so built as release
        del config["kwargs"]["block"]
    else:
        config["kwargs"]["block"] = "compact"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"block='{src.block}'.*build it with block: {src.block}"):
        from_pretrained(folder)

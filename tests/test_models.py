"""Classification backbones and the model registry: every name builds (full sizes on the meta device
only), parameter counts of GSPN-T/S/B, tiny models forward/backward on odd and non-square inputs,
the local/global assignment of blocks, and the parameter/MAC summary."""

import pytest
import torch

from gspn_lightning.models import create_model, list_models, model_entry
from gspn_lightning.models.gspn import GSPNClassifier, resolve_global_blocks
from gspn_lightning.models.summary import count_macs, summary_table

TARGET_PARAMS = {"gspn_t": 31.5e6, "gspn_s": 50.8e6, "gspn_b": 93.1e6}
TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), mixer={"d_state": 4}, num_classes=10)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_on_meta(name):
    with torch.device("meta"):
        model = create_model(name)
    assert n_params(model) > 0
    assert all(p.device.type == "meta" for p in model.parameters())


def test_registry():
    assert {"gspn_t", "gspn_s", "gspn_b"} <= set(list_models())
    assert list_models("classification") == ["gspn_b", "gspn_s", "gspn_t"]
    assert model_entry("gspn_t").builder is GSPNClassifier
    with pytest.raises(KeyError, match="gspn_t"):
        create_model("gspn_xxl")


@pytest.mark.parametrize("name", sorted(TARGET_PARAMS))
def test_param_counts(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    count = n_params(model)
    assert abs(count - TARGET_PARAMS[name]) / TARGET_PARAMS[name] < 0.03, count


@pytest.mark.parametrize("in_chans, size", [(1, (28, 28)), (3, (64, 48)), (3, (33, 17))])
def test_tiny_forward_backward(in_chans, size):
    model = create_model("gspn_t", in_chans=in_chans, **TINY)
    x = torch.randn(2, in_chans, *size)
    logits = model(x)
    assert logits.shape == (2, 10)
    logits.logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    feats = model.forward_features(x)
    assert feats.shape == (2, 128, -(-size[0] // 32), -(-size[1] // 32))


def test_headless_model_returns_features():
    model = create_model("gspn_s", **{**TINY, "num_classes": 0})
    assert model(torch.randn(1, 3, 32, 40)).shape == (1, 128)


def test_local_global_assignment():
    with torch.device("meta"):
        b, t, s = (create_model(n) for n in ("gspn_b", "gspn_t", "gspn_s"))
    stage3 = [None if j in (0, 1, 2, 3, 4, 5, 6, 13) else 2 for j in range(15)]
    assert b.chunk_sizes() == [[2] * 4, [2] * 4, stage3, [None] * 4]
    assert [blk.mixer.chunk_size for blk in b.stages[2].blocks] == stage3
    assert t.chunk_sizes() == [[2] * 2, [2] * 2, [None] * 7, [None] * 2]
    assert s.chunk_sizes() == [[2] * 5, [2] * 5, [2] * 10, [None] * 2]
    with torch.device("meta"):
        all_global = create_model("gspn_t", mixer={"chunk_size": None})
        chunk4 = create_model("gspn_t", mixer={"chunk_size": 4}, global_blocks=None)
    assert all(c is None for stage in all_global.chunk_sizes() for c in stage)
    assert all(c == 4 for stage in chunk4.chunk_sizes() for c in stage)


def test_reference_sizes():
    with torch.device("meta"):
        t, s, b = (create_model(n) for n in ("gspn_t", "gspn_s", "gspn_b"))
    for model, dim, depths, d_state, dpr in (
        (t, 96, (2, 2, 7, 2), 8, 0.2),
        (s, 108, (5, 5, 10, 2), 16, 0.4),
        (b, 120, (4, 4, 15, 4), 8, 0.5),
    ):
        assert model.dims == [dim, 2 * dim, 4 * dim, 8 * dim]
        assert tuple(len(stage.blocks) for stage in model.stages) == depths
        blocks = [blk for stage in model.stages for blk in stage.blocks]
        mixer = blocks[0].mixer
        assert mixer.d_inner == int(1.5 * dim) and mixer.d_state == d_state
        assert mixer.dwconv.kernel_size == (7, 7) and blocks[0].mlp.fc1.out_channels == 4 * dim
        assert blocks[0].drop_path.p == 0.0 and blocks[-1].drop_path.p == pytest.approx(dpr)


def test_global_blocks_validation():
    assert resolve_global_blocks(("all", None, [1], "none"), (2, 2, 3, 1)) == [{0, 1}, set(), {1}, set()]
    with pytest.raises(ValueError, match="one entry per stage"):
        resolve_global_blocks(("all",), (2, 2))
    with pytest.raises(ValueError, match="outside"):
        resolve_global_blocks(([0, 5], "all"), (2, 2))
    with pytest.raises(ValueError, match="'all'"):
        resolve_global_blocks(("some", "all"), (2, 2))


def test_mac_count_includes_scan():
    model = create_model("gspn_t", **{**TINY, "mixer": {"d_state": 4, "backend": "reference"}})
    total, scan = count_macs(model, (1, 3, 64, 48))
    # 4 MACs per element per direction, four directions, per stage: d_inner * h * w
    sizes = [(16, 12), (8, 6), (4, 3), (2, 2)]
    expected = sum(16 * int(1.5 * 16 * 2**i) * h * w for i, (h, w) in enumerate(sizes))
    assert scan == expected and total > scan


def test_summary_table_on_meta():
    table = summary_table(["gspn_t"], img_size=64)
    row = next(line for line in table.splitlines() if line.startswith("| gspn_t"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert abs(float(cells[1]) - 31.5) / 31.5 < 0.03
    assert float(cells[2]) > 0 and cells[4] == "30"


def test_bf16_autocast_forward_backward():
    """The ImageNet configs train in bf16-mixed: the scan's five inputs must come out of the mixer in
    one dtype under autocast, and gradients must reach the weights."""
    torch.manual_seed(0)
    model = create_model("gspn_t", embed_dim=16, depths=(1, 1, 1, 1), mixer={"d_state": 2}, num_classes=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 24))
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 10)
    logits.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_mixer_options_are_one_object_passed_down():
    """``mixer`` is declared once (MixerOptions) and reaches every mixer; a dict is read over the model's
    defaults and a registry size's own options, key by key."""
    from gspn_lightning.nn import MixerOptions

    with torch.device("meta"):
        s = create_model("gspn_s", mixer={"dw_kernel": 5, "directions": ["t2b", "l2r"]})
        given = create_model("gspn_t", mixer=MixerOptions(d_state=3, chunk_size=4, backend="reference"))
    mixers = [blk.mixer for stage in s.stages for blk in stage.blocks]
    assert {m.d_state for m in mixers} == {16}  # gspn_s's own d_state kept
    assert {m.dwconv.kernel_size for m in mixers} == {(5, 5)}
    assert {m.directions for m in mixers} == {("t2b", "l2r")}
    assert s.mixer_options == MixerOptions(d_state=16, chunk_size=2, dw_kernel=5, directions=("t2b", "l2r"))
    assert given.chunk_sizes()[0] == [4, 4] and given.chunk_sizes()[3] == [None, None]
    assert {blk.mixer.backend for stage in given.stages for blk in stage.blocks} == {"reference"}
    with pytest.raises(TypeError, match="unknown mixer option.*'d_sate'"):
        create_model("gspn_t", mixer={"d_sate": 4})
    with pytest.raises(ValueError, match="dw_kernel"):
        MixerOptions(dw_kernel=4)
    with pytest.raises(ValueError, match="directions"):
        MixerOptions(directions=("up",))
    opts = MixerOptions(d_state=4)
    with pytest.raises(AttributeError):
        opts.d_state = 5  # frozen: shared by every layer, never changed under them
    assert MixerOptions.build(opts, chunk_size=2) == MixerOptions(d_state=4, chunk_size=2)
    assert MixerOptions.build(opts.as_dict()) == opts  # a checkpoint's or config's dict round-trips

"""Registry models saved as a folder (safetensors + config.json) and rebuilt by name, bit for bit:
``save_pretrained``, ``from_pretrained`` and ``create_model(name, pretrained=PATH)``."""

from __future__ import annotations

import json

import pytest
import torch

from gspn_lightning.models import create_model, from_pretrained, list_models, save_pretrained

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: the smallest configuration of each family (every registered size is built at this size)
TINY = {
    "classification": dict(
        embed_dim=8, depths=(1, 1, 1, 1), global_blocks=("none", "none", "all", "all"),
        mixer={"d_state": 2, "dw_kernel": 3}, num_classes=5, in_chans=3,
    ),
    "gspn_dit": dict(hidden_size=16, depth=2, num_classes=3, in_channels=2, input_size=8, mixer={"dw_kernel": 3}),
    "dit": dict(hidden_size=16, depth=1, num_heads=2, num_classes=3, in_channels=2, input_size=8),
}  # fmt: skip


def tiny_kwargs(name: str) -> dict:
    if name.startswith("gspn_dit"):
        return dict(TINY["gspn_dit"])
    if name.startswith("dit"):
        return dict(TINY["dit"])
    return dict(TINY["classification"])


def example(name: str, model) -> tuple:
    g = torch.Generator().manual_seed(3)
    if name.startswith(("gspn_dit", "dit")):
        x = torch.randn(2, 2, 8, 8, generator=g)
        return x, torch.tensor([10, 500]), torch.tensor([0, 3])  # label 3: the null class
    return (torch.randn(2, 3, 32, 32, generator=g),)


def test_every_registry_model_is_covered():
    names = list_models()
    assert len(names) >= 23 and {"gspn_t", "gspn_b", "gspn_dit_xl_2", "dit_xl_8"} <= set(names)


@pytest.mark.parametrize("name", list_models())
def test_save_pretrained_round_trip_is_bit_identical(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **tiny_kwargs(name)).eval()
    with torch.no_grad():  # away from any initial value a fresh build could reproduce (zero-init layers)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == name and config["kwargs"]["num_classes"] == tiny_kwargs(name)["num_classes"]

    torch.manual_seed(1)  # another initialisation: only the loaded weights can make it equal
    for rebuilt in (from_pretrained(folder), create_model(name, pretrained=folder)):
        rebuilt.eval()
        own, back = model.state_dict(), rebuilt.state_dict()
        assert own.keys() == back.keys()
        for k in own:
            assert own[k].dtype == back[k].dtype and torch.equal(own[k], back[k]), k
        with torch.no_grad():
            assert torch.equal(model(*example(name, model)), rebuilt(*example(name, rebuilt)))
        assert rebuilt.model_config["model"] == name


def test_create_model_pretrained_checks_name_keys_and_shapes(tmp_path):
    torch.manual_seed(0)
    model = create_model("gspn_t", **TINY["classification"])
    folder = save_pretrained(model, tmp_path / "t")
    # the config names the model: another name is refused
    with pytest.raises(ValueError, match="holds a 'gspn_t' model, not 'gspn_s'"):
        create_model("gspn_s", pretrained=folder)
    # an override that changes a shape: strict, naming the keys
    with pytest.raises(
        ValueError, match=r"shape mismatch 2: head\.bias \(file \(5,\), model \(7,\)\), head\.weight"
    ):
        create_model("gspn_t", pretrained=folder, num_classes=7)
    # an override that keeps the shapes (the backend) applies over the config
    rebuilt = create_model("gspn_t", pretrained=folder, mixer={"backend": "reference"})
    assert all(b.mixer.backend == "reference" for s in rebuilt.stages for b in s.blocks)
    assert rebuilt.mixer_options.d_state == 2  # the rest of the mixer group from the config
    # a bare safetensors file: the architecture from the name and overrides, the weights from the file
    from_file = create_model("gspn_t", pretrained=folder / "model.safetensors", **TINY["classification"])
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), from_file.state_dict().values())
    )
    deeper = {**TINY["classification"], "depths": (1, 1, 2, 1)}  # one block more: its keys are missing
    with pytest.raises(ValueError, match=r"missing \d+: stages\.2\.blocks\.1\."):
        create_model("gspn_t", pretrained=folder / "model.safetensors", **deeper)


def test_a_training_checkpoint_is_not_pretrained_weights(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="gspn export-model CKPT OUT"):
        create_model("gspn_t", pretrained=tmp_path / "last.ckpt", **TINY["classification"])


def test_a_model_not_built_by_name_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="not built by create_model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")

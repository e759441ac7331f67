"""The optimiser/schedule/EMA plumbing every task shares (gspn_lightning.tasks.base)."""

from __future__ import annotations

import pytest
import torch

from gspn_lightning.tasks.base import (
    OptimSettings,
    build_model,
    cli_values,
    param_groups,
    warmup_constant,
    warmup_cosine,
)
from gspn_lightning.tasks.ema import ModelEMA


def test_ema_of_trainable_parameters_shares_the_frozen_ones():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    ema = ModelEMA(model, 0.5, include=lambda name, p: p.requires_grad)
    assert ema.module[0].weight is model[0].weight  # shared, not copied
    assert ema.module[2].weight is not model[2].weight
    before = ema.module[2].weight.clone()
    with torch.no_grad():
        model[2].weight.add_(1.0)
        model[0].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module[2].weight, 0.5 * before + 0.5 * model[2].weight)
    assert torch.equal(ema.module[0].weight, model[0].weight)  # follows the model
    full = ModelEMA(model, 0.5)
    assert full.module[0].weight is not model[0].weight


def test_param_groups_skip_frozen_and_1d():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[2].requires_grad_(False)
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_schedules():
    assert warmup_constant(0, 10, 0.0) == 0.0 and warmup_constant(5, 10, 0.0) == 0.5
    assert warmup_constant(10, 10, 0.0) == warmup_constant(10_000, 10, 0.0) == 1.0
    assert warmup_cosine(10, 10, 110, 0.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(110, 10, 110, 0.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(60, 10, 110, 0.0, 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        OptimSettings(lr=1e-4, schedule="linear")
    with pytest.raises(ValueError, match="learning rate"):
        OptimSettings(lr=0.0)


def test_model_kwargs_from_the_command_line_mean_what_a_config_file_means():
    """``--model.init_args.model_kwargs.X v`` hands the task strings; they are read as YAML."""
    got = cli_values({"adaln_blocks": "true", "label_init_std": "1.0", "global_blocks": "all", "d_state": 8,
                      "chunk": "null", "blocks": "[1, 2]", "odd": "a: b: c"})  # fmt: skip
    assert got == {"adaln_blocks": True, "label_init_std": 1.0, "global_blocks": "all", "d_state": 8,
                   "chunk": None, "blocks": [1, 2], "odd": "a: b: c"}  # fmt: skip
    assert cli_values(None) == {}
    assert cli_values({"mixer": {"d_state": "4", "backend": "null", "directions": "[t2b, l2r]"}}) == {
        "mixer": {"d_state": 4, "backend": None, "directions": ["t2b", "l2r"]}
    }
    m = build_model("gspn_dit_s_4", {"hidden_size": "32", "depth": "2", "adaln_blocks": "true", "mixer": "{backend: reference}"},
                    num_classes=10, in_channels=1)  # fmt: skip
    assert m.hidden_size == 32 and all(b.ada is not None for b in m.blocks())
    assert all(b.mixer.backend == "reference" for b in m.blocks())  # the mixer group, given as one string
    with pytest.raises(ValueError, match="model.init_args.model"):
        build_model("no_such_model", None)
    with pytest.raises(TypeError, match="model_kwargs for model 'gspn_dit_s_4'"):
        build_model("gspn_dit_s_4", {"no_such_arg": 1})

"""The optimiser/schedule/EMA plumbing every task shares (gspn_lightning.tasks.base)."""

from __future__ import annotations

import pytest
import torch

from gspn_lightning.tasks.base import OptimSettings, param_groups, warmup_constant, warmup_cosine
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

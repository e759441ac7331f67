"""Registry models as a folder of weights + config: :func:`save_pretrained` / :func:`from_pretrained`,
and ``create_model(name, pretrained=PATH)``.

A folder holds two files, neither of which can run code when read:

- ``model.safetensors``: the model's state dict (parameters and buffers, by name);
- ``config.json``: ``{"format": "gspn-lightning model", "model": <registry name>, "kwargs": {...}}``,
  every constructor argument the model was built with (the registry defaults merged with the
  overrides), so :func:`from_pretrained` rebuilds the same architecture by name, and reloads the weights
  bit for bit.

:func:`~gspn_lightning.models.registry.create_model` records the name and arguments on every model it
builds (``model.model_config``), which is what :func:`save_pretrained` writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "from_pretrained",
    "load_state_strict",
    "read_pretrained_config",
    "read_weights_file",
    "save_pretrained",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "gspn-lightning model"


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as JSON data: dataclasses (the mixer options) and mappings as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save the model argument {where}={value!r} ({type(value).__name__}) as JSON")


def model_config(model: nn.Module) -> dict:
    """``{"model": name, "kwargs": {...}}`` of a model built by ``create_model`` (an error otherwise)."""
    config = getattr(model, "model_config", None)
    if not isinstance(config, Mapping) or "model" not in config:
        raise ValueError(
            f"{type(model).__name__} was not built by create_model(name, ...): its registry name and "
            "arguments are unknown, so it cannot be saved as a rebuildable folder"
        )
    return {"model": config["model"], "kwargs": _jsonable(dict(config.get("kwargs") or {}), "kwargs")}


def save_pretrained(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model`` (built by ``create_model``) to ``folder`` as ``model.safetensors`` and
    ``config.json``; returns the folder. Existing files of those names are replaced (each written
    under a temporary name, then renamed)."""
    from safetensors.torch import save_file

    config = {"format": FORMAT, **model_config(model)}
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()}
    tmp = out / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": FORMAT, "model": config["model"]})
    os.replace(tmp, out / WEIGHTS_NAME)
    tmp = out / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / CONFIG_NAME)
    return out


def read_pretrained_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` of a :func:`save_pretrained` folder (``model`` and ``kwargs``)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a save_pretrained folder: no {CONFIG_NAME}")
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise ValueError(f"{path} is not a gspn-lightning model config (format {FORMAT!r})")
    return config


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a :func:`save_pretrained` folder's weights
    (read without running code; on the CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: pretrained weights are a save_pretrained folder or a .safetensors file (a training "
            "checkpoint becomes one with `gspn export-model CKPT OUT`; a task's init_from reads .ckpt files)"
        )
    return load_file(str(path), device="cpu")


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: Any) -> None:
    """Copy ``state`` into ``model``: every key of the model present with its shape, and nothing
    else, or a ``ValueError`` naming the missing, unexpected and shape-mismatched keys (or the model's
    own ``check_state_dict(state)`` error first, where it has one: e.g. GSPN-DiT naming the block)."""
    if hasattr(model, "check_state_dict"):
        model.check_state_dict(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or mismatched:
        parts = [
            f"{what} {len(keys)}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        raise ValueError(f"the weights of {source} do not match the model: " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)


def from_pretrained(folder: str | os.PathLike, **overrides: Any) -> nn.Module:
    """The model of a :func:`save_pretrained` folder: rebuilt by name from its ``config.json``
    (``overrides`` replace arguments, e.g. the mixer's ``backend``) with its weights loaded; any key
    or shape that does not match is an error naming it."""
    from .registry import create_model

    config = read_pretrained_config(folder)
    return create_model(config["model"], pretrained=folder, **overrides)

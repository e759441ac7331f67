"""The one model registry: every model is registered by name with its default constructor arguments
and built with :func:`create_model`.

A model file registers its sizes at import time (``register_model("gspn_t", GSPNClassifier,
task="classification", defaults={...})``); :mod:`gspn_lightning.models` imports every model file, so
``create_model`` sees them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["ModelEntry", "check_patch_grid", "create_model", "list_models", "model_entry", "register_model"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: ``builder(**defaults, **overrides)`` builds it; ``task`` groups models
    (e.g. ``"classification"``, ``"diffusion"``)."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    task: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    task: str = "",
    defaults: dict[str, Any] | None = None,
) -> ModelEntry:
    """Register ``builder`` under ``name`` with default keyword arguments; a name can be taken once."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    entry = ModelEntry(name, builder, dict(defaults or {}), task)
    _REGISTRY[name] = entry
    return entry


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name`` (``KeyError`` listing the known names if unknown)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}") from None


def list_models(task: str | None = None) -> list[str]:
    """Registered names, sorted; only those of ``task`` if given."""
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def create_model(name: str, pretrained: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
    """Build the model registered as ``name``; ``overrides`` replace its default constructor arguments.
    A dict-valued default (the ``mixer`` options) is updated by a dict override, key by key:
    ``create_model("gspn_s", mixer={"dw_kernel": 5})`` keeps gspn_s's ``d_state`` of 16.

    ``pretrained``: weights to load, strictly (every key and shape must match, or a ``ValueError``
    names the ones that do not): a :func:`~gspn_lightning.models.pretrained.save_pretrained` folder,
    whose ``config.json`` gives the arguments (it must name the same model; ``overrides`` still
    apply over it), or a ``.safetensors`` file of this model's state dict. Nothing is unpickled.

    The model records its name and arguments as ``model.model_config`` (what ``save_pretrained``
    writes). Build on the meta device (no memory, no init cost) with ``with torch.device("meta"): ...``.
    """
    entry = model_entry(name)
    kwargs = dict(entry.defaults)
    if pretrained is not None and Path(pretrained).is_dir():
        from .pretrained import read_pretrained_config

        config = read_pretrained_config(pretrained)
        if config["model"] != name:
            raise ValueError(f"{pretrained} holds a {config['model']!r} model, not {name!r}")
        kwargs = _merged(kwargs, config.get("kwargs") or {})
    kwargs = _merged(kwargs, overrides)
    model = entry.builder(**kwargs)
    model.model_config = {"model": name, "kwargs": kwargs}
    if pretrained is not None:
        from .pretrained import load_state_strict, read_weights_file

        load_state_strict(model, read_weights_file(pretrained), pretrained)
    return model


def _merged(kwargs: dict, overrides: Mapping) -> dict:
    """``kwargs`` updated by ``overrides``, a dict-valued argument key by key."""
    out = dict(kwargs)
    for key, value in overrides.items():
        default = out.get(key)
        if isinstance(default, Mapping) and isinstance(value, Mapping):
            value = {**default, **value}
        out[key] = value
    return out


def check_patch_grid(input_size: int, patch_size: int) -> None:
    """A patchifying model's nominal ``input_size`` must be a whole number of patches: the patch
    embedding would drop the remainder and the output (and every sample drawn) would not have the
    input's size. Raised when the model is built, i.e. at start-up, naming the config key."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"image_size (the model's input_size) must be an int >= 1, got {input_size!r}")
    if input_size % patch_size:
        lower = input_size - input_size % patch_size
        raise ValueError(
            f"image_size {input_size} is not a multiple of the model's patch size {patch_size}: set "
            f"data.init_args.image_size (or model.init_args.image_size) to a multiple of {patch_size}, "
            f"e.g. {lower or patch_size} or {lower + patch_size}"
        )

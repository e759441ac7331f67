"""Starting a run from existing weights (every task's ``init_from``): read them without running code,
match them to the model key by key, load what matches, and say what did not and why.

Sources (:func:`read_init_source`):

- a ``.ckpt`` of another run (any task of this project, or any Lightning checkpoint): its EMA weights
  (``ema.module.*``) when it holds them, else its raw ones (``model.*``); ``init_weights: raw`` or
  ``ema`` chooses. Read with ``torch.load(weights_only=True)``
  (:func:`~gspn_lightning.tasks.checkpointing.load_checkpoint_file`): a file that would run code is
  refused. A plain ``torch.save(model.state_dict())`` file works too.
- a ``.safetensors`` file of the model's state dict: ``save_pretrained``'s ``model.safetensors`` or
  the SD-XL adapter of ``gspn distill-export`` (``gspn.safetensors`` / ``gspn_ema.safetensors``).
- a :func:`~gspn_lightning.models.pretrained.save_pretrained` folder (its ``model.safetensors``).

Matching (:func:`match_weights`): each key the run initialises is *loaded* (same name, same shape),
*missing* (not in the source), or *mismatched* (another shape); each source key the run does not
initialise is *unexpected* (not in the model, or, in distillation, a frozen weight that comes from the
SD-XL folder). Strict (the default) refuses anything but an exact match, naming the keys; with
``init_strict: false`` the matching keys load and the others are listed (fine-tuning a classifier on
other classes: the head's shapes differ, the head keeps its fresh initialisation).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpointing import load_checkpoint_file

INIT_WEIGHTS = ("ema", "raw")
#: how many keys of each kind a message names (the count is always given)
SHOWN = 10


@dataclass
class InitReport:
    """What :func:`match_weights` found: keys loaded, missing, mismatched (with both shapes) and unexpected."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    unexpected: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.mismatched or self.unexpected)

    def problems(self) -> list[str]:
        """One line per kind of key that did not load, naming up to :data:`SHOWN` of them."""

        def names(items: list[str]) -> str:
            more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            return ", ".join(items[:SHOWN]) + more

        out = []
        if self.missing:
            out.append(
                f"missing from the source ({len(self.missing)}, keep their fresh values): {names(self.missing)}"
            )
        if self.mismatched:
            shapes = [f"{k} (source {tuple(a)}, model {tuple(b)})" for k, a, b in self.mismatched]
            out.append(f"shape mismatch ({len(self.mismatched)}, keep their fresh values): {names(shapes)}")
        if self.unexpected:
            out.append(
                f"unexpected ({len(self.unexpected)}, not loaded): {names([f'{k} ({why})' for k, why in self.unexpected])}"
            )
        return out

    def summary(self) -> str:
        head = f"init_from {self.source}: loaded {len(self.loaded)} tensors"
        return "\n".join([head] + [f"  {line}" for line in self.problems()])


def read_init_source(
    path: str | os.PathLike, weights: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, description)`` of the weights at ``path`` (see the module docstring); ``weights``
    picks a checkpoint's ``"ema"`` or ``"raw"`` weights (``None``: the EMA where there is one)."""
    from gspn_lightning.models.pretrained import read_weights_file

    if weights is not None and weights not in INIT_WEIGHTS:
        raise ValueError(
            f"model.init_args.init_weights must be one of {INIT_WEIGHTS} or null, got {weights!r}"
        )
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model.init_args.init_from: no such file or folder: {path}")
    if p.is_dir() or p.suffix == ".safetensors":
        if weights is not None:
            raise ValueError(
                f"model.init_args.init_weights: {weights} chooses between a checkpoint's weights; {path} holds "
                "one set (export the EMA or the raw weights to their own file instead)"
            )
        return read_weights_file(p), str(path)
    ckpt = load_checkpoint_file(p, map_location="cpu")
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"model.init_args.init_from: {path} is not a checkpoint or a state dict")
    if "state_dict" not in ckpt:  # a plain state dict (torch.save(model.state_dict()))
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            if weights is not None:
                raise ValueError(
                    f"model.init_args.init_weights: {path} is a plain state dict (one set of weights)"
                )
            return dict(ckpt), str(path)
        raise ValueError(
            f"model.init_args.init_from: {path} is neither a Lightning checkpoint (no state_dict) nor a plain "
            f"state dict of tensors (its keys: {sorted(map(str, ckpt))[:8]})"
        )
    state = ckpt["state_dict"]
    has_ema = any(k.startswith("ema.module.") for k in state)
    which = weights or ("ema" if has_ema else "raw")
    if which == "ema" and not has_ema:
        raise ValueError(f"model.init_args.init_weights: ema, but {path} holds no EMA weights (use raw)")
    prefix = "ema.module." if which == "ema" else "model."
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"model.init_args.init_from: {path} holds no {prefix}* weights")
    step = ckpt.get("global_step")
    return out, f"{path} ({which} weights{'' if step is None else f' of step {step}'})"


def match_weights(
    targets: Mapping[str, torch.Tensor], model_keys, state: Mapping[str, torch.Tensor], source: str,
    frozen_reason: str = "a frozen weight of this run",
) -> InitReport:  # fmt: skip
    """Sort the keys of ``targets`` (name -> the model's tensor to initialise) and of ``state`` (the
    source) into loaded / missing / mismatched / unexpected. A source key among ``model_keys`` but
    not a target is unexpected for ``frozen_reason``."""
    report = InitReport(source)
    model_keys = set(model_keys)
    for key, tensor in targets.items():
        if key not in state:
            report.missing.append(key)
        elif tuple(state[key].shape) != tuple(tensor.shape):
            report.mismatched.append((key, tuple(state[key].shape), tuple(tensor.shape)))
        else:
            report.loaded.append(key)
    for key in state:
        if key not in targets:
            report.unexpected.append((key, frozen_reason if key in model_keys else "not in this model"))
    report.missing.sort()
    report.mismatched.sort()
    report.unexpected.sort()
    return report


@torch.no_grad()
def apply_weights(
    targets: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], report: InitReport
) -> None:
    """Copy the loaded keys of ``report`` from ``state`` into ``targets`` (in place, in the target's dtype)."""
    for key in report.loaded:
        targets[key].copy_(state[key])

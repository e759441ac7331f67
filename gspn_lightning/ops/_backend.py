"""Which implementation serves a call: the compiled kernel (:mod:`._build`) or the pure-PyTorch
reference.  ``backend=None`` reads ``$GSPN_BACKEND`` (default ``"auto"``: the kernel where it is
available for the tensors' device, else the reference with one warning per device type)."""

from __future__ import annotations

import os
import warnings

import torch

from . import _build

BACKENDS = ("auto", "kernel", "reference")
_warned_fallback: set[str] = set()


def kernel_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernel serves tensors on ``device`` (builds it on first call)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _build.load_cpu()
    if device.type == "cuda":
        return _build.load_cuda()
    return False


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``"kernel"`` or ``"reference"`` for tensors on ``device``; raises if ``"kernel"`` was asked for
    and is unavailable."""
    if backend is None:
        backend = os.environ.get("GSPN_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS} (or None to read $GSPN_BACKEND), got {backend!r}"
        )
    if backend == "reference":
        return "reference"
    if kernel_available(device):
        return "kernel"
    why = _build.build_error(device.type) or f"no compiled kernel for {device.type} tensors"
    if backend == "kernel":
        raise RuntimeError(f"backend='kernel' asked for, but the GSPN kernel is unavailable: {why}")
    if device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        warnings.warn(
            f"GSPN {device.type} kernel unavailable ({why}); using the pure-PyTorch reference scan, "
            "which is correct but slower",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"

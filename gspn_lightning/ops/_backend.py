"""Which implementation serves a call: the compiled kernel (:mod:`._build`) or the pure-PyTorch
reference.  ``backend=None`` reads ``$GSPN_BACKEND`` (default ``"auto"``: the kernel where it is
available for the tensors' device, else the reference with one warning per device type).

``gspn_propagate_proj`` has two compiled paths, so it resolves with :func:`resolve_proj_backend`:
``"kernel"`` (its own op, ``propagate_proj_fwd``, which projects the gate logits on the fly) and
``"planes"`` (the logits materialised by one 1x1 convolution, then the per-plane fused
``propagate_fwd`` kernel: the CUDA path the new kernel replaces, kept selectable to compare against).
On CUDA ``"auto"`` resolves to :data:`CUDA_PROJ_DEFAULT` (the mixer's LayerNorm + GRN likewise, by
:func:`resolve_norm_backend`: the fused op or the modules' composition).  The other ops have one compiled path each,
the per-plane kernel, so for them ``"planes"`` means ``"kernel"`` (one ``$GSPN_BACKEND=planes``
selects the per-plane kernels throughout a model)."""

from __future__ import annotations

import os
import warnings

import torch

from . import _build

BACKENDS = ("auto", "kernel", "planes", "reference")

#: What ``backend="auto"`` (or ``None``) gives ``gspn_propagate_proj`` on CUDA tensors.  "planes" (the
#: materialised logits + the per-plane kernel) until a GPU run has shown the channels-last lanes
#: kernel behind ``propagate_proj_fwd`` correct: flip it to "kernel" once ``scripts/gpu_check.sh``
#: (its ``correct`` section) has passed on a GPU.
CUDA_PROJ_DEFAULT = "planes"

#: What ``backend="auto"`` (or ``None``) gives ``gspn_attention`` on CUDA tensors: "planes" (the former
#: composition, :func:`~gspn_lightning.ops.attention.attention_planes`) until a GPU run has shown a CUDA
#: kernel behind ``attention_fwd`` correct.
CUDA_ATTENTION_DEFAULT = "planes"

#: What ``backend="auto"`` (or ``None``) gives the mixer's LayerNorm + GRN on CUDA tensors: "planes"
#: (the composition of the two modules, the former path) until a GPU run has shown the CUDA kernel
#: behind ``layer_norm_grn_fwd`` correct.
CUDA_NORM_DEFAULT = "planes"

_warned_fallback: set[str] = set()


def kernel_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernel serves tensors on ``device`` (builds it on first call)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _build.load_cpu()
    if device.type == "cuda":
        return _build.load_cuda()
    return False


def requested_backend(backend: str | None) -> str:
    """``backend``, or ``$GSPN_BACKEND`` (default ``"auto"``) when it is ``None``, checked."""
    if backend is None:
        backend = os.environ.get("GSPN_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS} (or None to read $GSPN_BACKEND), got {backend!r}"
        )
    return backend


def _compiled_or_reference(asked: str, device: torch.device) -> bool:
    """Whether the compiled kernel serves ``device``: raises if ``asked`` named a compiled path
    (``"kernel"``/``"planes"``) that is unavailable; for ``"auto"`` warns once per device type."""
    if kernel_available(device):
        return True
    why = _build.build_error(device.type) or f"no compiled kernel for {device.type} tensors"
    if asked != "auto":
        raise RuntimeError(f"backend={asked!r} asked for, but the GSPN kernel is unavailable: {why}")
    if device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        warnings.warn(
            f"GSPN {device.type} kernel unavailable ({why}); using the pure-PyTorch reference scan, "
            "which is correct but slower",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``"kernel"`` or ``"reference"`` for tensors on ``device`` (an op with one compiled path, the
    per-plane kernel, so ``"planes"`` is ``"kernel"``); raises if a compiled path was asked for and is
    unavailable."""
    asked = requested_backend(backend)
    if asked == "reference":
        return "reference"
    return "kernel" if _compiled_or_reference(asked, device) else "reference"


def _resolve_two_paths(backend: str | None, device: torch.device, cuda_default: str, op: str | None) -> str:
    """``"kernel"``, ``"planes"`` or ``"reference"`` for an op with two compiled paths on ``device``:
    ``"auto"`` is the module constant named ``cuda_default`` (read now) on CUDA and ``"kernel"``
    elsewhere (the reference where nothing is compiled); raises if a compiled path was asked for and is
    unavailable, or (``op`` given) ``"kernel"`` where the loaded extension registered no ``op`` kernel."""
    asked = requested_backend(backend)
    if asked == "reference":
        return "reference"
    if not _compiled_or_reference(asked, device):
        return "reference"
    if asked == "auto":
        return globals()[cuda_default] if device.type == "cuda" else "kernel"
    if (
        op is not None
        and asked == "kernel"
        and not _has_kernel(op, "CUDA" if device.type == "cuda" else "CPU")
    ):
        raise RuntimeError(
            f"backend='kernel' asked for, but the loaded GSPN extension has no {op.removesuffix('_fwd')} kernel for "
            f"{device.type} tensors; use backend='planes'"
        )
    return asked


def resolve_proj_backend(backend: str | None, device: torch.device) -> str:
    """``"kernel"``, ``"planes"`` or ``"reference"`` for ``gspn_propagate_proj`` on ``device``:
    ``"auto"`` is :data:`CUDA_PROJ_DEFAULT` on CUDA and ``"kernel"`` elsewhere (the reference where
    nothing is compiled); raises if a compiled path was asked for and is unavailable."""
    return _resolve_two_paths(backend, device, "CUDA_PROJ_DEFAULT", None)


@torch.compiler.assume_constant_result
def _has_kernel(op: str, key: str) -> bool:
    """Whether the loaded extension registered ``op`` for the dispatch key ``key`` (a constant for
    ``torch.compile``: the registrations do not change once loaded)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gspn_lightning::{op}", key)


def resolve_attention_backend(backend: str | None, device: torch.device) -> str:
    """``"kernel"``, ``"planes"`` or ``"reference"`` for ``gspn_attention`` on ``device``: ``"auto"`` is
    :data:`CUDA_ATTENTION_DEFAULT` on CUDA and ``"kernel"`` elsewhere (the reference where nothing is
    compiled); raises if a compiled path was asked for and is unavailable."""
    return _resolve_two_paths(backend, device, "CUDA_ATTENTION_DEFAULT", "attention_fwd")


def resolve_norm_backend(backend: str | None, device: torch.device) -> str:
    """``"kernel"`` (the fused ``layer_norm_grn`` op), ``"planes"`` or ``"reference"`` (both: the
    LayerNorm2d and GRN modules composed, the former path) for the mixer's LayerNorm + GRN on
    ``device``: ``"auto"`` is :data:`CUDA_NORM_DEFAULT` on CUDA and ``"kernel"`` elsewhere; raises if
    the kernel was asked for and is unavailable."""
    return _resolve_two_paths(backend, device, "CUDA_NORM_DEFAULT", "layer_norm_grn_fwd")

"""The GSPN line-scan op.

``gspn_scan(x, lam, w_neg, w_mid, w_pos, direction, chunk_size)`` runs the 2-D linear propagation of
GSPN along one spatial axis of ``(B, C, H, W)`` tensors; ``normalize_gates`` turns raw gate logits into
the row-stochastic weights that keep it stable.  The exact contract is in ``shared/DESIGN.md`` and in
the docstrings below.

Backends: ``"kernel"`` (the JIT-built C++/CUDA kernels, registered with ``torch.library``) or
``"reference"`` (pure PyTorch, :func:`scan_reference`).  ``gspn_propagate`` (in :mod:`.propagate`) is the
mixer's whole propagation, four directions with gate normalisation and merge, as one fused op;
``gspn_propagate_proj`` the same with the low-rank gate projection fused in as well.  ``backend=None`` reads ``$GSPN_BACKEND``
(default ``"auto"``: the kernel where it is available for the tensors' device, else the reference with
one warning).  The package imports and works without a C++ compiler, only slower.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from . import _build
from .propagate import (
    GATE_FIELDS,
    gspn_propagate,
    gspn_propagate_proj,
    project_gates,
    propagate_proj_reference,
    propagate_reference,
)
from .reference import DIRECTIONS, scan_geometry, scan_reference

__all__ = [
    "DIRECTIONS",
    "GATE_FIELDS",
    "gspn_propagate",
    "gspn_propagate_proj",
    "gspn_scan",
    "kernel_available",
    "normalize_gates",
    "project_gates",
    "propagate_proj_reference",
    "propagate_reference",
    "scan_reference",
]

_BACKENDS = ("auto", "kernel", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ARG_NAMES = ("x", "lam", "w_neg", "w_mid", "w_pos")
_warned_fallback: set[str] = set()


def kernel_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernel serves tensors on ``device`` (builds it on first call)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _build.load_cpu()
    if device.type == "cuda":
        return _build.load_cuda()
    return False


def _check_tensors(names: tuple[str, ...], tensors: tuple) -> None:
    ref = tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}"
            )
    if ref.dim() != 4:
        raise ValueError(f"{names[0]} must be 4-D (B, C, H, W), got shape {tuple(ref.shape)}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {names[0]} has {tuple(ref.shape)}; all must match"
            )
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {names[0]} has {ref.dtype}; all must match")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {ref.device}; all must match")


def _check_direction(direction) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None for the global scan), got {chunk_size}")


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        backend = os.environ.get("GSPN_BACKEND", "auto") or "auto"
    if backend not in _BACKENDS:
        raise ValueError(
            f"backend must be one of {_BACKENDS} (or None to read $GSPN_BACKEND), got {backend!r}"
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


def gspn_scan(
    x: torch.Tensor,
    lam: torch.Tensor,
    w_neg: torch.Tensor,
    w_mid: torch.Tensor,
    w_pos: torch.Tensor,
    direction: str = "t2b",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """GSPN line scan along one spatial axis.

    All five tensors are ``(B, C, H, W)`` with one dtype (float16/bfloat16/float32/float64) and device.
    For ``t2b`` (rows top to bottom; ``b2t``, ``l2r``, ``r2l`` are the same recurrence along the other
    orders, with columns as the scan axis for the last two)::

        h[i, j] = lam[i, j] x[i, j] + w_neg[i, j] h[i-1, j-1] + w_mid[i, j] h[i-1, j] + w_pos[i, j] h[i-1, j+1]

    A neighbour outside the image contributes 0.  ``chunk_size=k`` is the local variant: the scan axis
    is cut into groups ``s // k`` of absolute positions (the same groups in both scan orders) and the
    first line of a group in scan order has no recurrence term; ``None`` is the global scan.
    16-bit inputs accumulate in float32; the output has the input dtype.  Differentiable in all five
    inputs.
    """
    _check_tensors(_ARG_NAMES, (x, lam, w_neg, w_mid, w_pos))
    _check_direction(direction)
    _check_chunk_size(chunk_size)
    if chunk_size is not None:
        transpose, _ = scan_geometry(direction)
        if chunk_size >= x.shape[-1 if transpose else -2]:
            chunk_size = None  # one chunk covering the whole scan axis is the global scan (any size of k)
    if _resolve_backend(backend, x.device) == "reference":
        return scan_reference(x, lam, w_neg, w_mid, w_pos, direction, chunk_size)
    return torch.ops.gspn_lightning.scan_fwd(x, lam, w_neg, w_mid, w_pos, direction, chunk_size or 0)


def normalize_gates(
    g_neg: torch.Tensor, g_mid: torch.Tensor, g_pos: torch.Tensor, direction: str = "t2b"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw gate logits -> row-stochastic weights ``(w_neg, w_mid, w_pos)`` for a scan in ``direction``.

    A sigmoid on each tap; the taps whose neighbour lies outside the image (``w_neg`` at the first and
    ``w_pos`` at the last position of a line) set to 0; then division by the sum of the remaining taps.
    Every pixel's three weights are non-negative and sum to 1 (Theorems 1-2 of the paper: propagation
    stays bounded over any length).  Computed in float32 for 16-bit inputs, returned in their dtype.

    Where every sigmoid of a pixel underflows (all logits below about -87 in float32, -708 in
    float64), the ratio is taken in the equivalent form ``exp(logsigmoid(g) - max)`` / sum instead,
    so the weights still sum to 1 rather than becoming 0/0; everywhere else the result is the plain
    ratio above, bit for bit.
    """
    _check_tensors(("g_neg", "g_mid", "g_pos"), (g_neg, g_mid, g_pos))
    _check_direction(direction)
    transpose, _ = scan_geometry(direction)
    line_dim = -2 if transpose else -1
    size = g_neg.shape[line_dim]
    compute = torch.float32 if g_neg.dtype in (torch.float16, torch.bfloat16) else g_neg.dtype
    pos = torch.arange(size, device=g_neg.device)
    shape = (size, 1) if transpose else (size,)
    has_neg = (pos > 0).reshape(shape)
    has_pos = (pos < size - 1).reshape(shape)
    logits = [g.to(compute) for g in (g_neg, g_mid, g_pos)]
    s_neg = torch.sigmoid(logits[0]) * has_neg
    s_mid = torch.sigmoid(logits[1])
    s_pos = torch.sigmoid(logits[2]) * has_pos
    total = s_neg + s_mid + s_pos
    tiny = total < torch.finfo(compute).tiny  # all taps underflowed (or went subnormal)
    # Stable form: sigmoid(g_k) / sum_j sigmoid(g_j) = exp(l_k - m) / sum_j exp(l_j - m) with
    # l = logsigmoid(g) (-inf for a tap outside the image) and m = max_j l_j, which is always finite.
    neg_inf = torch.tensor(float("-inf"), dtype=compute, device=g_neg.device)
    log_s = torch.stack(
        [
            torch.where(has_neg, F.logsigmoid(logits[0]), neg_inf),
            F.logsigmoid(logits[1]),
            torch.where(has_pos, F.logsigmoid(logits[2]), neg_inf),
        ]
    )
    stable = torch.softmax(log_s, dim=0)
    safe_total = torch.where(tiny, torch.ones_like(total), total)  # no 0/0 in the unused branch's grad
    return tuple(
        torch.where(tiny, stable[k], s / safe_total).to(g_neg.dtype)
        for k, s in enumerate((s_neg, s_mid, s_pos))
    )

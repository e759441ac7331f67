"""The fused propagation of the GSPN mixer: gate normalisation, the scans of all directions and their
merge in one op (DESIGN.md, "The GSPN mixer", steps 2-4).

``gspn_propagate(x, gates, merge, directions, chunk_size)`` computes, for ``x`` of shape
``(B, C, H, W)``, raw gate logits ``gates`` of shape ``(B, K, 6, C, H, W)`` (per direction, in the
order of :data:`GATE_FIELDS`: ``g_neg, g_mid, g_pos, lam, u, d``) and merge weights ``merge`` of
shape ``(K, C)``::

    y = sum_k merge[k] * (sigmoid(u_k) * gspn_scan(x, sigmoid(lam_k), *normalize_gates(g_k), directions[k])
                          + d_k * x)

Its definition is :func:`propagate_reference`, that composition of :func:`normalize_gates` and
:func:`gspn_scan`.  The compiled kernel reads every input once, keeps per-direction intermediates in
cache, saves only its inputs for the backward and recomputes the scans there (no ``h`` tensors).
Gate normalisation in the kernel is computed in a form that stays finite for any logits (see
``csrc/gspn_step.h``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .reference import DIRECTIONS, scan_reference

__all__ = ["GATE_FIELDS", "gspn_propagate", "propagate_reference"]

#: the six per-direction gate maps along axis 2 of ``gates``
GATE_FIELDS = ("g_neg", "g_mid", "g_pos", "lam", "u", "d")


def propagate_reference(
    x: torch.Tensor,
    gates: torch.Tensor,
    merge: torch.Tensor,
    directions: Sequence[str] = DIRECTIONS,
    chunk_size: int | None = None,
    scan=None,
) -> torch.Tensor:
    """The fused op's definition, term by term with :func:`normalize_gates` and a scan (``scan``:
    a function with :func:`gspn_scan`'s signature; default the pure-PyTorch :func:`scan_reference`).
    No input checking."""
    from . import normalize_gates  # the package defines it; imported here to avoid an import cycle

    scan = scan_reference if scan is None else scan
    y = None
    for k, direction in enumerate(directions):
        g_neg, g_mid, g_pos, lam, u, d = gates[:, k].unbind(1)
        taps = normalize_gates(g_neg, g_mid, g_pos, direction)
        h = scan(x, torch.sigmoid(lam), *taps, direction, chunk_size)
        y_k = (torch.sigmoid(u) * h + d * x) * merge[k].view(1, -1, 1, 1)
        y = y_k if y is None else y + y_k
    return y


def _check_propagate_inputs(x, gates, merge, directions) -> tuple[str, ...]:
    from . import _check_direction, _check_tensors

    _check_tensors(("x",), (x,))
    directions = (directions,) if isinstance(directions, str) else tuple(directions)
    if not 1 <= len(directions) <= len(DIRECTIONS) or len(set(directions)) != len(directions):
        raise ValueError(f"directions must be 1 to 4 distinct members of {DIRECTIONS}, got {directions!r}")
    for d in directions:
        _check_direction(d)
    B, C, H, W = x.shape
    K = len(directions)
    for name, t, shape in (("gates", gates, (B, K, len(GATE_FIELDS), C, H, W)), ("merge", merge, (K, C))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for x of shape {tuple(x.shape)} and {K} direction(s), "
                f"got {tuple(t.shape)}"
            )
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all must match")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all must match")
    return directions


def gspn_propagate(
    x: torch.Tensor,
    gates: torch.Tensor,
    merge: torch.Tensor,
    directions: Sequence[str] = DIRECTIONS,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The GSPN mixer's propagation, fused: ``(B, C, H, W) -> (B, C, H, W)``.

    Args:
        x: the features to propagate, ``(B, C, H, W)``.
        gates: raw logits ``(B, K, 6, C, H, W)``: per direction ``g_neg, g_mid, g_pos`` (normalised as
            :func:`normalize_gates` does), ``lam`` and ``u`` (through a sigmoid) and ``d`` (linear).
        merge: ``(K, C)`` weight of each direction's term per channel.
        directions: the ``K`` distinct scan directions, in the order of ``gates`` and ``merge``.
        chunk_size: as in :func:`gspn_scan` (``None``: global).
        backend: ``"kernel"``, ``"reference"`` or ``"auto"``/``None`` as in :func:`gspn_scan`.

    All three tensors share one floating dtype and device; 16-bit inputs accumulate in float32.
    Differentiable in ``x``, ``gates`` and ``merge``.
    """
    from . import _check_chunk_size, _resolve_backend

    directions = _check_propagate_inputs(x, gates, merge, directions)
    _check_chunk_size(chunk_size)
    if chunk_size is not None and chunk_size >= max(x.shape[-2:]):
        chunk_size = None  # a chunk covering every scan axis is the global scan (any size of k)
    if _resolve_backend(backend, x.device) == "reference":
        return propagate_reference(x, gates, merge, directions, chunk_size)
    return torch.ops.gspn_lightning.propagate_fwd(x, gates, merge, list(directions), chunk_size or 0)

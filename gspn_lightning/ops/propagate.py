"""The fused propagation of the GSPN mixer: gate normalisation, the scans of all directions and their
merge in one op (docs/design.md, "The propagate ops").

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

``gspn_propagate_proj(x, proxy, weight, bias, merge, directions, chunk_size)`` is the same op with the
mixer's low-rank gate projection fused in: the ``K * 6`` logit maps per channel are computed on the
fly from a proxy of ``S`` channels (``gates = conv1x1(proxy, weight) + bias``, :func:`project_gates`)
and never materialised, which is what the op's time and memory were bound by (the logits are
``6 K`` times the size of ``x``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend import resolve_backend, resolve_proj_backend
from ._checks import check_chunk_size, check_direction, check_tensors
from .reference import DIRECTIONS, GATE_FIELDS, project_gates, scan_reference
from .scan import normalize_gates

__all__ = [
    "GATE_FIELDS",
    "gspn_propagate",
    "gspn_propagate_proj",
    "project_gates",
    "propagate_proj_reference",
    "propagate_reference",
]


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
    scan = scan_reference if scan is None else scan
    y = None
    for k, direction in enumerate(directions):
        g_neg, g_mid, g_pos, lam, u, d = gates[:, k].unbind(1)
        taps = normalize_gates(g_neg, g_mid, g_pos, direction)
        h = scan(x, torch.sigmoid(lam), *taps, direction, chunk_size)
        y_k = (torch.sigmoid(u) * h + d * x) * merge[k].view(1, -1, 1, 1)
        y = y_k if y is None else y + y_k
    return y


def _check_directions(directions) -> tuple[str, ...]:
    directions = (directions,) if isinstance(directions, str) else tuple(directions)
    if not 1 <= len(directions) <= len(DIRECTIONS) or len(set(directions)) != len(directions):
        raise ValueError(f"directions must be 1 to 4 distinct members of {DIRECTIONS}, got {directions!r}")
    for d in directions:
        check_direction(d)
    return directions


def _check_like_x(x, named, context: str) -> None:
    """Each ``(name, tensor, shape)`` is a tensor of that shape with the dtype and device of ``x``."""
    for name, t, shape in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for {context}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all must match")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all must match")


def _check_x_and_directions(x, directions) -> tuple[tuple[str, ...], tuple[int, int, int, int], int]:
    """``(directions as a tuple, x.shape, K)`` once ``x`` and ``directions`` are valid."""
    check_tensors(("x",), (x,))
    directions = _check_directions(directions)
    return directions, tuple(x.shape), len(directions)


def _global_if_one_chunk(x: torch.Tensor, chunk_size: int | None) -> int | None:
    """The checked ``chunk_size``, ``None`` where one chunk covers every scan axis (the global scan,
    whatever ``k``)."""
    check_chunk_size(chunk_size)
    if chunk_size is not None and chunk_size >= max(x.shape[-2:]):
        return None
    return chunk_size


def _chunk_and_backend(
    x: torch.Tensor, chunk_size: int | None, backend: str | None
) -> tuple[int | None, bool]:
    """:func:`_global_if_one_chunk` and whether ``backend`` resolves to the reference for ``x``'s
    device."""
    chunk_size = _global_if_one_chunk(x, chunk_size)
    return chunk_size, resolve_backend(backend, x.device) == "reference"


def _check_propagate_inputs(x, gates, merge, directions) -> tuple[str, ...]:
    directions, (B, C, H, W), K = _check_x_and_directions(x, directions)
    context = f"x of shape {tuple(x.shape)} and {K} direction(s)"
    _check_like_x(x, (("gates", gates, (B, K, len(GATE_FIELDS), C, H, W)), ("merge", merge, (K, C))), context)
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
        backend: ``"kernel"``, ``"reference"`` or ``"auto"``/``None`` as in :func:`gspn_scan`;
            ``"planes"`` is ``"kernel"`` here (this op's kernel is the per-plane one).

    All three tensors share one floating dtype and device; 16-bit inputs accumulate in float32.
    Differentiable in ``x``, ``gates`` and ``merge``.
    """
    directions = _check_propagate_inputs(x, gates, merge, directions)
    chunk_size, reference = _chunk_and_backend(x, chunk_size, backend)
    if reference:
        return propagate_reference(x, gates, merge, directions, chunk_size)
    return torch.ops.gspn_lightning.propagate_fwd(x, gates, merge, list(directions), chunk_size or 0)


def propagate_proj_reference(
    x: torch.Tensor,
    proxy: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    merge: torch.Tensor,
    directions: Sequence[str] = DIRECTIONS,
    chunk_size: int | None = None,
    scan=None,
) -> torch.Tensor:
    """:func:`gspn_propagate_proj`'s definition: :func:`project_gates`, then :func:`propagate_reference`."""
    gates = project_gates(proxy, weight, bias, len(directions))
    return propagate_reference(x, gates, merge, directions, chunk_size, scan=scan)


def _check_proj_inputs(x, proxy, weight, bias, merge, directions) -> tuple[str, ...]:
    directions, (B, C, H, W), K = _check_x_and_directions(x, directions)
    if not isinstance(proxy, torch.Tensor):
        raise TypeError(f"proxy must be a torch.Tensor, got {type(proxy).__name__}")
    S = proxy.shape[1] if proxy.dim() == 4 else 0
    R = K * len(GATE_FIELDS) * C
    context = f"x of shape {tuple(x.shape)}, {K} direction(s) and a proxy of S = {S} channels (K*6*C = {R})"
    _check_like_x(
        x,
        (
            ("proxy", proxy, (B, S, H, W)),
            ("weight", weight, (R, S)),
            ("bias", bias, (R,)),
            ("merge", merge, (K, C)),
        ),
        context,
    )
    return directions


def gspn_propagate_proj(
    x: torch.Tensor,
    proxy: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    merge: torch.Tensor,
    directions: Sequence[str] = DIRECTIONS,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`gspn_propagate` with the gate logits projected on the fly from a low-rank proxy:
    ``(B, C, H, W) -> (B, C, H, W)``, equal to
    ``gspn_propagate(x, project_gates(proxy, weight, bias, K), merge, directions, chunk_size)``.

    Args:
        x: the features to propagate, ``(B, C, H, W)``.
        proxy: the low-rank proxy ``(B, S, H, W)`` the logits are projected from.
        weight: ``(K*6*C, S)``; row ``(k*6 + f)*C + c`` projects field ``f`` (:data:`GATE_FIELDS`) of
            direction ``k`` at channel ``c``.  A 1x1 ``nn.Conv2d(S, K*6*C)``'s weight is this after
            ``.view(K*6*C, S)`` (no copy).
        bias: ``(K*6*C,)``.
        merge, directions, chunk_size, backend: as in :func:`gspn_propagate`.

    All tensors share one floating dtype and device; 16-bit inputs accumulate in float32 (the logits
    too: they are never rounded to 16 bits).  Differentiable in ``x``, ``proxy``, ``weight``, ``bias`` and
    ``merge``.

    The CPU kernel computes each plane's ``6 K`` logit maps from the proxy (``S`` multiply-adds per
    value) into a per-thread buffer and never writes them to memory; its backward recomputes them and
    the scans, and reduces the logit gradients into those of the proxy (over channels and
    directions), the weight and the bias (over batch and pixels) with per-thread partial sums added in
    a fixed order.

    On CUDA, ``backend="kernel"`` runs the channels-last CUDA kernels
    (``csrc/cuda/gspn_lanes_kernels.h``): one thread block per batch element, direction and group of
    8-32 channels (one channel per lane) walks whole lines, rows and columns alike, projecting the
    logits from the proxy in registers; the backward recomputes the scans from checkpoints every 8
    lines and reduces the proxy, weight and bias gradients as it goes, with fixed-order partial sums.
    ``x`` and ``proxy`` are read channels-last (free when they already are, as the mixer's
    convolutions leave them) and ``y``, ``dx`` and ``dproxy`` come back channels-last; nothing of the
    logits' size is allocated.  Proxies of more than 16 channels take the materialising path there
    (the logits as one matrix product, then the per-channel-plane :func:`gspn_propagate` kernel).
    These kernels are executed on the CPU by the test suite (a host emulation of CUDA) and compiled
    for sm_80/sm_90, but not yet run on a GPU.

    ``backend`` picks the path (``None``: ``$GSPN_BACKEND``, default ``"auto"``):

    - ``"kernel"``: the op ``torch.ops.gspn_lightning.propagate_proj_fwd``, the kernel that projects
      the logits on the fly (the CPU lane kernel on CPU tensors, the CUDA kernel on CUDA tensors);
    - ``"planes"``: the logits materialised (:func:`project_gates`, one 1x1 convolution, ``6 K`` times
      the size of ``x``), then the per-plane fused :func:`gspn_propagate` kernel, differentiable
      through its own autograd; the older CUDA path, kept to compare against;
    - ``"reference"``: :func:`propagate_proj_reference` in pure PyTorch;
    - ``"auto"``: ``"kernel"`` on the CPU and ``"planes"`` on CUDA
      (:data:`~gspn_lightning.ops._backend.CUDA_PROJ_DEFAULT`, until a GPU run has shown the CUDA
      ``"kernel"`` correct), the reference where nothing is compiled.
    """
    directions = _check_proj_inputs(x, proxy, weight, bias, merge, directions)
    chunk_size = _global_if_one_chunk(x, chunk_size)
    path = resolve_proj_backend(backend, x.device)
    if path == "reference":
        return propagate_proj_reference(x, proxy, weight, bias, merge, directions, chunk_size)
    if path == "planes":
        gates = project_gates(proxy, weight, bias, len(directions))
        return torch.ops.gspn_lightning.propagate_fwd(x, gates, merge, list(directions), chunk_size or 0)
    return torch.ops.gspn_lightning.propagate_proj_fwd(
        x, proxy, weight, bias, merge, list(directions), chunk_size or 0
    )

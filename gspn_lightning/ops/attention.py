"""The fused GSPN attention of the SD-XL swap (``models/sdxl.py``, :class:`GSPNSelfAttention`): GSPN's
normalised propagation of ``v`` in place of softmax attention, in the token layout the pretrained
projections produce (issue 25, item 1).

``gspn_attention(q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size)`` computes, for
``q``, ``k``, ``v`` of shape ``(B, H, W, E)`` (``(B, N, E)`` tokens viewed on their grid), a low-rank
``proxy`` ``(B, H, W, S)`` and tap projection ``weight`` ``(K*3*E, S)``, ``bias`` ``(K*3*E,)``::

    taps_k = normalize_gates(proxy @ weight.T + bias)        3 tap logits per direction and channel
    lam    = sigmoid(k)
    num    = sum_k merge[k] * scan_k(v, lam, taps_k)
    den    = sum_k merge[k] * scan_k(1, lam, taps_k)          the same taps and lam, the input 1
    out    = sigmoid(q + u_bias) * num / max(den, tiny)        (B, H, W, E)

The numerator and the denominator share every tap and ``lam``: a kernel carries both states per
channel lane with the taps computed once, and allocates nothing of ``2 E`` channels (the composition
this op replaces propagated ``cat(v, ones)`` with a gate tensor of ``48 E`` maps, see
:func:`attention_planes`).  Its definition is :func:`attention_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend import resolve_attention_backend
from ._checks import FLOAT_DTYPES, check_chunk_size
from .propagate import _check_directions, gspn_propagate
from .reference import DIRECTIONS, scan_reference
from .scan import normalize_gates

__all__ = ["TAP_FIELDS", "attention_planes", "attention_reference", "gspn_attention"]

#: the three per-direction tap logits of the attention op, in the order of ``weight``'s rows
TAP_FIELDS = ("g_neg", "g_mid", "g_pos")

#: sigmoid(_OPEN) is exactly 1.0 in float32/64 and 16-bit: the denominator's output gate in
#: :func:`attention_planes`
_OPEN = 40.0

#: the CUDA lane kernels' largest proxy (csrc/cuda/gspn_lanes_kernels.h, kMaxLaneS)
_MAX_LANE_S = 16


def _tap_logits(proxy, weight, bias, K: int) -> torch.Tensor:
    """The tap logits ``(B, K, 3, E, H, W)``: row ``(k*3 + t)*E + e`` of ``weight`` gives tap ``t`` of
    direction ``k`` at channel ``e``."""
    B, H, W, S = proxy.shape
    logits = torch.baddbmm(
        bias.view(1, -1, 1), weight.expand(B, -1, -1), proxy.reshape(B, H * W, S).transpose(1, 2)
    )
    return logits.view(B, K, 3, -1, H, W)


def _planes(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, E) -> (B, E, H, W)`` (a view)."""
    return t.permute(0, 3, 1, 2)


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # den >= lam at the pixel itself > 0, unless every sigmoid(k) it sees underflowed (then num is 0 too)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proxy: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    merge: torch.Tensor,
    u_bias: torch.Tensor,
    directions: Sequence[str] = DIRECTIONS,
    chunk_size: int | None = None,
    scan=None,
) -> torch.Tensor:
    """:func:`gspn_attention`'s definition in plain PyTorch (differentiable, any floating dtype), the
    scans by ``scan`` (a function with :func:`gspn_scan`'s signature; default :func:`scan_reference`).
    No input checking."""
    scan = scan_reference if scan is None else scan
    E = v.shape[-1]
    taps = _tap_logits(proxy, weight, bias, len(directions))
    x, lam = _planes(v), torch.sigmoid(_planes(k))
    ones = torch.ones_like(x)
    num = den = None
    for i, direction in enumerate(directions):
        w = normalize_gates(*taps[:, i].unbind(1), direction)
        m = merge[i].view(1, E, 1, 1)
        n_i = m * scan(x, lam, *w, direction, chunk_size)
        d_i = m * scan(ones, lam, *w, direction, chunk_size)
        num, den = (n_i, d_i) if num is None else (num + n_i, den + d_i)
    gate = torch.sigmoid(_planes(q) + u_bias.view(1, E, 1, 1))
    return (gate * _divide(num, den)).permute(0, 2, 3, 1)


def attention_planes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proxy: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    merge: torch.Tensor,
    u_bias: torch.Tensor,
    directions: Sequence[str] = DIRECTIONS,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The composition the fused op replaces (``backend="planes"``): numerator and denominator as
    ``2 E`` channels ``cat(v, ones)`` of one :func:`gspn_propagate` call, whose gate logits
    ``(B, K, 6, 2 E, H, W)`` (taps, ``k``, ``q + u_bias`` and open gates, ``d = 0``) are
    materialised.  The CUDA path until a GPU run has shown the fused kernel correct."""
    B, H, W, E = v.shape
    K = len(directions)
    taps = _tap_logits(proxy, weight, bias, K).view(B, K, 3, 1, E, H, W)
    gates = v.new_empty(B, K, 6, 2, E, H, W)
    gates[:, :, :3] = taps
    gates[:, :, 3] = _planes(k).view(B, 1, 1, E, H, W)
    gates[:, :, 4, 0] = (_planes(q) + u_bias.view(1, E, 1, 1)).view(B, 1, E, H, W)
    gates[:, :, 4, 1] = _OPEN
    gates[:, :, 5] = 0
    gates = gates.view(B, K, 6, 2 * E, H, W)
    x = _planes(v).contiguous()
    x = torch.cat([x, torch.ones_like(x)], dim=1)
    y = gspn_propagate(x, gates, merge.repeat(1, 2), directions, chunk_size, backend=backend)
    num, den = y.split(E, dim=1)
    return _divide(num, den).permute(0, 2, 3, 1)


def _check_attention_inputs(q, k, v, proxy, weight, bias, merge, u_bias, directions) -> tuple[str, ...]:
    directions = _check_directions(directions)
    K = len(directions)
    for name, t in (("q", q), ("k", k), ("v", v), ("proxy", proxy), ("weight", weight), ("bias", bias),
                    ("merge", merge), ("u_bias", u_bias)):  # fmt: skip
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"v must be a floating-point tensor (float16, bfloat16, float32, float64), got {v.dtype}"
        )
    if v.dim() != 4:
        raise ValueError(
            f"v must be 4-D (B, H, W, E) (tokens viewed on their grid), got shape {tuple(v.shape)}"
        )
    B, H, W, E = v.shape
    S = proxy.shape[-1] if proxy.dim() == 4 else 0
    R = K * len(TAP_FIELDS) * E
    context = f"v of shape {tuple(v.shape)}, {K} direction(s) and a proxy of S = {S} channels (K*3*E = {R})"
    for name, t, shape in (
        ("q", q, (B, H, W, E)),
        ("k", k, (B, H, W, E)),
        ("proxy", proxy, (B, H, W, S)),
        ("weight", weight, (R, S)),
        ("bias", bias, (R,)),
        ("merge", merge, (K, E)),
        ("u_bias", u_bias, (E,)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for {context}, got {tuple(t.shape)}")
        if t.dtype != v.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but v has {v.dtype}; all must match")
        if t.device != v.device:
            raise ValueError(f"{name} is on {t.device} but v is on {v.device}; all must match")
    return directions


def gspn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proxy: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    merge: torch.Tensor,
    u_bias: torch.Tensor,
    directions: Sequence[str] = DIRECTIONS,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """GSPN attention, fused: ``(B, H, W, E)`` queries, keys and values -> ``(B, H, W, E)``.

    Args:
        q, k, v: ``(B, H, W, E)``: the output gate logits (``sigmoid(q + u_bias)``), the input weight
            logits (``lam = sigmoid(k)``) and the values; ``(B, N, E)`` tokens of an ``H x W`` grid are
            this after ``.view(B, H, W, E)`` (no copy).
        proxy: ``(B, H, W, S)``, the low-rank proxy the tap logits are projected from.
        weight: ``(K*3*E, S)``; row ``(k*3 + t)*E + e`` projects tap ``t`` (:data:`TAP_FIELDS`) of
            direction ``k`` at channel ``e`` (an ``nn.Linear(S, K*3*E)``'s weight).
        bias: ``(K*3*E,)``.
        merge: ``(K, E)`` weight of each direction, in numerator and denominator alike (already
            normalised, e.g. a softmax over directions).
        u_bias: ``(E,)``, the output gate's bias.
        directions: the ``K`` distinct scan directions, in the order of ``weight``'s rows and ``merge``.
        chunk_size: as in :func:`gspn_scan` (``None``: global; ``c``: restart every ``c`` lines).
        backend: ``"kernel"`` (the op ``torch.ops.gspn_lightning.attention_fwd``: numerator and
            denominator per channel lane, nothing of ``2 E`` channels allocated), ``"planes"``
            (:func:`attention_planes`, the former composition), ``"reference"``
            (:func:`attention_reference`) or ``"auto"``/``None`` (``$GSPN_BACKEND``): ``"kernel"`` on
            the CPU, :data:`~gspn_lightning.ops._backend.CUDA_ATTENTION_DEFAULT` on CUDA, the
            reference where nothing is compiled.

    Returns ``(B, H, W, E)`` (the kernel's contiguous: ``.view(B, N, E)`` is the layout ``to_out`` takes).

    The CPU kernel (``csrc/cpu/gspn_attention_cpu.cpp``) runs a group of channels per vector, both states
    per lane, and recomputes in the backward.  On CUDA, ``backend="kernel"`` runs the channels-last lane
    kernels of ``csrc/cuda/gspn_attention_kernels.h`` (a CTA per batch element, direction and group of
    8-32 channels, the taps projected from the proxy in registers, per-direction states merged and
    divided by a second kernel; proxies of more than 16 channels take the planes path).  They are
    executed on the CPU by the test suite (host emulation) and compiled for sm_80/sm_90, but not yet run
    on a GPU, so ``"auto"`` keeps ``"planes"`` there.  All tensors
    share one floating dtype and device; 16-bit inputs accumulate in float32.  Differentiable in every
    tensor input.
    """
    directions = _check_attention_inputs(q, k, v, proxy, weight, bias, merge, u_bias, directions)
    check_chunk_size(chunk_size)
    if chunk_size is not None and chunk_size >= max(v.shape[1:3]):
        chunk_size = None
    path = resolve_attention_backend(backend, v.device)
    if path == "kernel" and v.device.type == "cuda" and proxy.shape[-1] > _MAX_LANE_S:
        path = "planes"  # the lane kernels hold a proxy of at most 16 channels in registers
    if path == "reference":
        return attention_reference(q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size)
    if path == "planes":
        return attention_planes(q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size, "kernel")
    return torch.ops.gspn_lightning.attention_fwd(
        q, k, v, proxy, weight, bias, merge, u_bias, list(directions), chunk_size or 0
    )

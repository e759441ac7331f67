"""The GSPN line scan along one axis, :func:`gspn_scan`, and the gate normalisation that keeps it
stable, :func:`normalize_gates`: the public entry points that check their inputs and dispatch to the
compiled kernel (``torch.ops.gspn_lightning.scan_fwd``, registered by :mod:`._registry`) or to the
pure-PyTorch reference (:mod:`.reference`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve_backend
from ._checks import check_chunk_size, check_direction, check_tensors
from .reference import scan_geometry, scan_reference

__all__ = ["gspn_scan", "normalize_gates"]

_ARG_NAMES = ("x", "lam", "w_neg", "w_mid", "w_pos")


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
    check_tensors(_ARG_NAMES, (x, lam, w_neg, w_mid, w_pos))
    check_direction(direction)
    check_chunk_size(chunk_size)
    if chunk_size is not None:
        transpose, _ = scan_geometry(direction)
        if chunk_size >= x.shape[-1 if transpose else -2]:
            chunk_size = None  # one chunk covering the whole scan axis is the global scan (any size of k)
    if resolve_backend(backend, x.device) == "reference":
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
    check_tensors(("g_neg", "g_mid", "g_pos"), (g_neg, g_mid, g_pos))
    check_direction(direction)
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

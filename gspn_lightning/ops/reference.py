"""Pure-PyTorch reference of the GSPN scan: the definition the kernels are tested against, and the
low-rank gate projection the fused ``propagate_proj`` op computes on the fly.

It vectorises over the (batch, channel, line) axes and loops over the scan axis only, in the input
dtype, with gradients from autograd.  It is also the fallback when the compiled kernels are missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIRECTIONS = ("t2b", "b2t", "l2r", "r2l")

#: the six per-direction gate maps along axis 2 of ``gates``
GATE_FIELDS = ("g_neg", "g_mid", "g_pos", "lam", "u", "d")


def scan_geometry(direction: str) -> tuple[bool, bool]:
    """(transpose, reverse): l2r/r2l scan columns (lines are columns of the transposed image);
    b2t/r2l walk the scan axis backwards."""
    return direction in ("l2r", "r2l"), direction in ("b2t", "r2l")


def starts_group(s: int, length: int, k: int, reverse: bool) -> bool:
    """Whether the line at absolute position ``s`` is the first of its group ``s // k`` in scan order."""
    if reverse:
        return s == length - 1 or (s + 1) % k == 0
    return s % k == 0


def scan_reference(x, lam, w_neg, w_mid, w_pos, direction: str = "t2b", chunk_size: int | None = None):
    """``h = gspn_scan(...)`` computed line by line with ordinary tensor ops (no input checking)."""
    transpose, reverse = scan_geometry(direction)
    if transpose:
        x, lam, w_neg, w_mid, w_pos = (t.transpose(-1, -2) for t in (x, lam, w_neg, w_mid, w_pos))
    length = x.shape[-2]
    if length == 0 or x.shape[-1] == 0:
        out = lam * x
        return out.transpose(-1, -2) if transpose else out
    k = length if chunk_size is None or chunk_size >= length else chunk_size
    # unbind once: indexing a line out of a full tensor would cost a full-size gradient per line
    xs, ls, ns, ms, ps = (t.unbind(-2) for t in (x, lam, w_neg, w_mid, w_pos))
    lines: list[torch.Tensor | None] = [None] * length
    prev = None
    for s in range(length - 1, -1, -1) if reverse else range(length):
        h = ls[s] * xs[s]
        if not starts_group(s, length, k, reverse):
            h = (
                h
                + ns[s] * F.pad(prev[..., :-1], (1, 0))
                + ms[s] * prev
                + ps[s] * F.pad(prev[..., 1:], (0, 1))
            )
        lines[s] = prev = h
    out = torch.stack(lines, dim=-2)
    return out.transpose(-1, -2) if transpose else out


def project_gates(
    proxy: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_directions: int
) -> torch.Tensor:
    """The raw gate logits ``(B, K, 6, C, H, W)`` from the low-rank proxy ``(B, S, H, W)``: a 1x1
    convolution with ``weight`` ``(K*6*C, S)`` and ``bias`` ``(K*6*C,)`` (row ``(k*6 + f)*C + c`` gives
    field ``f`` of direction ``k`` at channel ``c``), exactly as the mixer's ``gates`` conv computes it."""
    B, _, H, W = proxy.shape
    gates = F.conv2d(proxy, weight[:, :, None, None], bias)
    return gates.view(B, num_directions, len(GATE_FIELDS), -1, H, W)

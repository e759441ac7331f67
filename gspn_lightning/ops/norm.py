"""The GSPN mixer's LayerNorm + GRN after the merge as one compiled op (docs/design.md, "The GSPN
mixer").

``layer_norm_grn(y, weight, bias, gamma, beta, eps, grn_eps)`` is, for a map ``y`` of shape
``(B, C, H, W)``, LayerNorm over the channels of each pixel (``weight``, ``bias`` of shape ``(C,)``)
followed by GRN (``gamma``, ``beta`` of ``C`` values, any shape: ``(1, C, 1, 1)`` as the GRN module
holds them)::

    z   = layer_norm(y)                                   per pixel, over C
    g   = ||z||_2 over (H, W)                             per (batch, channel)
    out = z * (1 + gamma * g / (mean_c g + grn_eps)) + beta

Its definition is the composition of :class:`~gspn_lightning.nn.LayerNorm2d` and
:class:`~gspn_lightning.nn.GRN` (what :func:`gspn_lightning.nn.norm.layer_norm_grn` runs where the op
is not used, and what the tests compare it with).  The op reads ``y`` channels-last (free for the
mixer's merged map, and for any channels-last map; a contiguous one is copied once) and returns
``out`` channels-last in ``y``'s dtype; the statistics are float32 for 16-bit maps, the parameters
may be float32 for a 16-bit map (autocast) and their gradients come back in their dtype.  Forward and
backward each take two passes over the map and store nothing of its size: the backward recomputes
the normalised map from ``y`` and the per-pixel mean and rstd the forward saved.  The CPU kernel is
``csrc/cpu/gspn_norm_cpu.cpp``, the CUDA kernels ``csrc/cuda/gspn_norm_kernels.h`` (executed on the CPU
by the test suite's host emulation; not yet run on a GPU); the math of both is ``csrc/gspn_norm.h``.
Double backward is not implemented (the composition supports it).
"""

from __future__ import annotations

import torch

from ._backend import kernel_available, resolve_norm_backend

__all__ = ["layer_norm_grn", "layer_norm_grn_selected"]

_HALF = (torch.float16, torch.bfloat16)


def layer_norm_grn_selected(backend: str | None, device: torch.device) -> bool:
    """Whether ``backend`` (``None``: ``$GSPN_BACKEND``, default ``"auto"``) runs the mixer's LayerNorm
    + GRN as this op on ``device`` (:func:`~gspn_lightning.ops._backend.resolve_norm_backend`:
    ``"kernel"``, or ``"auto"`` on the CPU and, once :data:`~gspn_lightning.ops._backend.CUDA_NORM_DEFAULT` says so, on CUDA) rather
    than as the two modules composed (``"planes"``, ``"reference"``); raises if ``"kernel"`` is asked for
    and unavailable."""
    return resolve_norm_backend(backend, device) == "kernel"


def layer_norm_grn(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-6,
    grn_eps: float = 1e-6,
) -> torch.Tensor:
    """LayerNorm over the channels, then GRN, of ``y`` ``(B, C, H, W)`` by the compiled op (see the
    module docstring); differentiable in ``y`` and the four parameters.  Raises if the kernel for
    ``y``'s device is unavailable (callers choose it with :func:`layer_norm_grn_selected`)."""
    if y.dim() != 4:
        raise ValueError(f"y must be (B, C, H, W), got shape {tuple(y.shape)}")
    if not kernel_available(y.device):
        raise RuntimeError(f"the GSPN layer_norm_grn kernel is unavailable for {y.device.type} tensors")
    params = [weight, bias, gamma.reshape(-1), beta.reshape(-1)]  # views
    acc = torch.float32 if y.dtype in _HALF else y.dtype
    if any(p.dtype != params[0].dtype for p in params) or params[0].dtype not in (y.dtype, acc):
        params = [p.to(y.dtype) for p in params]
    out, _mean, _rstd, _gnorm = torch.ops.gspn_lightning.layer_norm_grn_fwd(y, *params, float(eps), float(grn_eps))
    return out

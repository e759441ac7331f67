"""Input checking shared by the ops' public functions (:mod:`.scan`, :mod:`.propagate`): clear
``TypeError``/``ValueError`` messages before anything reaches a kernel."""

from __future__ import annotations

import torch

from .reference import DIRECTIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensors(names: tuple[str, ...], tensors: tuple) -> None:
    """Floating tensors, the first 4-D, all of one shape, dtype and device."""
    ref = tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
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


def check_direction(direction) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None for the global scan), got {chunk_size}")

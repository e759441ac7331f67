"""The GSPN line-scan op.

``gspn_scan(x, lam, w_neg, w_mid, w_pos, direction, chunk_size)`` runs the 2-D linear propagation of
GSPN along one spatial axis of ``(B, C, H, W)`` tensors; ``normalize_gates`` turns raw gate logits into
the row-stochastic weights that keep it stable.  The exact contract is in ``docs/design.md`` ("The scan op") and in
the docstrings below.

Backends: ``"kernel"`` (the JIT-built C++/CUDA kernels, registered with ``torch.library``) or
``"reference"`` (pure PyTorch, :func:`scan_reference`).  ``gspn_propagate`` (in :mod:`.propagate`) is the
mixer's whole propagation, four directions with gate normalisation and merge, as one fused op;
``gspn_propagate_proj`` the same with the low-rank gate projection fused in as well;
``gspn_attention`` (in :mod:`.attention`) the SD-XL swap's normalised GSPN attention, fused;
``layer_norm_grn`` (in :mod:`.norm`) the mixer's LayerNorm + GRN after the merge, fused.  ``backend=None`` reads ``$GSPN_BACKEND``
(default ``"auto"``: the kernel where it is available for the tensors' device, else the reference with
one warning).  The package imports and works without a C++ compiler, only slower.

Modules: :mod:`.scan` (``gspn_scan``, ``normalize_gates``), :mod:`.propagate` (the fused ops),
:mod:`.reference` (the pure-PyTorch scan and gate projection), ``_checks`` (input checking), ``_backend`` (kernel or
reference), ``_build`` (JIT build and loading of ``csrc/``), ``_registry`` (fake and autograd
implementations).  This file only re-exports; inside the package the imports run one way,
``scan``/``propagate`` -> ``_backend`` -> ``_build`` -> ``_registry``, with no cycle.
"""

from __future__ import annotations

from ._backend import kernel_available
from .attention import attention_planes, attention_reference, gspn_attention
from .norm import layer_norm_grn, layer_norm_grn_selected
from .propagate import (
    GATE_FIELDS,
    gspn_propagate,
    gspn_propagate_proj,
    project_gates,
    propagate_proj_reference,
    propagate_reference,
)
from .reference import DIRECTIONS, scan_geometry, scan_reference
from .scan import gspn_scan, normalize_gates

__all__ = [
    "DIRECTIONS",
    "GATE_FIELDS",
    "attention_planes",
    "attention_reference",
    "gspn_attention",
    "gspn_propagate",
    "gspn_propagate_proj",
    "gspn_scan",
    "kernel_available",
    "layer_norm_grn",
    "layer_norm_grn_selected",
    "normalize_gates",
    "project_gates",
    "propagate_proj_reference",
    "propagate_reference",
    "scan_geometry",
    "scan_reference",
]

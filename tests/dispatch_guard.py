"""A recorder of the ATen ops a piece of PyTorch code runs, for regression guards that need no GPU.

    from tests.dispatch_guard import OpRecorder

    with OpRecorder() as rec:
        with rec.phase("fwd"):
            y = layer(x)
        with rec.phase("bwd"):
            y.backward(go)
    rec.launches("fwd")                        # the ops that would launch a kernel (views left out)
    rec.larger_than(4 * x.numel())             # ops that produced a tensor above that many elements
    rec.copies_of(numel=emap)                  # clones / dtype or layout copies of a whole map
    rec.host_syncs("fwd")                      # ops that read a value back to the host
    print(rec.table())                         # the per-op list (for a failure message)

It is a ``TorchDispatchMode``: it sees every op below autograd, forward and backward (the CPU autograd
engine runs the backward on the calling thread, so the mode is active there), each with the tensors it
returns.  A compiled custom op (``gspn_lightning.propagate_proj_fwd``) is *one* record: what its kernel
does inside is invisible here, which is what these guards want (they check the code around the op).
For each op the recorder keeps the innermost frame of this project's Python code that issued it
(``None`` for ops issued by ATen's own autograd formulas), so a failure says where an op came from and a
guard can exempt one function by name.

Used by ``tests/test_layer_guards.py`` (the GSPN mixer); the same checks apply to any layer (the SD-XL
swapped attention block, issue 25).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["COPY_OPS", "HOST_SYNC_OPS", "OpRecord", "OpRecorder"]

_PROJECT = str(Path(__file__).resolve().parents[1] / "gspn_lightning")

#: ops that copy a tensor's values into a new tensor (a layout or dtype change, not a computation)
COPY_OPS = frozenset(
    {"aten.clone", "aten.contiguous", "aten.copy_", "aten._to_copy", "aten.copy", "aten._copy_from"}
)

#: ops that read tensor values back to the host (a device sync; no CUDA-graph capture) or whose output
#: shape depends on tensor values
HOST_SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.item",
        "aten.is_nonzero",
        "aten.equal",
        "aten.nonzero",
        "aten.masked_select",
        "aten.unique",
        "aten._unique",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten.repeat_interleave",
        "aten._assert_async",
        "aten.allclose",
    }
)

# Ops that only make a view or an alias (no kernel on any device).  ``OpOverload.is_view`` covers most;
# these are listed too for the overloads that do not declare it.
_VIEW_OPS = frozenset(
    {
        "aten.view",
        "aten._unsafe_view",
        "aten.reshape",
        "aten.transpose",
        "aten.permute",
        "aten.expand",
        "aten.unsqueeze",
        "aten.squeeze",
        "aten.t",
        "aten.detach",
        "aten.alias",
        "aten.as_strided",
        "aten.slice",
        "aten.select",
        "aten.split",
        "aten.split_with_sizes",
        "aten.unbind",
        "aten.chunk",
        "aten.narrow",
        "aten.flatten",
        "aten.unflatten",
        "aten.view_as",
        "aten.lift_fresh",
    }
)


@dataclasses.dataclass
class OpRecord:
    """One op: its name (``aten.mul.Tensor``), the phase it ran in, the (shape, stride, dtype) of each
    tensor it returned, and the project frame that issued it (``file:line in function``, or ``None``)."""

    name: str
    phase: str
    outputs: list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype]]
    is_view: bool
    where: str | None

    @property
    def packet(self) -> str:
        """The op's name without its overload: ``aten.mul``."""
        return self.name.rsplit(".", 1)[0] if self.name.count(".") >= 2 else self.name

    @property
    def max_numel(self) -> int:
        return max((_numel(shape) for shape, _, _ in self.outputs), default=0)

    def line(self) -> str:
        outs = ", ".join(
            f"{tuple(shape)}{'' if _contiguous(shape, stride) else ' strided'} {str(dtype).replace('torch.', '')}"
            for shape, stride, dtype in self.outputs
        )
        where = f"  <- {self.where}" if self.where else ""
        return f"{self.phase:>4} {'view' if self.is_view else '    '} {self.name} -> {outs}{where}"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _contiguous(shape, stride) -> bool:
    expected = 1
    for size, st in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True


def _project_frame() -> str | None:
    """The innermost frame of this project's package on the Python stack (``None`` if there is none)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_PROJECT):
            rel = filename[len(_PROJECT) - len("gspn_lightning") :]
            return f"{rel}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


class OpRecorder(TorchDispatchMode):
    """Records every op dispatched while it is active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self._phase = "-"

    @contextlib.contextmanager
    def phase(self, name: str):
        """Tag the ops run inside the block with ``name`` (``"fwd"``, ``"bwd"``)."""
        before, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        packet = name.rsplit(".", 1)[0] if name.count(".") >= 2 else name
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.records.append(
            OpRecord(
                name=name,
                phase=self._phase,
                outputs=[(tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors],
                is_view=bool(getattr(func, "is_view", False)) or packet in _VIEW_OPS,
                where=_project_frame(),
            )
        )
        return out

    # --- queries ------------------------------------------------------------------------------------

    def select(self, phase: str | None = None) -> list[OpRecord]:
        return [r for r in self.records if phase is None or r.phase == phase]

    def launches(self, phase: str | None = None) -> list[OpRecord]:
        """The ops that run a kernel (every op but views and aliases)."""
        return [r for r in self.select(phase) if not r.is_view]

    def counts(self, phase: str | None = None) -> Counter:
        """How many times each op (name without overload) launched."""
        return Counter(r.packet for r in self.launches(phase))

    def larger_than(self, numel: int, phase: str | None = None) -> list[OpRecord]:
        """Non-view ops that returned a tensor of more than ``numel`` elements."""
        return [r for r in self.launches(phase) if r.max_numel > numel]

    def copies_of(self, numel: int, phase: str | None = None) -> list[OpRecord]:
        """Copy ops (:data:`COPY_OPS`) that returned a tensor of at least ``numel`` elements."""
        return [r for r in self.launches(phase) if r.packet in COPY_OPS and r.max_numel >= numel]

    def of_dtype(self, dtype: torch.dtype, numel: int, phase: str | None = None) -> list[OpRecord]:
        """Non-view ops that returned a ``dtype`` tensor of at least ``numel`` elements."""
        return [
            r for r in self.launches(phase) if any(d == dtype and _numel(s) >= numel for s, _, d in r.outputs)
        ]

    def host_syncs(self, phase: str | None = None) -> list[OpRecord]:
        """Ops that read values back to the host or whose output shape depends on values."""
        return [r for r in self.select(phase) if r.packet in HOST_SYNC_OPS]

    def table(self, phase: str | None = None, records: list[OpRecord] | None = None) -> str:
        """One line per op (views marked), then the launch count per phase."""
        records = self.select(phase) if records is None else records
        lines = [r.line() for r in records]
        phases = sorted({r.phase for r in records})
        lines.append(
            "launches: "
            + ", ".join(f"{p} {sum(1 for r in records if r.phase == p and not r.is_view)}" for p in phases)
        )
        return "\n".join(lines)

"""Parameter and MAC table of registered models.

    python -m gspn_lightning.models.summary [names...] [--img-size 224]

Prints a markdown table: parameters (millions, at ``num_classes=1000``) and GMACs of one
``(1, 3, S, S)`` image.  Models are built on the meta device, so nothing is allocated or computed:
convolutions and matmuls are counted by ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2),
and the GSPN scan, a custom op the counter cannot see, is added by a forward hook on every
:class:`~gspn_lightning.nn.GSPNMixer`: 4 MACs per element per direction (``lam * x`` and three taps).
Elementwise work (activations, gate normalisation, norms) is not counted, as is usual.
Only classification models have a MAC count (the others take other inputs).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..nn import GSPNMixer
from . import create_model, list_models, model_entry

__all__ = ["PAPER", "count_macs", "count_params", "main", "summary_table"]

#: (params in M, GMACs at 224x224) reported in the paper
PAPER = {"gspn_t": (30, 5.3), "gspn_s": (50, 9.0), "gspn_b": (89, 15.9)}

SCAN_MACS_PER_ELEMENT = 4


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """``(total MACs, scan MACs)`` of one forward of a tensor of ``input_shape`` on the model's device."""
    scan_macs = 0

    def hook(mixer: GSPNMixer, args, _output) -> None:
        nonlocal scan_macs
        b, _, h, w = args[0].shape
        scan_macs += SCAN_MACS_PER_ELEMENT * len(mixer.directions) * b * mixer.d_inner * h * w

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, GSPNMixer)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.empty(*input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return counter.get_total_flops() // 2 + scan_macs, scan_macs


def summary_table(names: Sequence[str], img_size: int = 224) -> str:
    """The markdown table for ``names`` (params at ``num_classes=1000``, GMACs at ``img_size``)."""
    rows = [
        f"| model | params (M) | GMACs @{img_size} | of which scan | paper params (M) | paper GMACs @224 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        entry = model_entry(name)
        overrides = {"backend": "reference"} if entry.task == "classification" else {}
        with torch.device("meta"):
            model = create_model(name, **overrides).eval()
        params = count_params(model) / 1e6
        macs = scan = "-"
        if entry.task == "classification":
            in_chans = model.stem[0].in_channels
            total, scan_only = count_macs(model, (1, in_chans, img_size, img_size))
            macs, scan = f"{total / 1e9:.2f}", f"{scan_only / 1e9:.2f}"
        paper_p, paper_m = PAPER.get(name, ("-", "-"))
        rows.append(f"| {name} | {params:.2f} | {macs} | {scan} | {paper_p} | {paper_m} |")
    rows.append("")
    rows.append(
        "Parameters counted at num_classes=1000 (millions = 10^6). MACs: convolutions/linears from "
        "torch.utils.flop_counter.FlopCounterMode (FLOPs / 2) plus the GSPN scan, which that counter "
        "cannot see, counted as 4 MACs per element per direction (lam*x and three taps); elementwise "
        "ops (activations, gate normalisation, norms) are not counted."
    )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", help="registered model names (default: all classification models)"
    )
    parser.add_argument("--img-size", type=int, default=224, help="square input size for MACs (default 224)")
    args = parser.parse_args(argv)
    print(summary_table(args.names or list_models("classification"), args.img_size))


if __name__ == "__main__":
    main()

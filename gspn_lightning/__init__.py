"""gspn-lightning: GSPN layers, kernels and PyTorch Lightning training."""

__version__ = "0.1.0"

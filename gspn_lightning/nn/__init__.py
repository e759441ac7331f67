"""GSPN layers: the four-direction GSPN mixer (and its token adapter), blocks and normalisation layers.

Imports only ``torch`` and :mod:`gspn_lightning.ops`.
"""

from .blocks import DropPath, GSPNBlock, Mlp
from .mixer import GSPNMixer, GSPNTokenMixer
from .norm import GRN, LayerNorm2d

__all__ = ["GRN", "DropPath", "GSPNBlock", "GSPNMixer", "GSPNTokenMixer", "LayerNorm2d", "Mlp"]

"""GSPN layers: the four-direction GSPN mixer (and its token adapter), blocks and normalisation layers.

Imports only ``torch`` and :mod:`gspn_lightning.ops`.
"""

from .blocks import DropPath, GSPNBlock, Mlp
from .conv import DepthwiseConv2d
from .mixer import GSPNMixer, GSPNTokenMixer, MixerOptions
from .norm import GRN, LayerNorm2d

__all__ = [
    "GRN",
    "DepthwiseConv2d",
    "DropPath",
    "GSPNBlock",
    "GSPNMixer",
    "GSPNTokenMixer",
    "LayerNorm2d",
    "MixerOptions",
    "Mlp",
]

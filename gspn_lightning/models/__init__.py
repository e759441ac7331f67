"""Models, all built by name: ``create_model("gspn_t", num_classes=10)``, ``list_models()``.

Model files never import Lightning.  Each registers its sizes in :mod:`.registry` when imported, so
every model file is imported here.
"""

from . import gspn  # noqa: F401  (registers gspn_t / gspn_s / gspn_b)
from .registry import create_model, list_models, model_entry, register_model

__all__ = ["create_model", "list_models", "model_entry", "register_model"]

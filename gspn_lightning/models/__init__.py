"""Models, all built by name: ``create_model("gspn_t", num_classes=10)``, ``list_models()``.

Model files never import Lightning.  Each registers its sizes in :mod:`.registry` when imported, so
every model file is imported here.
"""

from . import dit, gspn, gspn_dit  # noqa: F401  (register gspn_t/s/b, gspn_dit_*, dit_*)
from .registry import create_model, list_models, model_entry, register_model

__all__ = ["create_model", "list_models", "model_entry", "register_model"]

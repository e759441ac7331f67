"""Models, all built by name: ``create_model("gspn_t", num_classes=10)``, ``list_models()``; saved as
a folder of weights + config and rebuilt from it: ``save_pretrained(model, folder)``,
``from_pretrained(folder)`` or ``create_model("gspn_t", pretrained=folder)``.

Model files never import Lightning.  Each registers its sizes in :mod:`.registry` when imported, so
every model file is imported here.
"""

from . import dit, gspn, gspn_dit  # noqa: F401  (register gspn_t/s/b, gspn_dit_*, dit_*)
from .pretrained import from_pretrained, save_pretrained
from .registry import create_model, list_models, model_entry, register_model

__all__ = [
    "create_model",
    "from_pretrained",
    "list_models",
    "model_entry",
    "register_model",
    "save_pretrained",
]

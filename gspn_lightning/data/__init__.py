"""Webdataset data side: shard writers and the image-classification DataModule.

``ImageWebDataModule`` is imported lazily (on first attribute access) so that the shard-writing
command lines (``python -m gspn_lightning.data.write_shards`` / ``.mnist_demo``) do not pay for
importing Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .write_shards import write_shards

if TYPE_CHECKING:
    from .datamodule import ImageWebDataModule

__all__ = ["ImageWebDataModule", "write_shards"]


def __getattr__(name: str) -> Any:
    if name == "ImageWebDataModule":
        from .datamodule import ImageWebDataModule

        return ImageWebDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

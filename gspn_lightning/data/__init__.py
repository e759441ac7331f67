"""Webdataset data side: the generic shard machinery, per-task decoders and the shard writers.

- :mod:`.shards`: shard specifications, exactly-once evaluation, resampled training, ``ShardDataModule``;
- :mod:`.images`: ``ImageWebDataModule`` (image + class: classification, pixel-space diffusion);
- :mod:`.latents`: ``LatentWebDataModule`` (VAE latent + class: latent diffusion) and the encoding of
  image shards into latent shards (``gspn encode-latents``);
- :mod:`.captions`: ``CaptionWebDataModule`` (image + caption, optional prompt embeddings: SD-XL
  distillation) and the writing of such shards from a folder of captioned images (``gspn write-captions``);
- :mod:`.write_shards`, :mod:`.mnist_demo`: writing shards (``gspn write-shards``, ``gspn write-demo-mnist``).

The data modules are imported lazily (on first attribute access) so that the shard-writing commands
do not pay for importing Lightning, and the writers are imported from their own modules only, so a
task that reads :mod:`.protocol` loads no writer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .captions import CaptionWebDataModule
    from .images import ImageWebDataModule
    from .latents import LatentWebDataModule
    from .shards import ShardDataModule

__all__ = [
    "CaptionWebDataModule",
    "ImageWebDataModule",
    "LatentWebDataModule",
    "ShardDataModule",
]

_LAZY = {
    "CaptionWebDataModule": "captions",
    "ImageWebDataModule": "images",
    "LatentWebDataModule": "latents",
    "ShardDataModule": "shards",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""SD-XL's components from a local diffusers folder and its text conditioning.

    from gspn_lightning.models.sdxl_pipeline import (
        check_sdxl_folder, load_sdxl, encode_prompt, time_ids, added_cond_kwargs, sdxl_text_embed)

    parts = load_sdxl("/models/sdxl-base-1.0")                 # local files only, nothing downloads
    embeds, pooled = encode_prompt(parts.tokenizers, parts.text_encoders, ["a red apple", ""])
    cond = added_cond_kwargs(pooled, original_size=(1024, 1024), crop_top_left=(0, 0),
                             target_size=(1024, 1024))
    eps = parts.unet(latents, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample

    embed = sdxl_text_embed("/models/sdxl-base-1.0")            # captions -> float16 numpy embeddings

The folder is what ``StableDiffusionXLPipeline.save_pretrained`` writes (and what a checkout of
``stable-diffusion-xl-base-1.0`` holds): ``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
``tokenizer/``, ``tokenizer_2/``, ``scheduler/``, each with its config and (for models) weights;
``model_index.json`` at the top is optional here.  :func:`check_sdxl_folder` lists *everything* missing
in one error before diffusers is asked to load anything.

No pretrained SD-XL weights can be had on the machine this project is developed on; the tests run the
same loading path on the tiny folder :func:`gspn_lightning.testing.make_tiny_sdxl` writes (random weights, SD-XL's structure:
``text_time`` micro-conditioning, two CLIP text encoders whose penultimate hidden states are
concatenated, a pooled projection, a 4-channel VAE with 8x downsampling, SD-XL's Euler scheduler config).

This file does not import Lightning; diffusers and transformers are imported inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

__all__ = [
    "PARTS",
    "SDXLComponents",
    "added_cond_kwargs",
    "check_sdxl_folder",
    "encode_prompt",
    "load_sdxl",
    "sdxl_text_embed",
    "time_ids",
    "tokenize",
]

#: the sub-folders of an SD-XL checkout, in the order diffusers' model_index.json lists them
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

# What each part needs: a config file, and (for models) one of the weight files.  Variants
# ("diffusion_pytorch_model.fp16.safetensors") and sharded weights (an ``.index.json``) count too.
_CONFIG = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "tokenizer": "tokenizer_config.json",
    "tokenizer_2": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
_TRANSFORMERS_WEIGHTS = "model"
_WEIGHTS = {
    "unet": _DIFFUSERS_WEIGHTS,
    "vae": _DIFFUSERS_WEIGHTS,
    "text_encoder": _TRANSFORMERS_WEIGHTS,
    "text_encoder_2": _TRANSFORMERS_WEIGHTS,
}
#: what a weight file's name ends with after its stem (``stem[.variant]<suffix>``; an ``.index.json``: sharded)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
#: a tokenizer folder needs the BPE files (or the tokenizers library's single tokenizer.json)
_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """``stem[.variant].safetensors|.bin`` or their sharded ``.index.json`` in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.name.startswith(stem + ".") and p.name.endswith(_WEIGHT_SUFFIXES)
    )


def _variant(folder: Path, stem: str) -> str | None:
    """``None`` when the plain weights exist, else the variant of the first variant file (e.g. ``fp16``)."""
    files = _weight_files(folder, stem)
    plain = {stem + suffix for suffix in _WEIGHT_SUFFIXES}
    if any(p.name in plain for p in files):
        return None
    for p in files:  # stem.<variant>.safetensors
        parts = p.name[len(stem) + 1 :].split(".")
        if len(parts) >= 2:
            return parts[0]
    return None


def _check_parts(parts: Iterable[str]) -> tuple[str, ...]:
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts!r}")
    return parts


def check_sdxl_folder(path: str | Path, parts: Iterable[str] = PARTS) -> Path:
    """Check that ``path`` is a local SD-XL folder in the diffusers layout with the ``parts`` asked for.

    Returns the folder as a ``Path``; raises one ``FileNotFoundError`` that lists every missing folder,
    config and weight file (not just the first thing diffusers would trip over) and says what to put there.
    """
    parts = _check_parts(parts)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"SD-XL folder not found: {root}. Put a diffusers SD-XL checkout there (the folders "
            f"{', '.join(p + '/' for p in parts)}, e.g. a local copy of stable-diffusion-xl-base-1.0 or what "
            "StableDiffusionXLPipeline.save_pretrained writes); nothing is downloaded at run time"
        )
    missing: list[str] = []
    for part in parts:
        folder = root / part
        if not folder.is_dir():
            missing.append(f"{part}/ (the whole folder)")
            continue
        if not (folder / _CONFIG[part]).is_file():
            missing.append(f"{part}/{_CONFIG[part]}")
        if part in _WEIGHTS and not _weight_files(folder, _WEIGHTS[part]):
            stem = _WEIGHTS[part]
            missing.append(
                f"{part}/{stem}.safetensors (or {stem}.bin, a variant such as {stem}.fp16.safetensors)"
            )
        if part.startswith("tokenizer") and not any(
            all((folder / f).is_file() for f in files) for files in _TOKENIZER_FILES
        ):
            missing.append(f"{part}/vocab.json + {part}/merges.txt (or {part}/tokenizer.json)")
    if missing:
        raise FileNotFoundError(
            f"incomplete SD-XL folder {root}: missing\n  - " + "\n  - ".join(missing) + "\nEach of "
            f"{', '.join(p + '/' for p in parts)} needs its config and weights as diffusers' save_pretrained "
            "writes them; nothing is downloaded at run time"
        )
    return root


@dataclass
class SDXLComponents:
    """The parts of an SD-XL checkout; those not asked for are ``None``."""

    unet: object = None
    vae: object = None
    text_encoder: object = None
    text_encoder_2: object = None
    tokenizer: object = None
    tokenizer_2: object = None
    scheduler: object = None
    #: ``model_index.json``'s ``force_zeros_for_empty_prompt`` (SD-XL base: True): a pipeline with no
    #: negative prompt uses zero embeddings for the unconditional branch, not the encoded ``""``
    force_zeros_for_empty_prompt: bool = True

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.nn.Module)
        }

    def to(self, device=None, dtype: torch.dtype | None = None) -> SDXLComponents:
        """Move every loaded model (in place) and return ``self``."""
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        return self


def _scheduler_class(config: dict):
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config") or "Scheduler" not in str(name):
        raise ValueError(
            f"scheduler/scheduler_config.json: _class_name {name!r} is not a diffusers scheduler"
        )
    return cls


def load_sdxl(
    path: str | Path, parts: Iterable[str] = PARTS, dtype: torch.dtype | None = None
) -> SDXLComponents:
    """Load the ``parts`` of the local SD-XL folder ``path`` (``local_files_only=True``: nothing downloads).

    Models come back in eval mode with ``requires_grad`` left as loaded (callers freeze what they freeze),
    on the CPU, in ``dtype`` (``None``: as stored).  A weight variant (``.fp16.safetensors``) is used when
    the plain file is absent.  See :func:`check_sdxl_folder` for the layout.
    """
    parts = _check_parts(parts)
    root = check_sdxl_folder(path, parts)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = SDXLComponents()
    index = root / "model_index.json"
    if index.is_file():
        out.force_zeros_for_empty_prompt = bool(
            json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)
        )
    dtype_kw = {} if dtype is None else {"torch_dtype": dtype}
    models = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    for part in parts:
        folder = root / part
        if part in models:
            variant = _variant(folder, _WEIGHTS[part])
            kw = dict(dtype_kw, local_files_only=True, **({"variant": variant} if variant else {}))
            if part in ("text_encoder", "text_encoder_2"):
                if dtype is not None:
                    kw["dtype"] = kw.pop("torch_dtype")  # transformers' name for it
            else:
                kw["low_cpu_mem_usage"] = False  # needs accelerate otherwise (not a dependency)
            model = models[part].from_pretrained(str(folder), **kw)
            setattr(out, part, model.eval())
        elif part.startswith("tokenizer"):
            setattr(out, part, CLIPTokenizer.from_pretrained(str(folder), local_files_only=True))
        else:
            config = json.loads((folder / _CONFIG[part]).read_text())
            out.scheduler = _scheduler_class(config).from_config(config)
    return out


# ----------------------------------------------------------------------------------------- conditioning


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``(B, model_max_length)`` as SD-XL pads and truncates them (77 for CLIP)."""
    max_len = int(tokenizer.model_max_length)
    if max_len > 10_000:  # transformers' "no limit" sentinel: the tokenizer config lacks model_max_length
        raise ValueError(
            "tokenizer has no model_max_length (SD-XL's CLIP tokenizers set 77 in tokenizer_config.json)"
        )
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
    )
    return ids.input_ids


def encode_prompt(tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str] | str):
    """SD-XL's text conditioning: ``(prompt_embeds (B, 77, D1 + D2), pooled (B, D2))``.

    Each prompt goes through both tokenizer/encoder pairs; the penultimate hidden states of both are
    concatenated along the channels, and the pooled (projected) output of the last encoder with a
    projection (``CLIPTextModelWithProjection``: SD-XL's ``text_encoder_2``) is the pooled embedding.
    ``""`` encodes the empty prompt (what training drops captions to; a pipeline without a negative
    prompt uses zeros instead when the folder says ``force_zeros_for_empty_prompt``).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(tokenizers) != len(text_encoders) or not tokenizers:
        raise ValueError(
            f"tokenizers and text_encoders must pair up, got {len(tokenizers)} and {len(text_encoders)}"
        )
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        device = next(encoder.parameters()).device
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds
    if pooled is None:
        raise ValueError(
            "no text encoder with a projection (CLIPTextModelWithProjection) gives the pooled embedding"
        )
    return torch.cat(hidden, dim=-1), pooled


def _pairs(value, name: str, batch: int | None) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[-1] != 2:
        raise ValueError(f"{name} must be (h, w) or a (B, 2) tensor of them, got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] not in (1, batch):
        raise ValueError(f"{name} has {t.shape[0]} rows for a batch of {batch}")
    return t


def time_ids(original_size, crop_top_left, target_size, batch: int | None = None) -> torch.Tensor:
    """SD-XL's micro-conditioning ``add_time_ids``, ``(B, 6)`` float32: ``original (h, w)``, ``crop (top,
    left)``, ``target (h, w)`` in pixels.  Each argument is a pair or a ``(B, 2)`` tensor (per sample);
    pairs are broadcast to the batch (``batch`` or the largest given)."""
    parts = [
        _pairs(v, n, batch)
        for v, n in (
            (original_size, "original_size"),
            (crop_top_left, "crop_top_left"),
            (target_size, "target_size"),
        )
    ]
    rows = [p.shape[0] for p in parts]
    b = batch if batch is not None else max(rows)
    if any(r not in (1, b) for r in rows):
        raise ValueError(
            f"original_size, crop_top_left and target_size have {rows} rows: each needs 1 or the batch size"
        )
    return torch.cat([p.expand(b, 2) for p in parts], dim=1)


def added_cond_kwargs(pooled: torch.Tensor, original_size, crop_top_left=(0, 0), target_size=None) -> dict:
    """The UNet's ``added_cond_kwargs`` for a batch: ``{"text_embeds": pooled, "time_ids": (B, 6)}``, on
    ``pooled``'s device and dtype.  ``target_size`` defaults to ``original_size``."""
    if pooled.dim() != 2:
        raise ValueError(f"pooled must be (B, D), got shape {tuple(pooled.shape)}")
    target_size = original_size if target_size is None else target_size
    ids = time_ids(original_size, crop_top_left, target_size, batch=pooled.shape[0])
    return {"text_embeds": pooled, "time_ids": ids.to(device=pooled.device, dtype=pooled.dtype)}


def sdxl_text_embed(sdxl_folder: str | Path, device: str = "cpu"):
    """``embed(captions) -> (prompt_embeds, pooled)`` float16 numpy arrays from the SD-XL folder's two
    frozen text encoders (what :func:`~gspn_lightning.data.captions.write_caption_shards` stores)."""
    parts = load_sdxl(sdxl_folder, parts=("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    encoders = [e.to(device).eval() for e in parts.text_encoders]

    @torch.no_grad()
    def embed(captions: list[str]):
        prompt, pooled = encode_prompt(parts.tokenizers, encoders, captions)
        return prompt.half().cpu().numpy(), pooled.half().cpu().numpy()

    return embed

"""Text-to-image with SD-XL from a local folder, with GSPN in place of self-attention, into PNGs.

    gspn generate --sdxl /models/sdxl-base-1.0 \\
        --gspn-weights runs/sdxl/gspn.safetensors --prompt "a red apple on a table" \\
        --width 2048 --height 1024 --steps 30 --guidance-scale 5 --seed 0 --out images/ [--vae-tiling]
    ... --prompts-file prompts.txt --num-images-per-prompt 4 --batch-size 2

The SD-XL folder is read with :func:`~gspn_lightning.models.sdxl_pipeline.load_sdxl` (local files only).
With ``--gspn-weights`` (a :func:`~gspn_lightning.models.sdxl.save_gspn_weights` file) the UNet is swapped
with the options saved in that file and the weights loaded; ``--gspn-options '{"d_state": 8}'``
overrides them, or, without weights, swaps with a fresh (untrained) initialisation.  Without either, the
original attention runs (the teacher).

Generation is diffusers' ``StableDiffusionXLPipeline`` built from those components (the swap replaces
modules in place, so the pipeline needs no change): SD-XL's prompt encoding, micro-conditioning
(original = target = the generated size, crop 0), classifier-free guidance, and the folder's scheduler.
Image ``j`` of prompt ``i`` is drawn from its own generator seeded ``seed + i * num_images_per_prompt +
j`` (``--seeds`` lists them explicitly), so an image does not depend on the batch it was drawn in.
PNGs are written atomically as ``<out>/<index>_<seed>.png`` beside ``<out>/generation.json`` (every
prompt, seed, file and setting).  ``--vae-tiling`` decodes in tiles (``vae.enable_tiling()``), which
large sizes need for memory.

``--progressive 1024,2048,4096 [--strength 0.4] [--stage-steps 30,30,20] [--save-stages]`` makes very
large images the way the GSPN paper timed them: the first size from text, then each next size by
upscaling the previous image and refining it from an intermediate noise level (SDEdit), with the tiled
VAE (:mod:`gspn_lightning.models.sdxl_progressive`).

This module does not import Lightning (it lives in ``models/`` beside the swap for that reason: the
``tasks`` package imports Lightning).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .sdxl import swap_and_load_gspn_weights, swap_self_attention
from .sdxl_pipeline import PARTS, load_sdxl
from .sdxl_progressive import DEFAULT_STRENGTH, plan_stages, refine_pipeline, run_stages

__all__ = ["build_pipeline", "draw_images", "generate", "read_prompts"]


def read_prompts(prompts: Sequence[str] = (), prompts_file: str | Path | None = None) -> list[str]:
    """The prompts given, then the non-empty lines of ``prompts_file`` (UTF-8)."""
    out = list(prompts)
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file not found: {path}")
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompts: give prompts or a prompts_file with one prompt per line")
    return out


def build_pipeline(
    sdxl: str | Path,
    gspn_weights: str | Path | None = None,
    gspn_options: dict | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_tiling: bool = False,
):
    """A ``StableDiffusionXLPipeline`` on the local SD-XL folder ``sdxl``, its UNet swapped as asked.

    Returns ``(pipeline, replaced_layer_names)`` (an empty list: the original attention)."""
    from diffusers import StableDiffusionXLPipeline

    parts = load_sdxl(sdxl, dtype=dtype)
    names: list[str] = []
    if gspn_weights is not None:
        names = swap_and_load_gspn_weights(parts.unet, gspn_weights, **(gspn_options or {}))
    elif gspn_options is not None:
        names = swap_self_attention(parts.unet, **gspn_options)  # new modules take the UNet's dtype
    pipe = StableDiffusionXLPipeline(
        **{part: getattr(parts, part) for part in PARTS},  # the pipeline's components, by the same names
        force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        add_watermarker=False,
    ).to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    return pipe, names


def _write_png(image: np.ndarray, path: Path) -> None:
    """A float ``(H, W, 3)`` image in [0, 1] to ``path``, atomically (a crash leaves no partial PNG)."""
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray((image * 255).round().clip(0, 255).astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _check_size(name: str, value: int, multiple: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < multiple or value % multiple:
        raise ValueError(f"{name} must be a positive multiple of {multiple} (the VAE's scale), got {value!r}")
    return int(value)


def _check_progressive(width, height, progressive, strength, steps, stage_steps, save_stages):
    """Errors for options that do not go together, before a pipeline is built (the VAE's scale is
    checked again once it is known)."""
    if progressive is None:
        for name, v in (
            ("strength", strength),
            ("stage_steps", stage_steps),
            ("save_stages", save_stages or None),
        ):
            if v is not None:
                raise ValueError(f"{name} is an option of progressive generation: give progressive sizes too")
        return
    if width is not None or height is not None:
        raise ValueError("give width/height or progressive sizes, not both (the last size is the output's)")
    plan_stages(progressive, DEFAULT_STRENGTH if strength is None else strength, steps, stage_steps)


def generator_device(device: str | torch.device) -> str | torch.device:
    """Where the per-image generators live: the GPU for CUDA pipelines, else the CPU."""
    return device if torch.device(device).type == "cuda" else "cpu"


def draw_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    negative_prompt: str | None = None,
    gen_device: str | torch.device = "cpu",
) -> np.ndarray:
    """One batch through ``pipe``: image ``k`` of prompt ``prompts[k]`` from its own generator seeded
    ``seeds[k]`` (so an image does not depend on its batch); float ``(B, H, W, 3)`` in [0, 1]."""
    generators = [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        result = pipe(
            prompt=list(prompts),
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
            width=width,
            height=height,
            num_inference_steps=int(steps),
            guidance_scale=float(guidance_scale),
            generator=generators,
            output_type="np",
        )
    return result.images


def generate(
    sdxl: str | Path,
    prompts: Sequence[str],
    out: str | Path,
    width: int | None = None,
    height: int | None = None,
    steps: int = 30,
    guidance_scale: float = 5.0,
    negative_prompt: str | None = None,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    num_images_per_prompt: int = 1,
    batch_size: int = 1,
    gspn_weights: str | Path | None = None,
    gspn_options: dict | None = None,
    vae_tiling: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    pipeline=None,
    progressive: Sequence | None = None,
    strength: float | Sequence[float] | None = None,
    stage_steps: Sequence[int] | None = None,
    save_stages: bool = False,
) -> list[Path]:
    """Generate ``num_images_per_prompt`` images per prompt at ``width x height`` into PNGs in ``out``.

    Args:
        sdxl: the local SD-XL folder (ignored when ``pipeline`` is given).
        seed, seeds: image ``k`` (prompt-major order) uses ``seeds[k]`` or ``seed + k``.
        negative_prompt: ``None``: SD-XL's default (zero embeddings for the unconditional branch when the
            folder says ``force_zeros_for_empty_prompt``).
        guidance_scale: classifier-free guidance (``<= 1`` turns it off).
        gspn_weights, gspn_options: see :func:`build_pipeline`.
        device, dtype: default ``cuda``/``bfloat16`` when a GPU exists, else ``cpu``/``float32``.
        pipeline: a ``(pipeline, names)`` pair from :func:`build_pipeline` to reuse.
        width, height: the size (default 1024 x 1024); not with ``progressive``.
        progressive: sizes (``N`` or ``WxH``, increasing), the first generated from text, each next one
            by upscaling the previous image and refining it (see
            :mod:`~gspn_lightning.models.sdxl_progressive`); the images have the last size.
        strength: the noise level each refinement starts from, in (0, 1] (default 0.4), one for all or one
            per refinement: a stage of ``n`` steps runs the last ``int(n * strength)`` of them.
        stage_steps: one schedule length per progressive size (default ``steps`` for each).
        save_stages: also write each earlier stage's image as ``<index>_<seed>_stage<k>_<W>x<H>.png``.

    Returns the PNG paths in order.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    for name, v in (
        ("steps", steps),
        ("num_images_per_prompt", num_images_per_prompt),
        ("batch_size", batch_size),
    ):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    jobs = [(p, j) for p in prompts for j in range(num_images_per_prompt)]
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(jobs):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(jobs)} images")
    else:
        seeds = [int(seed) + k for k in range(len(jobs))]
    _check_progressive(width, height, progressive, strength, steps, stage_steps, save_stages)
    pipe, names = pipeline if pipeline is not None else build_pipeline(
        sdxl, gspn_weights, gspn_options, device=device, dtype=dtype, vae_tiling=vae_tiling
    )  # fmt: skip
    if progressive is not None:
        strength = DEFAULT_STRENGTH if strength is None else strength
        stages = plan_stages(progressive, strength, steps, stage_steps, pipe.vae_scale_factor)
        width, height = stages[-1].width, stages[-1].height
        refiner = refine_pipeline(pipe)
    else:
        stages = None
        width = _check_size("width", 1024 if width is None else width, pipe.vae_scale_factor)
        height = _check_size("height", 1024 if height is None else height, pipe.vae_scale_factor)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=not progress, desc=f"{width}x{height}", dynamic_ncols=True)
    gen_device = generator_device(device)
    paths, records, stage_files = [], [], {}
    start = time.perf_counter()
    for b in range(0, len(jobs), batch_size):
        chunk = list(range(b, min(b + batch_size, len(jobs))))
        if stages is None:
            images = draw_images(
                pipe, [jobs[k][0] for k in chunk], [seeds[k] for k in chunk], width, height, steps,
                guidance_scale, negative_prompt, gen_device,
            )  # fmt: skip
        else:
            generators = [torch.Generator(gen_device).manual_seed(seeds[k]) for k in chunk]

            def save_stage(i, stage, images, chunk=chunk):
                if not save_stages or i == len(stages) - 1:
                    return
                for k, image in zip(chunk, images):
                    path = out / f"{k:05d}_{seeds[k]}_stage{i}_{stage.width}x{stage.height}.png"
                    _write_png(image.permute(1, 2, 0).cpu().numpy(), path)
                    stage_files.setdefault(k, []).append(path.name)

            images = run_stages(
                pipe, stages, [jobs[k][0] for k in chunk], generators, refiner=refiner,
                on_stage=save_stage, progress=progress, guidance_scale=float(guidance_scale),
                negative_prompt=None if negative_prompt is None else [negative_prompt] * len(chunk),
            ).permute(0, 2, 3, 1).cpu().numpy()  # fmt: skip
        for k, image in zip(chunk, images):  # float in [0, 1], (H, W, 3)
            path = out / f"{k:05d}_{seeds[k]}.png"
            _write_png(image, path)
            paths.append(path)
            records.append({"file": path.name, "prompt": jobs[k][0], "seed": seeds[k]})
            if k in stage_files:
                records[-1]["stages"] = stage_files[k]
    info = {
        "sdxl": str(sdxl) if pipeline is None else None,
        "gspn_weights": None if gspn_weights is None else str(gspn_weights),
        "gspn_options": gspn_options,
        "gspn_layers": len(names),
        "width": width,
        "height": height,
        "steps": int(steps),
        "guidance_scale": float(guidance_scale),
        "negative_prompt": negative_prompt,
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "vae_tiling": bool(getattr(pipe.vae, "use_tiling", False)) or stages is not None,
        "progressive": None
        if stages is None
        else [
            {"width": st.width, "height": st.height, "steps": st.steps, "strength": st.strength}
            for st in stages
        ],
        "seconds": round(time.perf_counter() - start, 3),
        "images": records,
    }
    (out / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    return paths

"""Progressive SD-XL generation to very high resolution: a base image, then upscale-and-refine stages.

This is the route the GSPN release takes to its large SD-XL images (after LinFusion's "SDEdit" route and
DemoFusion's progressive upscaling): its SD-XL inference script draws 512² from text, then refines to
1024², 2048², 4096² and 8192², each stage from the previous image resized in pixel space, re-encoded and
noised to strength 0.42, 0.32, 0.32, 0.28 (50 steps up to 2048², 30 above), with the tiled VAE.  The model
only has to add the detail the new size allows, not invent a composition at a size it never saw.

Each refinement stage:

1. **upscales in pixel space** (bicubic, clamped to [0, 1]) the previous stage's decoded image;
2. **re-encodes** it with the VAE (a posterior sample, as SDEdit does), in tiles where it is larger than
   the VAE's tile;
3. runs diffusers' ``StableDiffusionXLImg2ImgPipeline`` built from the *same* modules as the text-to-image
   pipeline (the swapped or the original UNet alike): a ``steps``-long schedule of which the last
   ``int(steps * strength)`` steps run, starting from the re-encoded latent noised to that level;
4. decodes, in tiles where large.

Why pixel space and not the latent: SD-XL latents are not smooth images; interpolating them gives latents
the decoder never saw (blur and colour shifts that a moderate ``strength`` does not repair), whereas the
decoded image upscales cleanly and its re-encoding is a latent of a real, if soft, image, which is what
SDEdit assumes.  The price, a tiled decode and encode per stage, is small next to the UNet at those sizes.

Not done here (so times from this pipeline are not the paper's): the release's refinement also mixes the
noised input latent back in at every step with a cosine weight (DemoFusion's skip residual) and runs a
second UNet pass per step, with dilated convolutions, on a Gaussian-filtered latent (ScaleCrafter-like);
ours is plain SDEdit, one (guided) UNet evaluation per step.

The VAE's tiling is switched on for the run (``vae.enable_tiling()``; diffusers tiles only inputs larger
than its tile, so small stages run whole) and restored afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_STRENGTH",
    "Stage",
    "parse_size",
    "plan_stages",
    "refine_pipeline",
    "run_stages",
    "upscale",
]

DEFAULT_STRENGTH = 0.4  # within the release's 0.28-0.42 (its SD-XL script's stages from 1K to 8K)


@dataclass(frozen=True)
class Stage:
    """One stage: its size in pixels, the length of its schedule and the noise level it starts from (the
    last ``int(steps * strength)`` steps run; stage 0, from text, has strength 1 and runs them all)."""

    width: int
    height: int
    steps: int
    strength: float = 1.0


def parse_size(size) -> tuple[int, int]:
    """``1024`` / ``"1024"`` (square) or ``(2048, 1024)`` / ``"2048x1024"`` (width x height) -> ``(w, h)``."""
    if isinstance(size, bool):
        raise ValueError(f"a progressive size must be N or WxH, got {size!r}")
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return int(size[0]), int(size[1])
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", size)
        if m:
            w = int(m.group(1))
            return w, int(m.group(2)) if m.group(2) else w
    raise ValueError(f"a progressive size must be N or WxH (e.g. 1024 or 2048x1024), got {size!r}")


def plan_stages(
    sizes: Sequence,
    strength: float | Sequence[float],
    steps: int,
    stage_steps: Sequence[int] | None = None,
    multiple: int = 8,
) -> list[Stage]:
    """Check a progressive plan and return its stages; every error says which entry is wrong.

    ``sizes``: the base size then one size per refinement (at least two), each ``N`` or ``WxH``, each a
    multiple of ``multiple`` (the VAE's scale), no side smaller than the one before and none equal to it.
    ``strength``: one value in (0, 1] for every refinement or one per refinement (``len(sizes) - 1``);
    ``stage_steps`` (one per size, default ``steps`` for all) integers >= 1, and every refinement must run
    at least one step: ``int(steps_k * strength_k) >= 1``.
    """
    if isinstance(sizes, (str, int)) or len(sizes) < 2:
        raise ValueError(f"progressive needs at least two sizes (the base and one refinement), got {sizes!r}")
    parsed = [parse_size(s) for s in sizes]
    for k, (w, h) in enumerate(parsed):
        for name, v in (("width", w), ("height", h)):
            if v < multiple or v % multiple:
                raise ValueError(
                    f"progressive size {k} ({w}x{h}): {name} must be a positive multiple of {multiple} "
                    f"(the VAE's scale)"
                )
        if k and (w < parsed[k - 1][0] or h < parsed[k - 1][1] or (w, h) == parsed[k - 1]):
            raise ValueError(
                f"progressive sizes must increase: size {k} ({w}x{h}) is not larger than size {k - 1} "
                f"({parsed[k - 1][0]}x{parsed[k - 1][1]}) on one side and no smaller on the other"
            )
    strengths = list(strength) if isinstance(strength, (list, tuple)) else [strength] * (len(parsed) - 1)
    if len(strengths) != len(parsed) - 1:
        raise ValueError(
            f"strength has {len(strengths)} entries for {len(parsed) - 1} refinements (give one, or one per size "
            f"after the first)"
        )
    for v in strengths:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(
                f"strength must be in (0, 1] (the noise level a refinement starts from), got {strength!r}"
            )
    if stage_steps is None:
        stage_steps = [steps] * len(parsed)
    stage_steps = list(stage_steps)
    if len(stage_steps) != len(parsed):
        raise ValueError(f"stage_steps has {len(stage_steps)} entries for {len(parsed)} progressive sizes")
    for k, n in enumerate(stage_steps):
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"stage_steps[{k}] must be an integer >= 1, got {n!r}")
        if k and int(n * strengths[k - 1]) < 1:
            raise ValueError(
                f"stage {k} runs no step: int(steps {n} x strength {strengths[k - 1]}) = 0; "
                f"raise its steps or strength"
            )
    return [Stage(w, h, int(n), float(v)) for (w, h), n, v in zip(parsed, stage_steps, [1.0, *strengths])]


def refine_pipeline(pipe):
    """A ``StableDiffusionXLImg2ImgPipeline`` sharing every module of the text-to-image ``pipe``.

    Nothing is copied: the UNet (swapped or not), VAE, text encoders and scheduler are the same objects."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(
        **pipe.components,
        requires_aesthetics_score=False,  # SD-XL base's conditioning (the refiner model's is True)
        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
        add_watermarker=False,
    )


def upscale(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``(B, 3, h, w)`` images in [0, 1] to ``(B, 3, height, width)``: bicubic in float32, clamped to [0, 1]."""
    out = F.interpolate(images.float(), size=(height, width), mode="bicubic", align_corners=False)
    return out.clamp_(0, 1)


def run_stages(
    pipe,
    stages: Sequence[Stage],
    prompt: list[str],
    generator: list[torch.Generator],
    refiner=None,
    on_stage: Callable[[int, Stage, torch.Tensor], None] | None = None,
    progress: bool = True,
    **call_kwargs,
) -> torch.Tensor:
    """Run the stages for one batch; returns the last stage's ``(B, 3, H, W)`` images in [0, 1] (float32).

    ``call_kwargs`` (``negative_prompt``, ``guidance_scale``) go to every stage; each image's generator
    carries on from stage to stage, so an image depends only on its seed.  ``on_stage(k, stage, images)``
    is called after each stage (for saving it)."""
    refiner = refiner if refiner is not None else refine_pipeline(pipe)
    vae = pipe.vae
    was_tiling = bool(getattr(vae, "use_tiling", False))
    vae.enable_tiling()
    images = None
    try:
        for k, stage in enumerate(stages):
            desc = f"stage {k + 1}/{len(stages)} {stage.width}x{stage.height}"
            runner = pipe if k == 0 else refiner
            runner.set_progress_bar_config(disable=not progress, desc=desc, dynamic_ncols=True)
            kwargs = dict(prompt=prompt, num_inference_steps=stage.steps, generator=generator,
                          output_type="pt", **call_kwargs)  # fmt: skip
            with torch.inference_mode():
                if k == 0:
                    result = runner(width=stage.width, height=stage.height, **kwargs)
                else:
                    result = runner(
                        image=upscale(images, stage.width, stage.height), strength=stage.strength, **kwargs
                    )
            images = result.images.float()
            if on_stage is not None:
                on_stage(k, stage, images)
    finally:
        if not was_tiling:
            vae.disable_tiling()
    return images

"""Text-to-image evaluation: a caption set through the GSPN (or original) SD-XL pipeline on every rank,
then FID against reference images and CLIP score.

    gspn t2i-eval --sdxl models/stable-diffusion-xl-base-1.0 --gspn-weights out/gspn_ema.safetensors \\
        --captions coco/annotations/captions_val2014.json --num-captions 30000 --out runs/t2i_coco \\
        --reference coco/val2014_256/ --clip models/clip-vit-large-patch14 [--width 1024 --height 1024]
    torchrun --nproc_per_node 8 "$(command -v gspn)" t2i-eval ...        # the same, split over 8 GPUs

``--captions`` is a text file (one caption per line, blank lines skipped) or a COCO-style JSON file
(``{"annotations": [{"caption": ...}, ...]}``, or a plain list of strings), read in file order; the
first ``--num-captions`` are used. Caption ``i`` is drawn with seed ``seed + i`` into
``<out>/images/<i>.png``, split over ranks and resumable exactly as ``gspn sample`` is (the same
index split, the same atomic PNGs skipped when present, the same ``drawing.json`` record that refuses a
folder drawn with other settings: :mod:`gspn_lightning.cli.sample`). Without ``--gspn-weights`` (or
``--gspn-options``) the original attention UNet draws, which gives the teacher's figures.

Once every rank is done, rank 0 writes ``<out>/captions.json`` (index: file, caption, seed of every
image) and scores the images: FID (``--metrics``, as ``gspn fid`` takes them) against
``--reference`` (a folder or ``.npz`` of real images, or statistics from ``gspn stats``) and the CLIP
score (torchmetrics ``CLIPScore`` with the local CLIP folder ``--clip``; never a download), into
``<out>/report.json``, printed as JSON. Either score is left out when its option is not given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ._common import add_fid_arguments, rank_and_world, wait_for_all_ranks
from .fid import metric_list

PROG = "gspn t2i-eval"
INDEX = "captions.json"
REPORT = "report.json"


def read_captions(path: str | os.PathLike) -> list[str]:
    """The captions of a text file (one per non-blank line) or a COCO-style JSON file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        items = data.get("annotations") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(
                f"{path}: expected {{'annotations': [{{'caption': ...}}, ...]}} or a list of captions"
            )
        captions = [item["caption"] if isinstance(item, dict) else item for item in items]
        if not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{path}: every annotation needs a 'caption' string")
        captions = [" ".join(c.split()) for c in captions]
    else:
        captions = [line.strip() for line in text.splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--sdxl", required=True, help="local SD-XL folder (diffusers layout)")
    p.add_argument("--captions", required=True, help="captions: .txt (one per line) or COCO-style .json")
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (images/, captions.json, report.json)"
    )
    p.add_argument("--num-captions", type=int, default=None, help="use the first N captions (default: all)")
    p.add_argument("--gspn-weights", default=None, help="a save_gspn_weights safetensors file")
    p.add_argument(
        "--gspn-options", default=None, help="JSON for swap_self_attention (without weights: untrained)"
    )
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="caption i uses seed + i")
    p.add_argument("--sample-batch-size", type=int, default=1, help="captions drawn at once per rank")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--reference", default=None, help="real images (folder or .npz) or statistics, for FID")
    p.add_argument(
        "--metrics", type=metric_list, default=["fid"], help="as gspn fid takes them (default: fid)"
    )
    p.add_argument(
        "--clip", default=None, help="local CLIP folder (CLIPModel + CLIPProcessor) for CLIP score"
    )
    add_fid_arguments(p)  # --batch-size (scoring), --device, --weights, --no-progress
    return p


def _record(args: argparse.Namespace, captions: list[str], options: dict | None) -> dict:
    """What the images are drawn with: a later run into the same folder must match it."""
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    return {
        "sdxl": str(Path(args.sdxl).resolve()),
        "gspn_weights": None if args.gspn_weights is None else str(Path(args.gspn_weights).resolve()),
        "gspn_options": options, "width": args.width, "height": args.height, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt, "seed": args.seed,
        "captions_sha256": digest, "dtype": args.dtype,
    }  # fmt: skip


def draw_captions(pipeline, out: Path, captions: list[str], indices: Sequence[int], args, device) -> int:
    """Draw the captions of ``indices`` that have no PNG yet into ``out/images``; how many were drawn."""
    from tqdm.auto import tqdm

    from gspn_lightning.diffusion.samples import png_path
    from gspn_lightning.models.sdxl_generate import _write_png, draw_images, generator_device

    pipe, _ = pipeline
    todo = [i for i in indices if not png_path(out, i).exists()]
    (out / "images").mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    step = max(1, args.sample_batch_size)
    with tqdm(total=len(todo), unit="img", desc="t2i", disable=args.no_progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            images = draw_images(
                pipe, [captions[i] for i in chunk], [args.seed + i for i in chunk], args.width, args.height,
                args.steps, args.guidance_scale, args.negative_prompt, generator_device(device),
            )  # fmt: skip
            for i, image in zip(chunk, images):
                _write_png(image, png_path(out, i))
            bar.update(len(chunk))
    return len(todo)


def score(out: Path, captions: list[str], args) -> dict:
    """FID (and the other ``--metrics``) against ``--reference`` and the CLIP score of ``out/images``."""
    from gspn_lightning.diffusion.samples import png_path

    files = [png_path(out, i) for i in range(len(captions))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(files)} images are missing (e.g. {missing[:3]})")
    report: dict = {"num_images": len(files), "images": str((out / "images").resolve())}
    if args.reference is not None:
        from gspn_lightning.metrics import METRICS, compute_metrics, format_table

        metrics = list(METRICS) if "all" in args.metrics else args.metrics
        result = compute_metrics(
            args.reference, out / "images", metrics=metrics, batch_size=args.batch_size, device=args.device,
            weights_path=args.weights, progress=not args.no_progress, kid_subset_size=min(1000, len(files)),
        )  # fmt: skip
        report.update(result, reference=args.reference)
        print(format_table(result), file=sys.stderr)
    if args.clip is not None:
        from gspn_lightning.metrics.clip_score import clip_score

        report["clip_score"] = clip_score(
            out / "images", captions, args.clip, batch_size=args.batch_size, device=args.device
        )
        report["clip_model"] = str(Path(args.clip).resolve())
    return report


def _check_out_folder_on_all_ranks(out: Path, record: dict, rank: int, world: int) -> None:
    """:func:`gspn_lightning.cli.sample.check_out_folder` run by rank 0 before any rank draws (a rank
    that started first would otherwise write a PNG into a folder without a record, which rank 0 then
    refuses); a refusal stops every rank."""
    from .sample import check_out_folder

    refused = None
    if rank == 0:
        try:
            check_out_folder(out, record, write=True)
        except SystemExit as exc:
            refused = exc
    if world > 1:
        import torch.distributed as dist

        wait_for_all_ranks(world)  # (starts the process group)
        reason = [None if refused is None else str(refused.code)]
        dist.broadcast_object_list(reason, src=0)
        if reason[0] is not None and rank != 0:
            raise SystemExit(f"rank 0 refused {out}: {reason[0]}")
    if refused is not None:
        raise refused


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        captions = read_captions(args.captions)
        if args.num_captions is not None:
            if args.num_captions < 1:
                raise ValueError("--num-captions must be >= 1")
            captions = captions[: args.num_captions]
        options = None
        if args.gspn_options is not None:
            options = json.loads(args.gspn_options)
            if not isinstance(options, dict):
                raise ValueError(f"--gspn-options must be a JSON object, got {args.gspn_options!r}")
        # what the scoring needs is checked before hours of drawing, not after
        if args.reference is not None:
            from gspn_lightning.metrics.inception import resolve_weights_path

            if not Path(args.reference).expanduser().exists():
                raise FileNotFoundError(f"--reference {args.reference} does not exist")
            resolve_weights_path(args.weights)
        if args.clip is not None and not (Path(args.clip).expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"--clip {args.clip} is not a local CLIP folder (no config.json)")
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: {err}") from err

    import torch

    from gspn_lightning.diffusion.samples import sample_indices
    from gspn_lightning.models.sdxl_generate import build_pipeline

    rank, world, local_rank = rank_and_world()
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = (
        dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )
    _check_out_folder_on_all_ranks(args.out, _record(args, captions, options), rank, world)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        pipeline = build_pipeline(args.sdxl, args.gspn_weights, options, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    drawn = draw_captions(
        pipeline, args.out, captions, sample_indices(len(captions), rank, world), args, device
    )
    del pipeline
    wait_for_all_ranks(world)
    if rank != 0:
        return 0
    from gspn_lightning.diffusion.samples import png_path

    index = [
        {"index": i, "file": png_path(args.out, i).name, "caption": c, "seed": args.seed + i}
        for i, c in enumerate(captions)
    ]
    (args.out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    report = {"drew_on_rank_0": drawn, "ranks": world, **_record(args, captions, options)}
    try:
        report.update(score(args.out, captions, args))
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from err
    text = json.dumps(report, indent=1)
    (args.out / REPORT).write_text(text + "\n")
    print(text)
    return 0


# python -m gspn_lightning.cli.t2i_eval: the same as gspn t2i-eval (run_module comes with the edges
# branch's change to gspn_lightning.cli, which every tool module's __main__ block uses)
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))

"""Draw samples from a trained diffusion checkpoint, on every rank, into PNGs and one ``.npz``.

    gspn sample --ckpt runs/dit/checkpoints/last.ckpt --out samples/ \\
        --num-samples 50000 [--sampler ddpm --steps 250 --guidance-scale 1.0 --batch-size 64]
    torchrun --nproc_per_node 8 -m gspn_lightning.cli sample ...      # the same, split over 8 GPUs

Sample ``i`` (0 <= i < N) has class ``i % num_classes`` (class-balanced) and is drawn entirely from
its own seed ``(seed, i)``: the starting noise and every stochastic step.  Rank ``r`` of ``w`` draws the
indices ``i % w == r`` and writes ``<out>/images/<i>.png`` atomically; a sample whose PNG exists is
not drawn again, so a restarted job neither duplicates nor skips, and the images do not depend on the
number of ranks or the batch size (up to floating-point reordering) (:mod:`gspn_lightning.diffusion.samples`).
When all N are there, rank 0 packs them into ``<out>/samples.npz`` (``arr_0``: uint8 ``(N, H, W, C)``
as ADM's evaluation suite reads, ``labels``: ``(N,)``) and writes ``<out>/protocol.json`` with
everything that makes two FIDs comparable (checkpoint, step, weights, sampler, steps, guidance, VAE).

The settings the images are drawn with (checkpoint file and step, weights, sampler, steps, guidance,
clipping, seed, VAE, size) are recorded in ``<out>/drawing.json`` before the first image; a later run
into the same folder with any other of them stops and names each difference (old and new value)
instead of packing the old images under the new settings. Only ``--num-samples`` may change. A
folder with images but no record is refused too. The checkpoint is loaded as weights only.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from gspn_lightning.diffusion.samples import draw, pack, sample_indices

PROG = "gspn sample"
#: the file in ``--out`` recording the settings its images were drawn with
RECORD = "drawing.json"


def check_out_folder(out: Path, record: dict, write: bool) -> None:
    """Refuse ``out`` when its images were drawn with other settings than ``record`` (or with
    settings it does not record); with ``write``, record ``record`` there when it is new."""
    path = out / RECORD
    if path.is_file():
        old = json.loads(path.read_text())
        diffs = [
            f"{k}: {old.get(k)!r} there, {record.get(k)!r} now"
            for k in sorted(set(old) | set(record))
            if old.get(k) != record.get(k)
        ]
        if diffs:
            raise SystemExit(
                f"{out} holds samples drawn with other settings ({'; '.join(diffs)}): give another --out, "
                "or empty the folder to draw anew"
            )
        return
    if any((out / "images").glob("*.png")):
        raise SystemExit(
            f"{out}/images holds samples but {path} does not say what drew them: give another --out, "
            "or empty the folder to draw anew"
        )
    if write:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RECORD}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)


def load_sampler_model(ckpt: str, use_ema: bool = True, device: str = "cpu"):
    """(network, task hyper-parameters, global step) from a DiffusionTask checkpoint."""
    from gspn_lightning.tasks.checkpointing import load_checkpoint_file
    from gspn_lightning.tasks.diffusion import DiffusionTask

    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    state = load_checkpoint_file(ckpt, mmap=True)  # weights only: refuses a file that runs code
    task = DiffusionTask.load_from_checkpoint(ckpt, map_location="cpu")
    net = task.ema.module if (use_ema and task.ema is not None) else task.model
    return net.to(device).eval(), dict(task.hparams), int(state.get("global_step", -1))


def _parser() -> argparse.ArgumentParser:
    from gspn_lightning.diffusion import SAMPLERS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a DiffusionTask checkpoint")
    p.add_argument("--out", required=True, type=Path, help="output folder (images/, samples.npz)")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--guidance-channels", type=int, default=None, help="guide only the first k channels")
    p.add_argument(
        "--clip-sample", type=float, default=None,
        help="clip each step's predicted x_0 to [-R, R] (default: the checkpoint's clip_sample; 0: off)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None, help="latent/pixel size (default: the data's)")
    p.add_argument(
        "--vae", default=None, help="local diffusers VAE folder (default: the task's; none = pixels)"
    )
    p.add_argument("--raw-weights", action="store_true", help="sample from the raw weights, not the EMA")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.num_samples < 1:
        raise SystemExit("--num-samples must be >= 1")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    net, hp, step = load_sampler_model(args.ckpt, use_ema=not args.raw_weights, device=device)
    size = args.image_size or hp.get("image_size")
    if not size:
        raise SystemExit("the checkpoint does not record the image/latent size: pass --image-size")
    vae_path = args.vae if args.vae is not None else hp.get("vae")
    vae = None
    if vae_path:
        from gspn_lightning.diffusion.vae import load_vae

        vae = load_vae(vae_path, device)
    num_classes = hp["num_classes"]
    clip = args.clip_sample if args.clip_sample is not None else hp.get("clip_sample")
    clip = clip if clip else None  # 0 turns it off
    shape = (net.in_channels, int(size), int(size))
    record = {
        "checkpoint": str(Path(args.ckpt).resolve()), "global_step": step,
        "weights": "raw" if args.raw_weights else "ema", "model": hp.get("model"), "num_classes": num_classes,
        "sampler": args.sampler, "steps": args.steps, "guidance_scale": args.guidance_scale,
        "guidance_channels": args.guidance_channels, "clip_sample": clip, "seed": args.seed,
        "vae": vae_path, "image_size": size,
    }  # fmt: skip
    check_out_folder(args.out, record, write=rank == 0)
    args.out.mkdir(parents=True, exist_ok=True)
    drawn = draw(
        net, args.out, sample_indices(args.num_samples, rank, world), num_classes, shape, args.seed,
        args.batch_size, vae=vae, progress=not args.no_progress, sampler=args.sampler, steps=args.steps,
        guidance_scale=args.guidance_scale, guidance_channels=args.guidance_channels,
        clip_sample=clip, prediction=hp.get("prediction", "eps"),
    )  # fmt: skip
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
    if rank == 0:
        path = pack(args.out, args.num_samples, num_classes)
        protocol = {
            "checkpoint": record["checkpoint"], "global_step": step, "weights": record["weights"],
            "model": hp.get("model"), "num_samples": args.num_samples, "class_balanced": True,
            "sampler": args.sampler, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "guidance_channels": args.guidance_channels, "clip_sample": clip, "seed": args.seed,
            "vae": vae_path,
            "image_size": size,
        }  # fmt: skip
        (args.out / "protocol.json").write_text(json.dumps(protocol, indent=1) + "\n")
        print(f"drew {drawn} on rank 0; {args.num_samples} samples in {path}")
    return 0

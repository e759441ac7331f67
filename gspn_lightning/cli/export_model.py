"""``gspn export-model CKPT OUT [--raw-weights]``: the model of a classification or diffusion checkpoint
as a folder that ``create_model(name, pretrained=OUT)`` / ``from_pretrained(OUT)`` rebuild by name
(``model.safetensors`` + ``config.json``, see :mod:`gspn_lightning.models.pretrained`), and that any
task's ``init_from`` takes. The EMA weights unless ``--raw-weights`` (or the run kept no EMA).
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "gspn export-model"


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="write a checkpoint's model as model.safetensors + config.json"
    )
    parser.add_argument("ckpt", help="a ClassificationTask or DiffusionTask checkpoint (.ckpt)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--raw-weights", action="store_true", help="the raw weights, not their EMA")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        print(f"export-model: no such checkpoint: {args.ckpt}", file=sys.stderr)
        return 1
    from gspn_lightning.models import save_pretrained
    from gspn_lightning.tasks import ClassificationTask, DiffusionTask
    from gspn_lightning.tasks.checkpointing import checkpoint_task, load_checkpoint_file

    written = checkpoint_task(load_checkpoint_file(args.ckpt, mmap=True)) or ""
    name = written.rsplit(".", 1)[-1]
    tasks = {cls.__name__: cls for cls in (ClassificationTask, DiffusionTask)}
    if name not in tasks:
        hint = " (use gspn distill-export for the GSPN adapter)" if name == "DistillationTask" else ""
        print(f"export-model: {args.ckpt} is a {name or 'unknown'} checkpoint, not one of {sorted(tasks)}{hint}",
              file=sys.stderr)  # fmt: skip
        return 1
    task = tasks[name].load_from_checkpoint(args.ckpt, map_location="cpu")
    try:
        task.require_trained(f"to export {args.ckpt}")
    except RuntimeError as exc:
        print(f"export-model: {exc}", file=sys.stderr)
        return 1
    use_ema = task.ema is not None and not args.raw_weights
    folder = save_pretrained(task.ema.module if use_ema else task.model, args.out)
    print(f"wrote {folder} ({'EMA' if use_ema else 'raw'} weights of {task.hparams.model})")
    return 0


# python -m gspn_lightning.cli.export_model: the same as gspn export-model
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))

"""Command-line entry point: ``python cli.py {fit,validate,test,predict} --config configs/<task>/<name>.yaml``.

A LightningCLI with the task and the datamodule chosen by ``class_path`` in the config, plus:

- a ``ModelCheckpoint`` (``checkpoint.*``) saving ``last.ckpt`` into ``<trainer.default_root_dir>/checkpoints``
  — a fixed folder, so ``--ckpt_path last`` resumes model, optimiser, scheduler, EMA and step count
  from it in a later run (also on another node);
- an ``OnExceptionCheckpoint`` in the same folder, so a crash or Ctrl-C loses nothing;
- the resolved config saved beside each run's logs (LightningCLI's ``config.yaml``);
- ``THP_MEM_ALLOC_ENABLE=1`` unless set otherwise (huge pages for large CPU tensors, see below);
- ``predict`` saves its outputs to ``<trainer.default_root_dir>/predictions/predictions-rank<r>.pt``.
"""

from __future__ import annotations

import os
import warnings

# Large fresh CPU tensors (activations, gradients) are otherwise mmapped and page-faulted in 4 KiB
# pages on every step: measured on the 2-core dev machine, faulting a 134 MB output cost more than the
# scan kernel that fills it.  PyTorch's transparent-huge-page allocation cuts that; it is read once,
# at the first large allocation, so it is set before torch is imported.  An explicit setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import LightningCLI

from gspn_lightning.tasks import PredictionWriter

# The task's EMA copy of the model is always in eval mode, which Lightning would warn about each run.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def checkpoint_dir(default_root_dir: str | None) -> str:
    return os.path.join(default_root_dir or os.getcwd(), "checkpoints")


def prediction_dir(default_root_dir: str | None) -> str:
    return os.path.join(default_root_dir or os.getcwd(), "predictions")


class GSPNCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.save_last": True, "checkpoint.filename": "epoch{epoch:03d}-step{step}"}
        )
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.add_lightning_class_args(OnExceptionCheckpoint, "exception_checkpoint")
        parser.link_arguments(
            "trainer.default_root_dir", "exception_checkpoint.dirpath", compute_fn=checkpoint_dir
        )
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.link_arguments(
            "trainer.default_root_dir", "prediction_writer.output_dir", compute_fn=prediction_dir
        )


def main(args=None, run: bool = True) -> GSPNCLI:
    return GSPNCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()

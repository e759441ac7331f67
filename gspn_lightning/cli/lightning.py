"""``gspn {fit,validate,test,predict} --config configs/<task>/<name>.yaml``: the LightningCLI.

A LightningCLI with the task and the datamodule chosen by ``class_path`` in the config, plus:

- a :class:`~gspn_lightning.tasks.checkpointing.ResumableCheckpoint` (``checkpoint.*``, Lightning's
  ``ModelCheckpoint`` arguments) saving ``last.ckpt`` into ``<trainer.default_root_dir>/checkpoints``
  — a fixed folder, so ``--ckpt_path last`` resumes model, optimiser, scheduler, EMA and step count
  in a later run (also on another node). ``last`` means the checkpoint of that folder with the highest
  completed step that loads; writes are atomic; a crash or SIGTERM during training saves
  ``on_exception.ckpt`` (full state, never before the first step); see that module for the rules;
- the facts that belong to the data (``num_classes``, ``in_chans``, ``image_size``) linked from the
  datamodule into the task, so no config types them twice;
- configs read in omegaconf mode: a value may be ``${...}``, an interpolation of another value of the
  same config file (e.g. one ``image_size`` read by the data, the model and the sampler);
- the resolved config saved beside each run's logs (LightningCLI's ``config.yaml``);
- ``THP_MEM_ALLOC_ENABLE=1`` unless set otherwise (huge pages for large CPU tensors, see below);
- checkpoints loaded as weights only (``torch.load(weights_only=True)``: a file that would run code
  to unpickle is refused, for ``last`` and for a path alike); ``--ckpt_path FILE`` works for every
  task as ``last`` does: the command line defines the task and its model, the checkpoint only its
  state. A checkpoint of another task is refused at start-up naming the task that wrote it, one of
  other model arguments when it is loaded, naming both values (see
  :func:`~gspn_lightning.tasks.checkpointing.check_checkpoint_matches`). (Lightning's own CLI would
  instead replace the command line's model arguments by the checkpoint's, silently.)
- ``predict`` saves its outputs to ``<trainer.default_root_dir>/predictions/predictions-rank<r>.pt``;
  a ``predict`` without ``data.init_args.predict_shards`` stops at start-up saying so (instead of
  predicting nothing and exiting 0);
- the logger: TensorBoard by default (:func:`default_logger`: ``<trainer.default_root_dir>/
  lightning_logs/version_<n>``, where Lightning's CSV logger wrote, the SLURM job id as the version
  under SLURM), whatever Lightning would pick; ``trainer.logger`` in a config names another (the
  CSV logger: see docs/design.md) and ``--trainer.logger false`` none.
"""

from __future__ import annotations

import os
import sys
import warnings

# Large fresh CPU tensors (activations, gradients) are otherwise mmapped and page-faulted in 4 KiB
# pages on every step: measured on the 2-core dev machine, faulting a 134 MB output cost more than the
# scan kernel that fills it.  PyTorch's transparent-huge-page allocation cuts that; it is read once,
# at the first large allocation, so it is set before torch is imported.  An explicit setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from gspn_lightning.tasks import PredictionWriter, ResumableCheckpoint  # noqa: E402

# The task's EMA copy of the model is always in eval mode, which Lightning would warn about each run.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# Evaluation metrics are torchmetrics objects already reduced over ranks when the task logs them.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)(_ema)?/")

#: how config files are read: omegaconf, so a config can interpolate its own values with ``${...}``
PARSER_MODE = "omegaconf"


def checkpoint_dir(default_root_dir: str | None) -> str:
    return os.path.join(default_root_dir or os.getcwd(), "checkpoints")


def prediction_dir(default_root_dir: str | None) -> str:
    return os.path.join(default_root_dir or os.getcwd(), "predictions")


#: the folder (under ``trainer.default_root_dir``) of each run's logs, as Lightning's default loggers name it
LOG_NAME = "lightning_logs"


def default_logger(default_root_dir: str | None):
    """The logger of a run whose config sets none: TensorBoard, in ``<default_root_dir>/lightning_logs/
    version_<n>`` (the SLURM job id as the version under SLURM), the folders Lightning's own default
    loggers use. Lightning itself would fall back to its CSV logger, silently, where ``tensorboard`` is
    not installed; this is an error naming the two ways out instead."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.loggers import TensorBoardLogger

    save_dir = default_root_dir or os.getcwd()
    try:
        return TensorBoardLogger(save_dir=save_dir, name=LOG_NAME, version=SLURMEnvironment.job_id())
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"the default logger is TensorBoard, and tensorboard is not installed ({exc}): install it "
            "(pip install tensorboard; it is a dependency of gspn-lightning), or set trainer.logger "
            "(class_path: lightning.pytorch.loggers.CSVLogger, or false)"
        ) from exc


def check_predict_data(subcommand: str | None, data_args) -> None:
    """``predict`` needs predict shards (``data_args``: the data's ``init_args`` as parsed): without
    them Lightning would run over nothing and exit 0. Checked before anything is built."""
    if subcommand != "predict" or data_args is None:
        return
    if "predict_shards" in data_args and not data_args["predict_shards"]:
        raise ValueError(
            "predict has nothing to run over: set data.init_args.predict_shards (a folder of shards "
            "written by gspn write-shards, its index.json or a brace pattern), e.g. "
            "--data.init_args.predict_shards data/shards/my_images"
        )


def data_fact(name: str):
    """compute_fn of a data -> model link: the data's value, or a clear error when it has none.

    A data module lists the facts it provides in ``linked_facts`` (default: all of :data:`DATA_LINKS`);
    a fact it does not provide (the caption data of the SD-XL task has no classes) links ``None``,
    which a task that has no such argument ignores."""

    def get(data):
        if name not in getattr(data, "linked_facts", DATA_LINKS):
            return None
        value = getattr(data, name, None)
        if value is None:
            raise ValueError(
                f"the data does not know its {name} (no shard index lists it): set data.init_args.{name}"
            )
        return value

    return get


#: facts that belong to the data and reach the task through links, never typed twice in a config
DATA_LINKS = ("num_classes", "in_chans", "image_size")


class GSPNCLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        """Check a ``--ckpt_path FILE`` (weights only) against the task of the command line; unlike
        LightningCLI's, do not replace the command line's model arguments by the checkpoint's."""
        from pathlib import Path

        from gspn_lightning.tasks.checkpointing import (
            check_checkpoint_task,
            checkpoint_task,
            load_checkpoint_file,
        )

        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # "last", "best", "hpc" or nothing: resolved (and checked) when loaded
        written = checkpoint_task(load_checkpoint_file(ckpt_path, mmap=True))
        class_path = self.config[subcommand].get("model", {}).get("class_path")
        if class_path:
            check_checkpoint_task(written, class_path, ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        data = config.get("data")
        check_predict_data(self.subcommand, data.get("init_args") if data is not None else None)

    def instantiate_trainer(self, **kwargs):
        """The trainer, with :func:`default_logger` where the config sets no logger (``trainer.logger``
        unset or ``true``)."""
        trainer_config = self._get(self.config_init, "trainer", default={}) or {}
        if "logger" not in kwargs and trainer_config.get("logger") in (None, True):
            kwargs["logger"] = default_logger(trainer_config.get("default_root_dir"))
        return super().instantiate_trainer(**kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        kwargs["weights_only"] = True  # Lightning's own load of the checkpoint (fit/validate/test/predict)
        return kwargs

    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "{epoch:03d}-{step}"})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        for name in DATA_LINKS:
            parser.link_arguments(
                "data", f"model.init_args.{name}", compute_fn=data_fact(name), apply_on="instantiate"
            )
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.link_arguments(
            "trainer.default_root_dir", "prediction_writer.output_dir", compute_fn=prediction_dir
        )


def parser_kwargs(prog: str = "gspn") -> dict:
    """LightningCLI's ``parser_kwargs``: omegaconf mode for the main parser and every subcommand's
    (LightningCLI hands the subcommand parsers only the keys named after them), ``gspn`` as the name."""
    return {
        "parser_mode": PARSER_MODE,
        "prog": prog,
        **{sub: {"parser_mode": PARSER_MODE} for sub in GSPNCLI.subcommands()},
    }


def main(args=None, run: bool = True) -> GSPNCLI:
    """The LightningCLI: with ``run`` the first argument is the subcommand (``fit`` ...); without, the
    classes are only instantiated from the arguments (what the config tests check)."""
    return GSPNCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs(),
        args=args,
        run=run,
    )


# python -m gspn_lightning.cli.lightning: the same as gspn {fit,validate,test,predict}
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))

"""What a task reads from its datamodule, named: :class:`TaskData` (every task), :class:`ClassData`
(the facts of class-conditional image or latent data) and :class:`LatentData` (latents that know their
VAE).

The data modules of this package follow them (``ShardDataModule`` and its subclasses); a datamodule
of your own works with a task when it has the attributes (plain attributes or properties) of the
protocol the task reads. A task reads them through :func:`task_data`, which names what a datamodule
lacks instead of silently reading ``None``:

================  ====================================  ==========================================
protocol          attributes                            read by
================  ====================================  ==========================================
``TaskData``      ``batch_size`` (per device),          every task: the lr scaling
                  ``epoch_samples`` (over all ranks,    (``optim.base_batch_size``), the schedule's
                  ``None``: unknown),                   length, the exactly-once check of
                  ``num_train_samples``,                evaluation counts
                  ``num_val_samples``,
                  ``num_test_samples`` (``None``:
                  unknown)
``ClassData``     the above and ``num_classes``,        ``ClassificationTask`` (the data's classes
                  ``in_chans``, ``image_size``          against the model's); the command line's
                  (``None``: unknown); optionally       data -> model links (``linked_facts``: the
                  ``linked_facts``                      ones it provides, default all three)
``LatentData``    the above and ``vae`` (the folder     ``DiffusionTask``: decodes its samples with
                  of the VAE the latents were made      it unless ``model.init_args.vae`` is set
                  with, ``None``: unknown)
================  ====================================  ==========================================

The check looks at the attributes' presence only: a property is not evaluated (it may read a shard
index).
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["ClassData", "LatentData", "TaskData", "missing_attributes", "provides", "task_data"]


class TaskData(Protocol):
    """What every task reads from its datamodule."""

    #: samples per device (per rank) and batch
    batch_size: int
    #: training samples per epoch over all ranks (``None``: unknown; the schedule then needs max_epochs)
    epoch_samples: int | None
    #: samples of each split according to its index (``None``: unknown; the count check is skipped)
    num_train_samples: int | None
    num_val_samples: int | None
    num_test_samples: int | None


class ClassData(TaskData, Protocol):
    """Class-conditional image or latent data: the facts that belong to the data, never typed twice."""

    num_classes: int | None
    in_chans: int | None
    image_size: int | None


class LatentData(ClassData, Protocol):
    """Latents that know the VAE they were made with."""

    vae: str | None


def _attributes(protocol: type) -> list[str]:
    names: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass is object or klass is Protocol or not getattr(klass, "_is_protocol", False):
            continue
        names += [n for n in getattr(klass, "__annotations__", {}) if n not in names]
    return names


def missing_attributes(datamodule: Any, protocol: type = TaskData) -> list[str]:
    """The attributes of ``protocol`` that ``datamodule`` lacks (properties are not evaluated)."""
    own = getattr(datamodule, "__dict__", {})
    return [n for n in _attributes(protocol) if n not in own and not hasattr(type(datamodule), n)]


def provides(datamodule: Any, protocol: type) -> bool:
    """Whether ``datamodule`` has every attribute of ``protocol``."""
    return datamodule is not None and not missing_attributes(datamodule, protocol)


def task_data(datamodule: Any, protocol: type = TaskData, reader: str = "the task") -> Any:
    """``datamodule`` checked against ``protocol`` (``None`` stays ``None``: a task fitted on bare
    dataloaders); a ``TypeError`` naming the missing attributes, the protocol and the ``reader``
    otherwise."""
    if datamodule is None:
        return None
    missing = missing_attributes(datamodule, protocol)
    if missing:
        raise TypeError(
            f"{reader} reads {protocol.__name__} from its datamodule (gspn_lightning.data.protocol), but "
            f"{type(datamodule).__name__} has no {', '.join(missing)}"
        )
    return datamodule


class CorruptDataError(RuntimeError):
    """The data cannot be what the config says: ``max_sample_failures`` samples in a row could not be
    decoded, or an epoch (training, or an evaluation) had no usable row at all."""

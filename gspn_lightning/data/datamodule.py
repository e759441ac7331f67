"""Compatibility module: the classification data used to live here. The generic shard machinery is
now :mod:`gspn_lightning.data.shards` and the image decoding :mod:`gspn_lightning.data.images`; every
name is re-exported so existing imports keep working."""

from .images import (  # noqa: F401
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DecodeSample,
    ImageWebDataModule,
    MagnitudeNoiseRandAugment,
    build_eval_transform,
    build_train_transform,
    parse_randaugment,
)
from .shards import (  # noqa: F401
    CORRUPT_LABEL,
    CorruptDataError,
    EvalShardSamples,
    FixedLengthLoader,
    RowDecoder,
    SampleError,
    ShardDataModule,
    ShardReadError,
    TrainShardStream,
    collate,
    distributed_rank_world,
    eval_split,
    resolve_shards,
    robust_tar_samples,
    shuffle_buffer_samples,
)

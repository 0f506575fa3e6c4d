"""Experiment configuration: what each field means, its rules, loading, and what it implies.

- :mod:`~megatron_dchag.config.sections`: the dataclass sections, a docstring per field, and each
  section's ``validate()``;
- :mod:`~megatron_dchag.config.loading`: YAML with ``${oc.env:...}``, dotted overrides, coercion
  into the dataclasses (unknown fields refused with a suggestion), YAML out (whole, and shortened
  for the console);
- :mod:`~megatron_dchag.config.resolve`: the defaults that follow from other fields (G = TP size,
  FFN width, aggregation heads, shortest lead time), filled in once by :func:`resolve_config`; the
  fields that follow from the ERA5 channel list (:func:`follow_channel_list`); and the run's :class:`RunShape` (data-parallel size, global batch, micro-batches per step, MAE patches);
- :mod:`~megatron_dchag.config.partition`: how channels, tree chunks and patches are split;
- :mod:`~megatron_dchag.config.checks`: :class:`ConfigError` and the wording of its messages.

This package imports neither torch nor megatron, so a config loads and validates quickly.
"""

from megatron_dchag.config.checks import ConfigError
from megatron_dchag.config.loading import (
    build_dataclass,
    config_to_dict,
    dump_config,
    load_config,
    load_yaml,
    parse_override,
    summarize_config,
)
from megatron_dchag.config.partition import aggregation_level_sizes, num_masked_patches, split_evenly
from megatron_dchag.config.resolve import (
    RunShape,
    data_parallel_size,
    resolve_config,
    resolve_forecast,
    resolve_model,
    run_shape,
)
from megatron_dchag.config.sections import (
    AGGREGATION_LAYERS,
    CHANNEL_EMBEDDINGS,
    LATITUDE_WEIGHTINGS,
    LR_DECAY_STYLES,
    RECOMPUTE_GRANULARITIES,
    SEGMENTATION_MODES,
    STRATEGIES,
    TRANSFORMER_IMPLS,
    WORKLOAD_SECTIONS,
    DataConfig,
    ExperimentConfig,
    ForecastConfig,
    MAEConfig,
    ModelConfig,
    ParallelConfig,
    SegmentationConfig,
    TrainingConfig,
    validate_config,
    validate_model_config,
)

__all__ = [
    "AGGREGATION_LAYERS", "CHANNEL_EMBEDDINGS", "LATITUDE_WEIGHTINGS", "LR_DECAY_STYLES", "RECOMPUTE_GRANULARITIES",
    "SEGMENTATION_MODES", "STRATEGIES", "TRANSFORMER_IMPLS", "WORKLOAD_SECTIONS",
    "ConfigError", "DataConfig", "ExperimentConfig", "ForecastConfig", "MAEConfig", "ModelConfig", "ParallelConfig",
    "RunShape", "SegmentationConfig", "TrainingConfig",
    "aggregation_level_sizes", "build_dataclass", "config_to_dict", "data_parallel_size", "dump_config",
    "load_config", "load_yaml", "num_masked_patches", "parse_override", "resolve_config", "resolve_forecast",
    "resolve_model", "run_shape", "split_evenly", "summarize_config", "validate_config", "validate_model_config",
]

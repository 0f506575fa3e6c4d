"""What a configuration implies: the defaults that follow from other fields, and the run's shape.

Some fields may be left unset (``None``); their value follows from other fields or sections:

==========================  =========================================================
``model.channel_groups``    G = ``parallel.tensor_model_parallel_size`` at creation
``model.ffn_hidden_size``   4 x ``model.hidden_size``
``model.aggregation_heads`` ``model.num_attention_heads``
``forecast.min_lead_hours`` ``forecast.lead_step_hours``
==========================  =========================================================

:func:`resolve_config` fills them in, once, at the entry point (and when a checkpoint's saved
config is read back); the values are written into the sections, so a run's ``config.yaml`` and
every checkpoint record the explicit G, and whatever rebuilds the model from them (the trainer's
architecture check, checkpoint conversion, the plot tools) reads it rather than deriving it again.
Configs saved before this recorded ``null`` there; :func:`resolve_config` of such a config, which
still holds its saved TP size, gives the values that run used.

**The ERA5 channel list.** ``data.channels`` decides three more fields, unless they were given at
the same or a higher precedence (YAML file < overrides and flags; :func:`follow_channel_list`,
applied by :func:`~megatron_dchag.config.loading.load_config` before the rules are checked):

==============================  =====================================================================
``model.num_channels``          the length of ``data.channels``
``model.channel_groups``        kept while it fits the channels (at most one group per channel, a
                                multiple of the TP size, room for ``model.aggregation_tree``); else the
                                largest G below it that does
``forecast.metric_variables``   those of its value that are predicted (in ``forecast.output_channels``,
                                else ``data.channels``)
==============================  =====================================================================

So ``--config configs/era5/tiny.yaml data.channels=[z_500,t_850,t2m]`` needs no other override,
while a ``model.num_channels`` given on the command line next to it is checked against the list.

What depends on the world size is not a user field: :func:`run_shape` gives the data-parallel
size's consequences (global batch, micro-batches per step) and the MAE's visible and masked patch
counts as a frozen :class:`RunShape`. ``training.global_batch_size`` itself is left as written
(``None``: micro-batch x data-parallel size), so a saved config keeps that meaning when it is
resumed or converted at another data-parallel size.

Nothing here imports the section classes at run time: :func:`resolve_model` works on any dataclass
with the model's field names (the memory model's ``MemoryConfig`` has them too).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, TypeVar

from megatron_dchag.config.checks import ConfigError
from megatron_dchag.config.partition import num_masked_patches

if TYPE_CHECKING:
    from megatron_dchag.config.sections import ExperimentConfig, ForecastConfig, ParallelConfig

ModelLike = TypeVar("ModelLike")


def resolve_model(model: ModelLike, tensor_model_parallel_size: int) -> ModelLike:
    """A copy of ``model`` with ``channel_groups``, ``ffn_hidden_size`` and ``aggregation_heads``
    explicit (G defaults to ``tensor_model_parallel_size``). Idempotent: explicit values are kept."""
    return dataclasses.replace(
        model,
        channel_groups=model.channel_groups if model.channel_groups is not None else tensor_model_parallel_size,
        ffn_hidden_size=model.ffn_hidden_size if model.ffn_hidden_size is not None else 4 * model.hidden_size,
        aggregation_heads=(model.aggregation_heads if model.aggregation_heads is not None
                           else model.num_attention_heads),
    )


def resolve_forecast(forecast: "ForecastConfig") -> "ForecastConfig":
    """A copy of ``forecast`` with ``min_lead_hours`` explicit (default ``lead_step_hours``)."""
    low = forecast.min_lead_hours if forecast.min_lead_hours is not None else forecast.lead_step_hours
    return dataclasses.replace(forecast, min_lead_hours=low)


def resolve_config(cfg: "ExperimentConfig") -> "ExperimentConfig":
    """A copy of ``cfg`` with every default that follows from other fields made explicit (see the
    module docstring); the G default is the TP size of ``cfg.parallel``. Idempotent."""
    out = copy.deepcopy(cfg)
    out.model = resolve_model(out.model, out.parallel.tensor_model_parallel_size)
    out.forecast = resolve_forecast(out.forecast)
    return out


def _tree_fits(num_channels: int, groups: int, tree: Sequence[int]) -> bool:
    """Whether every chunk of ``tree`` is smaller than the tokens a group has at its level."""
    for size in {num_channels // groups, -(-num_channels // groups)}:
        n = size
        for chunk in tree:
            if chunk >= n:
                return False
            n = math.ceil(n / chunk)
    return True


def fitting_channel_groups(num_channels: int, groups: Optional[int], tensor_model_parallel_size: int,
                           tree: Sequence[int], uses_tree: bool = True) -> Optional[int]:
    """``groups`` if it fits ``num_channels`` channels at the TP size (at most one group per channel,
    a multiple of the TP size, chunks of ``tree`` smaller than a group), else the largest multiple
    of the TP size below it that fits; ``None`` when none does (or ``groups`` is ``None``)."""
    if groups is None:
        return None
    tp = max(1, tensor_model_parallel_size)
    for g in range(min(groups, num_channels) // tp * tp, 0, -tp):
        if not uses_tree or _tree_fits(num_channels, g, tree):
            return g
    return None


def follow_channel_list(cfg: "ExperimentConfig", field_levels: Mapping[str, int]) -> "ExperimentConfig":
    """``cfg`` with the fields that follow from ``data.channels`` derived from it (see the module
    docstring), in place. ``field_levels``: ``"section.field"`` -> precedence of the place that set
    it (absent: the dataclass default, 0; YAML 1; overrides and flags 2)."""
    channels = cfg.data.channels
    if not channels:  # None: the default list and the YAML's values; []: refused by data.channels' rule
        return cfg
    level = field_levels.get("data.channels", 0)

    def derived(name: str) -> bool:
        return field_levels.get(name, 0) < level

    model = cfg.model
    if derived("model.num_channels"):
        model.num_channels = len(channels)
    if derived("model.channel_groups") and model.channel_groups is not None:
        fitted = fitting_channel_groups(len(channels), model.channel_groups,
                                        cfg.parallel.tensor_model_parallel_size, model.aggregation_tree,
                                        model.uses_partial_aggregation)
        if fitted is not None:
            model.channel_groups = fitted
    if derived("forecast.metric_variables"):
        from megatron_dchag.data.era5.naming import parse_channel

        def canonical(name: str) -> Optional[str]:
            try:
                return parse_channel(name).name
            except ValueError:
                return None

        outputs = cfg.forecast.output_channels if cfg.forecast.output_channels is not None else channels
        predicted = {canonical(c) for c in outputs} - {None}
        cfg.forecast.metric_variables = [v for v in cfg.forecast.metric_variables if canonical(v) in predicted]
    return cfg


def data_parallel_size(parallel: "ParallelConfig", world_size: int) -> int:
    """World size / (TP x PP); the world size must be a multiple of TP x PP."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size={tp} x "
            f"pipeline_model_parallel_size={pp}"
        )
    return world_size // (tp * pp)


@dataclass(frozen=True)
class RunShape:
    """Derived sizes of one run at one data-parallel size (none of them is a config field)."""

    data_parallel_size: int
    """Model replicas: world size / (TP x PP)."""
    micro_batch_size: int
    """Samples per micro-batch on one replica (``training.micro_batch_size``)."""
    global_batch_size: int
    """Samples per optimizer step over all replicas (``training.global_batch_size``, default
    micro-batch x data-parallel size)."""
    num_microbatches: int
    """Micro-batches per step on each replica (gradient accumulation):
    global batch / (micro-batch x data-parallel size)."""
    num_patches: int
    """Patch positions of an image (``model.image_size`` / ``model.patch_size``)."""
    visible_patches: int
    """MAE: patch positions the encoder tokenizes (``mae.mask_ratio`` of them are masked)."""
    masked_patches: int
    """MAE: patch positions the decoder predicts."""


def run_shape(cfg: "ExperimentConfig", data_parallel_size: int) -> RunShape:
    """The :class:`RunShape` of ``cfg`` at ``data_parallel_size`` replicas.

    Raises :class:`ConfigError` when the global batch is not a whole number of micro-batches per
    replica, or the interleaved pipeline schedule gets a number of micro-batches per step that is
    not a multiple of the pipeline size.
    """
    tr, par, dp = cfg.training, cfg.parallel, data_parallel_size
    per_step = tr.micro_batch_size * dp
    global_batch = tr.global_batch_size if tr.global_batch_size is not None else per_step
    if global_batch % per_step:
        raise ConfigError(
            f"training.global_batch_size={global_batch} is not divisible by training.micro_batch_size="
            f"{tr.micro_batch_size} x data-parallel size {dp}"
        )
    microbatches = global_batch // per_step
    pp, vpp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    if vpp and pp > 1 and microbatches % pp:
        raise ConfigError(
            f"the interleaved schedule (parallel.virtual_pipeline_model_parallel_size={vpp}) needs a number of "
            f"micro-batches per step that is a multiple of parallel.pipeline_model_parallel_size={pp}, got "
            f"{microbatches} (training.global_batch_size={global_batch} / (training.micro_batch_size="
            f"{tr.micro_batch_size} x data-parallel size {dp}))"
        )
    num_patches = cfg.model.num_patches
    masked = num_masked_patches(num_patches, cfg.mae.mask_ratio)
    return RunShape(
        data_parallel_size=dp, micro_batch_size=tr.micro_batch_size, global_batch_size=global_batch,
        num_microbatches=microbatches, num_patches=num_patches, visible_patches=num_patches - masked,
        masked_patches=masked,
    )

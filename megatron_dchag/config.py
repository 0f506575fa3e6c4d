"""Experiment configuration: dataclasses, YAML loading, dotted overrides and up-front validation.

This module owns the *shape* of a run's configuration and the rules that make it valid.
Everything is checked before any compute starts; a violated rule raises :class:`ConfigError`
whose message names the field(s) and the rule, e.g.::

    model.channel_groups=6 is not divisible by parallel.tensor_model_parallel_size=4

YAML files may use ``${oc.env:VAR,default}`` interpolation (resolved with OmegaConf). Overrides
are ``section.field=value`` strings whose values are parsed as YAML scalars/lists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

STRATEGIES = ("dchag", "tp_baseline", "dist_tokenize", "hierarchical")
AGGREGATION_LAYERS = ("linear", "cross_attention")
CHANNEL_EMBEDDINGS = ("index", "wavelength")
TRANSFORMER_IMPLS = ("local", "transformer_engine", "auto")
RECOMPUTE_GRANULARITIES = (None, "full", "selective", "channel_stage")
LATITUDE_WEIGHTINGS = ("cos", "area")


class ConfigError(ValueError):
    """A configuration value breaks a rule. The message names the field and the rule."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The architecture. It depends on ``channel_groups`` (G), never on the TP size."""

    num_channels: int = 64
    image_size: Tuple[int, int] = (64, 64)
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    # Channel groups G: channels split into G contiguous groups; a TP rank owns G/T of them.
    # None means "equal to the TP size at creation".
    channel_groups: Optional[int] = None
    strategy: str = "dchag"
    # Partial-aggregation layer kind and tree (list of chunk sizes; [] is one layer, "Tree0").
    aggregation_layer: str = "linear"
    aggregation_tree: List[int] = field(default_factory=list)
    aggregation_heads: Optional[int] = None  # default num_attention_heads
    channel_embedding: str = "index"
    # Optional per-channel wavelengths in nm (used when channel_embedding == "wavelength").
    wavelengths: Optional[List[float]] = None
    layernorm_epsilon: float = 1e-6
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: str = "local"
    lead_time_embedding: bool = False
    init_method_std: float = 0.02

    @property
    def num_patches(self) -> int:
        h, w = self.image_size
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def num_aggregation_heads(self) -> int:
        return self.aggregation_heads or self.num_attention_heads

    @property
    def shards_channels(self) -> bool:
        """Whether each TP rank tokenizes only its own channel groups."""
        return self.strategy in ("dchag", "dist_tokenize")

    @property
    def uses_partial_aggregation(self) -> bool:
        """Whether channel groups are reduced by the local tree before the final aggregation."""
        return self.strategy in ("dchag", "hierarchical")


@dataclass
class MAEConfig:
    """Masked-autoencoder pretraining (hyperspectral workload)."""

    mask_ratio: float = 0.75
    decoder_hidden_size: int = 128
    decoder_num_layers: int = 2
    decoder_num_attention_heads: int = 4
    norm_pix_loss: bool = False


@dataclass
class ForecastConfig:
    """Forecasting (ERA5 workload)."""

    # Training draws one lead per batch from min_lead_hours, min + step, ..., max_lead_hours
    # (min defaults to lead_step_hours).
    max_lead_hours: int = 72
    lead_step_hours: int = 6
    min_lead_hours: Optional[int] = None
    eval_lead_hours: List[int] = field(default_factory=lambda: [6, 24, 72])
    # Predicted channels; each must be an input channel (data.channels). Default: all inputs.
    output_channels: Optional[List[str]] = None
    metric_variables: List[str] = field(default_factory=lambda: ["z_500", "t_850", "u10", "t2m"])
    latitude_weighting: str = "cos"  # cos (ClimaX, WeatherBench 1) | area (WeatherBench 2)
    residual: bool = True  # predict x_t + Δx (normalized units)
    loss_on_constants: bool = False  # include land-sea mask / orography outputs in the loss
    acc_centered: bool = True  # Pearson ACC (ClimaX, WB1); false: WeatherBench 2's uncentered ACC


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    # Pipeline layout: number of transformer layers on each stage (None: even split).
    pipeline_layer_split: Optional[List[int]] = None
    virtual_pipeline_model_parallel_size: Optional[int] = None


@dataclass
class DataConfig:
    data_path: Optional[str] = None
    stats_file: Optional[str] = None
    file_format: str = "auto"
    dataset_name: str = "cube"
    layout: str = "CHW"
    channels: Optional[List[str]] = None  # ERA5 channel list
    val_fraction: float = 0.1
    # DataLoader worker processes per rank that load micro-batches in the background (0: inline).
    num_workers: int = 0


@dataclass
class TrainingConfig:
    micro_batch_size: int = 2
    global_batch_size: Optional[int] = None  # default micro_batch_size * data-parallel size
    train_iters: int = 100
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    recompute_granularity: Optional[str] = None
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 5
    log_interval: int = 10
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    log_dir: Optional[str] = None
    exit_duration_in_mins: Optional[float] = None
    skip_train: bool = False
    finetune: bool = False
    max_consecutive_nonfinite: int = 5
    keep_last_checkpoints: Optional[int] = None


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)


# ----------------------------------------------------------------------------------------------
# Typed construction from plain dicts
# ----------------------------------------------------------------------------------------------


def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if tp is Any:
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if isinstance(value, int) and not isinstance(value, bool) and len(args) == 2 and args[1] is not Ellipsis:
            value = [value, value]
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{where}={value!r} must be a list of {len(args)} values")
        item_types = args if args[-1] is not Ellipsis else [args[0]] * len(value)
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}={value!r} must be an integer")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} must be an integer") from None
        if not f.is_integer():
            raise ConfigError(f"{where}={value!r} must be an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} must be a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be a string")
        return str(value)
    return value


def build_dataclass(cls: type, values: Optional[Mapping[str, Any]], where: str = "") -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys with a suggestion of the closest name."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config field '{full}'{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dict (lists for tuples) suitable for YAML/JSON."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v

    return convert(cfg)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``'model.hidden_size=256'`` -> (['model', 'hidden_size'], 256)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: Dict[str, Any], path: List[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def _resolve_interpolations(tree: Dict[str, Any], source: str) -> Dict[str, Any]:
    """Resolve ``${oc.env:...}`` and other OmegaConf interpolations, if any are present."""
    text = yaml.safe_dump(tree)
    if "${" not in text:
        return tree
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: cannot resolve interpolation: {exc}".splitlines()[0]) from None


def load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            tree = yaml.safe_load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(
    path: Optional[str] = None,
    overrides: Sequence[str] = (),
    validate: bool = True,
    world_size: Optional[int] = None,
    workload_sections: Optional[Sequence[str]] = None,
) -> ExperimentConfig:
    """Load a YAML config, apply dotted overrides, build the dataclasses and validate them
    (``workload_sections``: see :func:`validate_config`)."""
    tree: Dict[str, Any] = load_yaml(path) if path else {}
    for text in overrides:
        key_path, value = parse_override(text)
        _set_path(tree, key_path, value)
    tree = _resolve_interpolations(tree, path or "overrides")
    cfg = build_dataclass(ExperimentConfig, tree)
    if validate:
        validate_config(cfg, world_size=world_size, workload_sections=workload_sections)
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def resolve_channel_groups(model: ModelConfig, tensor_model_parallel_size: int) -> int:
    """G, with the default G = T at creation."""
    return model.channel_groups if model.channel_groups is not None else tensor_model_parallel_size


def aggregation_level_sizes(num_tokens: int, tree: Sequence[int]) -> List[List[int]]:
    """Chunk lengths at each level of the partial-aggregation tree for a group of ``num_tokens``.

    Level k splits the current tokens into ``ceil(n / tree[k])`` contiguous chunks whose sizes
    differ by at most one; the last level is one chunk over whatever remains.
    """
    levels = []
    n = num_tokens
    for chunk in tree:
        m = math.ceil(n / chunk)
        levels.append(split_evenly(n, m))
        n = m
    levels.append([n])
    return levels


def split_evenly(total: int, parts: int) -> List[int]:
    """Sizes of ``parts`` contiguous pieces of ``total`` that differ by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def validate_model_config(model: ModelConfig, tensor_model_parallel_size: int = 1) -> None:
    """Check the architecture against the TP size. Raises ConfigError naming the field and rule."""
    tp = tensor_model_parallel_size
    tpname = f"parallel.tensor_model_parallel_size={tp}"

    def positive(name: str, value: int) -> None:
        if value is None or value < 1:
            raise ConfigError(f"model.{name}={value} must be a positive integer")

    for name in ("num_channels", "patch_size", "hidden_size", "num_layers", "num_attention_heads"):
        positive(name, getattr(model, name))
    if model.strategy not in STRATEGIES:
        raise ConfigError(
            f"model.strategy='{model.strategy}' is not one of {', '.join(STRATEGIES)}"
            f"{_suggest(model.strategy, STRATEGIES)}"
        )
    if model.aggregation_layer not in AGGREGATION_LAYERS:
        raise ConfigError(
            f"model.aggregation_layer='{model.aggregation_layer}' is not one of "
            f"{', '.join(AGGREGATION_LAYERS)}{_suggest(model.aggregation_layer, AGGREGATION_LAYERS)}"
        )
    if model.channel_embedding not in CHANNEL_EMBEDDINGS:
        raise ConfigError(
            f"model.channel_embedding='{model.channel_embedding}' is not one of {', '.join(CHANNEL_EMBEDDINGS)}"
        )
    if model.transformer_impl not in TRANSFORMER_IMPLS:
        raise ConfigError(
            f"model.transformer_impl='{model.transformer_impl}' is not one of {', '.join(TRANSFORMER_IMPLS)}"
        )
    h, w = model.image_size
    for axis, size in (("height", h), ("width", w)):
        if size < 1 or size % model.patch_size:
            raise ConfigError(
                f"model.image_size {axis}={size} is not divisible by model.patch_size={model.patch_size}"
            )
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={model.hidden_size} is not divisible by "
            f"model.num_attention_heads={model.num_attention_heads}"
        )
    if model.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads={model.num_attention_heads} is not divisible by {tpname}")
    if model.hidden_size % tp:
        raise ConfigError(f"model.hidden_size={model.hidden_size} is not divisible by {tpname}")
    if model.ffn_size % tp:
        raise ConfigError(f"model.ffn_hidden_size={model.ffn_size} is not divisible by {tpname}")
    agg_heads = model.num_aggregation_heads
    if model.hidden_size % agg_heads:
        raise ConfigError(
            f"model.hidden_size={model.hidden_size} is not divisible by model.aggregation_heads={agg_heads}"
        )
    if agg_heads % tp:
        raise ConfigError(
            f"model.aggregation_heads={agg_heads} is not divisible by {tpname} "
            "(the final cross-attention splits its heads across TP ranks)"
        )
    groups = resolve_channel_groups(model, tp)
    if groups < 1:
        raise ConfigError(f"model.channel_groups={groups} must be a positive integer")
    if groups % tp:
        raise ConfigError(f"model.channel_groups={groups} is not divisible by {tpname}")
    if model.num_channels < groups:
        raise ConfigError(
            f"model.num_channels={model.num_channels} is smaller than model.channel_groups={groups} "
            "(every group needs at least one channel)"
        )
    if model.wavelengths is not None and len(model.wavelengths) != model.num_channels:
        raise ConfigError(
            f"model.wavelengths has {len(model.wavelengths)} values but model.num_channels={model.num_channels}"
        )
    if model.channel_embedding == "wavelength" and model.wavelengths is None:
        # The data may supply them at start-up; models built directly must pass them.
        pass
    if model.uses_partial_aggregation:
        smallest = model.num_channels // groups
        largest = -(-model.num_channels // groups)
        for size in sorted({smallest, largest}):
            n = size
            for level, chunk in enumerate(model.aggregation_tree):
                if chunk < 2:
                    raise ConfigError(
                        f"model.aggregation_tree[{level}]={chunk} must be at least 2 (a chunk reduces "
                        "several tokens to one)"
                    )
                if chunk >= n:
                    raise ConfigError(
                        f"model.aggregation_tree[{level}]={chunk} does not fit: a channel group has only "
                        f"{n} tokens at that level (num_channels={model.num_channels}, "
                        f"channel_groups={groups}); use chunk sizes smaller than {n}"
                    )
                n = math.ceil(n / chunk)
    for name in ("hidden_dropout", "attention_dropout"):
        value = getattr(model, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"model.{name}={value} must be in [0, 1)")


WORKLOAD_SECTIONS = ("mae", "forecast")


def validate_config(cfg: ExperimentConfig, world_size: Optional[int] = None,
                    workload_sections: Optional[Sequence[str]] = None) -> None:
    """Validate the whole experiment; ``world_size`` (when known) is checked against TP x PP x DP.

    ``workload_sections``: which workload sections (``mae``, ``forecast``) the run uses and must be
    valid (``None``: all of them). An unused section's defaults must not reject a run, e.g. the
    MAE decoder's 4 heads at TP=8 in a forecasting run.
    """
    sections = WORKLOAD_SECTIONS if workload_sections is None else tuple(workload_sections)
    par, tr = cfg.parallel, cfg.training
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(par, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(par, name)} must be a positive integer")
    validate_model_config(cfg.model, par.tensor_model_parallel_size)
    validate_parallel_config(cfg, sections)
    if tr.recompute_granularity not in RECOMPUTE_GRANULARITIES:
        raise ConfigError(
            f"training.recompute_granularity={tr.recompute_granularity!r} is not one of "
            f"{', '.join(str(g) for g in RECOMPUTE_GRANULARITIES)}"
        )
    if tr.micro_batch_size < 1:
        raise ConfigError(f"training.micro_batch_size={tr.micro_batch_size} must be a positive integer")
    if cfg.data.num_workers < 0:
        raise ConfigError(
            f"data.num_workers={cfg.data.num_workers} must be >= 0 (0 loads micro-batches in the training process)"
        )
    if tr.train_iters < 0:
        raise ConfigError(f"training.train_iters={tr.train_iters} must be >= 0")
    if tr.lr < 0 or tr.min_lr < 0:
        raise ConfigError("training.lr and training.min_lr must be >= 0")
    mae, tp = cfg.mae, par.tensor_model_parallel_size
    if "mae" in sections:
        validate_mae_config(mae, tp)
    if "forecast" in sections:
        validate_forecast_config(cfg.forecast)
    if world_size is not None:
        model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size="
                f"{par.tensor_model_parallel_size} x pipeline_model_parallel_size="
                f"{par.pipeline_model_parallel_size}"
            )
        dp = world_size // model_parallel
        gbs = tr.global_batch_size if tr.global_batch_size is not None else tr.micro_batch_size * dp
        if gbs % (tr.micro_batch_size * dp):
            raise ConfigError(
                f"training.global_batch_size={gbs} is not divisible by training.micro_batch_size="
                f"{tr.micro_batch_size} x data-parallel size {dp}"
            )
        pp = par.pipeline_model_parallel_size
        microbatches = gbs // (tr.micro_batch_size * dp)
        if par.virtual_pipeline_model_parallel_size and pp > 1 and microbatches % pp:
            raise ConfigError(
                f"the interleaved schedule (parallel.virtual_pipeline_model_parallel_size="
                f"{par.virtual_pipeline_model_parallel_size}) needs a number of micro-batches per step that is a "
                f"multiple of parallel.pipeline_model_parallel_size={pp}, got {microbatches} (training.global_batch_size="
                f"{gbs} / (training.micro_batch_size={tr.micro_batch_size} x data-parallel size {dp}))"
            )


def validate_parallel_config(cfg: ExperimentConfig, sections: Sequence[str] = WORKLOAD_SECTIONS) -> None:
    """Pipeline split, interleaving and sequence-parallel rules of the ``parallel`` section.

    Settings that have no meaning in the layout at hand are ignored rather than refused (as in
    Megatron-LM), so a config trained at scale also evaluates or converts at TP = PP = 1:
    ``sequence_parallel`` at TP = 1, ``virtual_pipeline_model_parallel_size`` and
    ``pipeline_layer_split`` at PP = 1.
    """
    par, model = cfg.parallel, cfg.model
    pp, tp = par.pipeline_model_parallel_size, par.tensor_model_parallel_size
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp is not None and vpp < 2:
        raise ConfigError(
            f"parallel.virtual_pipeline_model_parallel_size={vpp} must be at least 2 (leave it unset "
            "for the non-interleaved 1F1B schedule)"
        )
    if pp == 1:
        vpp = None
    stages = pp * (vpp or 1)
    split = par.pipeline_layer_split if pp > 1 else None
    if split is not None:
        allowed = {pp, stages}
        if len(split) not in allowed:
            expected = f"{pp}" if len(allowed) == 1 else f"{pp} (one per stage) or {stages} (one per virtual stage)"
            raise ConfigError(
                f"parallel.pipeline_layer_split has {len(split)} entries but needs {expected} "
                f"(parallel.pipeline_model_parallel_size={pp}"
                + (f", parallel.virtual_pipeline_model_parallel_size={vpp})" if vpp else ")")
            )
        if any(n < 0 for n in split):
            raise ConfigError(f"parallel.pipeline_layer_split={split} has a negative layer count")
        if sum(split) != model.num_layers:
            raise ConfigError(
                f"parallel.pipeline_layer_split sums to {sum(split)} but "
                f"model.num_layers={model.num_layers}"
            )
    elif model.num_layers % stages:
        what = (f"parallel.pipeline_model_parallel_size={pp}" if not vpp else
                f"parallel.pipeline_model_parallel_size={pp} x parallel.virtual_pipeline_model_parallel_size={vpp}")
        raise ConfigError(
            f"model.num_layers={model.num_layers} is not divisible by {what} "
            "(or give parallel.pipeline_layer_split)"
        )
    if par.sequence_parallel and tp > 1:
        if "forecast" in sections and model.num_patches % tp:
            raise ConfigError(
                f"parallel.sequence_parallel=true: the {model.num_patches} patches of model.image_size="
                f"{list(model.image_size)} / model.patch_size={model.patch_size} are not divisible by "
                f"parallel.tensor_model_parallel_size={tp}"
            )
        if "mae" in sections:
            masked = min(max(int(round(model.num_patches * cfg.mae.mask_ratio)), 1), model.num_patches - 1)
            visible = model.num_patches - masked
            if visible % tp:
                raise ConfigError(
                    f"parallel.sequence_parallel=true: the encoder's {visible} visible patches ({model.num_patches} "
                    f"patches, mae.mask_ratio={cfg.mae.mask_ratio}) are not divisible by "
                    f"parallel.tensor_model_parallel_size={tp}"
                )


def validate_forecast_config(fc: ForecastConfig) -> None:
    """Rules of the ``forecast`` section that need no data (the task checks the rest against the data)."""
    if fc.lead_step_hours < 1:
        raise ConfigError(f"forecast.lead_step_hours={fc.lead_step_hours} must be a positive integer")
    lo = fc.lead_step_hours if fc.min_lead_hours is None else fc.min_lead_hours
    if lo < 1:
        raise ConfigError(f"forecast.min_lead_hours={fc.min_lead_hours} must be a positive integer")
    if fc.max_lead_hours < lo:
        raise ConfigError(f"forecast.max_lead_hours={fc.max_lead_hours} must be >= forecast.min_lead_hours={lo}")
    if (fc.max_lead_hours - lo) % fc.lead_step_hours:
        raise ConfigError(
            f"forecast.max_lead_hours={fc.max_lead_hours} is not forecast.min_lead_hours={lo} plus a multiple of "
            f"forecast.lead_step_hours={fc.lead_step_hours}"
        )
    if not fc.eval_lead_hours:
        raise ConfigError("forecast.eval_lead_hours is empty (give at least one evaluation lead time in hours)")
    bad = [x for x in fc.eval_lead_hours if x < 1]
    if bad:
        raise ConfigError(f"forecast.eval_lead_hours={fc.eval_lead_hours} must be positive hours (bad: {bad})")
    if len(set(fc.eval_lead_hours)) != len(fc.eval_lead_hours):
        raise ConfigError(f"forecast.eval_lead_hours={fc.eval_lead_hours} repeats a lead time")
    if fc.latitude_weighting not in LATITUDE_WEIGHTINGS:
        raise ConfigError(
            f"forecast.latitude_weighting='{fc.latitude_weighting}' is not one of {', '.join(LATITUDE_WEIGHTINGS)}"
        )


def validate_mae_config(mae: MAEConfig, tensor_model_parallel_size: int = 1) -> None:
    """Rules of the ``mae`` section (masked-autoencoder workload)."""
    tp = tensor_model_parallel_size
    if mae.decoder_hidden_size % mae.decoder_num_attention_heads:
        raise ConfigError(
            f"mae.decoder_hidden_size={mae.decoder_hidden_size} is not divisible by "
            f"mae.decoder_num_attention_heads={mae.decoder_num_attention_heads}"
        )
    if mae.decoder_num_attention_heads % tp:
        raise ConfigError(
            f"mae.decoder_num_attention_heads={mae.decoder_num_attention_heads} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}"
        )
    if not 0.0 <= mae.mask_ratio < 1.0:
        raise ConfigError(f"mae.mask_ratio={mae.mask_ratio} must be in [0, 1)")

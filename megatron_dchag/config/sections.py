"""The sections of an experiment's configuration: every field, what it means, and its rules.

One dataclass per YAML section (``model``, ``mae``, ``forecast``, ``segmentation``, ``parallel``,
``data``, ``training``). Each field carries a docstring; each section's ``validate()`` checks every one of
its fields (values arrive already coerced to the annotated types, so the rules are ranges,
choices and list contents). Rules between sections and against the world size are in
:meth:`ExperimentConfig.validate`. A broken rule raises :class:`ConfigError` naming the field and
the rule, e.g. ``model.channel_groups=6 is not divisible by parallel.tensor_model_parallel_size=4``.

Fields left ``None`` whose default follows from other fields are filled in by
:mod:`megatron_dchag.config.resolve`; the rules here check the resolved values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from megatron_dchag.config.checks import (
    ConfigError,
    check_at_least,
    check_choice,
    check_fraction,
    check_greater,
    check_names,
    check_not_empty,
    check_positive,
)
from megatron_dchag.config.partition import num_masked_patches
from megatron_dchag.config.resolve import data_parallel_size, resolve_forecast, resolve_model, run_shape

STRATEGIES = ("dchag", "tp_baseline", "dist_tokenize", "hierarchical")
AGGREGATION_LAYERS = ("linear", "cross_attention")
CHANNEL_EMBEDDINGS = ("index", "wavelength")
TRANSFORMER_IMPLS = ("local", "transformer_engine", "auto")
CHANNEL_STAGE_IMPLS = ("auto", "fused", "reference")
RECOMPUTE_GRANULARITIES = (None, "full", "selective", "channel_stage")
LATITUDE_WEIGHTINGS = ("cos", "area")
# megatron-core's OptimizerParamScheduler styles; its "WSD" also needs wsd_decay_steps, which the
# trainer does not set.
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
WORKLOAD_SECTIONS = ("mae", "forecast", "segmentation")
SEGMENTATION_MODES = ("finetune", "linear_probe")


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The architecture. It depends on ``channel_groups`` (G), never on the TP size."""

    num_channels: int = 64
    """Input channels C of every image (bands of a cube, variable-levels of ERA5)."""
    image_size: Tuple[int, int] = (64, 64)
    """Image (crop) height and width in pixels; a single integer means a square."""
    patch_size: int = 8
    """Side p of the square patches; each image axis must be a multiple of it."""
    hidden_size: int = 128
    """Token width D of the channel stage and the backbone."""
    num_layers: int = 2
    """Transformer layers of the backbone."""
    num_attention_heads: int = 4
    """Attention heads of each backbone layer (split across TP ranks)."""
    ffn_hidden_size: Optional[int] = None
    """MLP width of the backbone layers. None: 4 x hidden_size."""
    channel_groups: Optional[int] = None
    """G: channels are split into G contiguous groups and a TP rank owns G/T of them. None: the TP
    size at creation (recorded explicitly in the run's config, so the model stays the same when a
    checkpoint is loaded or converted at another TP size)."""
    strategy: str = "dchag"
    """Channel-stage strategy: dchag (own groups, local tree, all-gather of group tokens),
    tp_baseline (every rank tokenizes all channels), dist_tokenize (own channels, all-gather of
    every token), hierarchical (all channels, tree over all groups)."""
    aggregation_layer: str = "linear"
    """Kind of the partial-aggregation layers: linear or cross_attention."""
    aggregation_tree: List[int] = field(default_factory=list)
    """Chunk sizes of the partial-aggregation tree, level by level (each >= 2); [] is one layer
    over each group ("Tree0")."""
    aggregation_heads: Optional[int] = None
    """Heads of the cross-attention aggregation layers. None: num_attention_heads."""
    channel_embedding: str = "index"
    """Per-channel embedding added to the tokens: index (learned per channel) or wavelength
    (sinusoidal in the wavelength)."""
    wavelengths: Optional[List[float]] = None
    """Wavelength of each channel in nm (for channel_embedding=wavelength); None: from the data."""
    layernorm_epsilon: float = 1e-6
    """Epsilon of every layer norm."""
    hidden_dropout: float = 0.0
    """Dropout probability after attention and MLP outputs."""
    attention_dropout: float = 0.0
    """Dropout probability of the attention weights."""
    transformer_impl: str = "local"
    """Backbone layer implementation: local (megatron-core's local spec), transformer_engine, or
    auto (Transformer Engine when installed)."""
    lead_time_embedding: bool = False
    """Add an embedding of the forecast lead time to the tokens (forecasting needs it)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    channel_stage_impl: str = "auto"
    """How tokenizer and partial-aggregation tree are evaluated (same parameters, same function):
    fused (one product per channel group with the tree's weights folded into the patch embeddings;
    the per-channel tokens are never materialised; needs a linear tree, i.e. strategy dchag or
    hierarchical with aggregation_layer=linear), reference (tokenize every channel, then the tree
    level by level), or auto (fused wherever the tree allows it)."""

    @property
    def num_patches(self) -> int:
        h, w = self.image_size
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def shards_channels(self) -> bool:
        """Whether each TP rank tokenizes only its own channel groups."""
        return self.strategy in ("dchag", "dist_tokenize")

    @property
    def uses_partial_aggregation(self) -> bool:
        """Whether channel groups are reduced by the local tree before the final aggregation."""
        return self.strategy in ("dchag", "hierarchical")

    @property
    def can_fuse_channel_stage(self) -> bool:
        """Whether tokenizer and tree are linear in the patches up to the group tokens (a linear
        partial-aggregation tree), so that ``channel_stage_impl=fused`` applies."""
        return self.uses_partial_aggregation and self.aggregation_layer == "linear"

    @property
    def fuses_channel_stage(self) -> bool:
        """Whether the channel stage runs fused (``channel_stage_impl`` resolved)."""
        return self.channel_stage_impl == "fused" or (self.channel_stage_impl == "auto" and self.can_fuse_channel_stage)

    def validate(self, tensor_model_parallel_size: int = 1) -> None:
        """Every rule of the section at the TP size the model is built at (defaults resolved)."""
        tp = tensor_model_parallel_size
        check_positive("parallel.tensor_model_parallel_size", tp)
        tpname = f"parallel.tensor_model_parallel_size={tp}"
        for name in ("num_channels", "patch_size", "hidden_size", "num_layers", "num_attention_heads"):
            check_positive(f"model.{name}", getattr(self, name))
        for name in ("ffn_hidden_size", "aggregation_heads", "channel_groups"):
            check_positive(f"model.{name}", getattr(self, name), optional=True)
        check_choice("model.strategy", self.strategy, STRATEGIES)
        check_choice("model.aggregation_layer", self.aggregation_layer, AGGREGATION_LAYERS)
        check_choice("model.channel_embedding", self.channel_embedding, CHANNEL_EMBEDDINGS)
        check_choice("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        check_choice("model.channel_stage_impl", self.channel_stage_impl, CHANNEL_STAGE_IMPLS)
        if self.channel_stage_impl == "fused" and not self.can_fuse_channel_stage:
            raise ConfigError(
                f"model.channel_stage_impl=fused needs a linear partial-aggregation tree (model.strategy dchag "
                f"or hierarchical with model.aggregation_layer=linear), got model.strategy={self.strategy}, "
                f"model.aggregation_layer={self.aggregation_layer}; use auto or reference"
            )
        m = resolve_model(self, tp)
        h, w = m.image_size
        for axis, size in (("height", h), ("width", w)):
            if size < 1 or size % m.patch_size:
                raise ConfigError(
                    f"model.image_size {axis}={size} is not divisible by model.patch_size={m.patch_size}"
                )
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={m.hidden_size} is not divisible by "
                f"model.num_attention_heads={m.num_attention_heads}"
            )
        if m.num_attention_heads % tp:
            raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by {tpname}")
        if m.hidden_size % tp:
            raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by {tpname}")
        if m.ffn_hidden_size % tp:
            raise ConfigError(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by {tpname}")
        if m.hidden_size % m.aggregation_heads:
            raise ConfigError(
                f"model.hidden_size={m.hidden_size} is not divisible by model.aggregation_heads={m.aggregation_heads}"
            )
        if m.aggregation_heads % tp:
            raise ConfigError(
                f"model.aggregation_heads={m.aggregation_heads} is not divisible by {tpname} "
                "(the final cross-attention splits its heads across TP ranks)"
            )
        groups = m.channel_groups
        if groups % tp:
            raise ConfigError(f"model.channel_groups={groups} is not divisible by {tpname}")
        if m.num_channels < groups:
            raise ConfigError(
                f"model.num_channels={m.num_channels} is smaller than model.channel_groups={groups} "
                "(every group needs at least one channel)"
            )
        if m.wavelengths is not None:
            if len(m.wavelengths) != m.num_channels:
                raise ConfigError(
                    f"model.wavelengths has {len(m.wavelengths)} values but model.num_channels={m.num_channels}"
                )
            bad = [x for x in m.wavelengths if not (math.isfinite(x) and x > 0)]
            if bad:
                raise ConfigError(f"model.wavelengths must be positive wavelengths in nm (bad: {bad[:3]})")
        for level, chunk in enumerate(m.aggregation_tree):
            if chunk < 2:
                raise ConfigError(
                    f"model.aggregation_tree[{level}]={chunk} must be at least 2 (a chunk reduces several "
                    "tokens to one)"
                )
        if m.uses_partial_aggregation:
            smallest = m.num_channels // groups
            largest = -(-m.num_channels // groups)
            for size in sorted({smallest, largest}):
                n = size
                for level, chunk in enumerate(m.aggregation_tree):
                    if chunk >= n:
                        raise ConfigError(
                            f"model.aggregation_tree[{level}]={chunk} does not fit: a channel group has only "
                            f"{n} tokens at that level (num_channels={m.num_channels}, "
                            f"channel_groups={groups}); use chunk sizes smaller than {n}"
                        )
                    n = math.ceil(n / chunk)
        check_greater("model.layernorm_epsilon", m.layernorm_epsilon, 0)
        check_fraction("model.hidden_dropout", m.hidden_dropout)
        check_fraction("model.attention_dropout", m.attention_dropout)
        check_greater("model.init_method_std", m.init_method_std, 0)


# ----------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------


@dataclass
class MAEConfig:
    """Masked-autoencoder pretraining (hyperspectral workload)."""

    mask_ratio: float = 0.75
    """Fraction of patch positions masked before tokenization (at least one is masked and one kept)."""
    decoder_hidden_size: int = 128
    """Token width of the decoder."""
    decoder_num_layers: int = 2
    """Transformer layers of the decoder."""
    decoder_num_attention_heads: int = 4
    """Attention heads of each decoder layer (split across TP ranks)."""
    norm_pix_loss: bool = False
    """Reconstruct each target patch normalised by its own mean and variance."""

    def validate(self, tensor_model_parallel_size: int = 1) -> None:
        """Every rule of the section at the TP size (the decoder's heads are split across TP ranks)."""
        tp = tensor_model_parallel_size
        for name in ("decoder_hidden_size", "decoder_num_layers", "decoder_num_attention_heads"):
            check_positive(f"mae.{name}", getattr(self, name))
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ConfigError(
                f"mae.decoder_hidden_size={self.decoder_hidden_size} is not divisible by "
                f"mae.decoder_num_attention_heads={self.decoder_num_attention_heads}"
            )
        if self.decoder_num_attention_heads % tp:
            raise ConfigError(
                f"mae.decoder_num_attention_heads={self.decoder_num_attention_heads} is not divisible by "
                f"parallel.tensor_model_parallel_size={tp}"
            )
        check_fraction("mae.mask_ratio", self.mask_ratio)


@dataclass
class ForecastConfig:
    """Forecasting (ERA5 workload). The rules here need no data; the task checks the rest
    (channel names, lead times the data can serve) against the data."""

    max_lead_hours: int = 72
    """Longest training lead time in hours. Training draws one lead per micro-batch from
    min_lead_hours, min_lead_hours + lead_step_hours, ..., max_lead_hours."""
    lead_step_hours: int = 6
    """Spacing of the training lead times in hours (the data's time step or a multiple of it)."""
    min_lead_hours: Optional[int] = None
    """Shortest training lead time in hours. None: lead_step_hours."""
    eval_lead_hours: List[int] = field(default_factory=lambda: [6, 24, 72])
    """Lead times in hours at which evaluation reports its metrics."""
    output_channels: Optional[List[str]] = None
    """Predicted channels; each must be an input channel (data.channels). None: every input."""
    metric_variables: List[str] = field(default_factory=lambda: ["z_500", "t_850", "u10", "t2m"])
    """Predicted variables whose RMSE, ACC and references evaluation reports."""
    latitude_weighting: str = "cos"
    """Latitude weights of loss and metrics: cos (ClimaX, WeatherBench 1) or area (WeatherBench 2)."""
    residual: bool = True
    """Predict x_t + Δx (normalized units) instead of x_{t+Δ} directly."""
    loss_on_constants: bool = False
    """Include the constant outputs (land-sea mask, orography) in the loss."""
    acc_centered: bool = True
    """Pearson (centered) ACC as in ClimaX and WeatherBench 1; false: WeatherBench 2's uncentered ACC."""
    time_features: bool = False
    """Give the model the time of day (local solar time of each patch) and the day of year of its
    input state, as an embedding added to its tokens. Off: no such weights (older checkpoints load)."""

    def validate(self) -> None:
        """Every rule of the section (``min_lead_hours`` resolved)."""
        check_positive("forecast.lead_step_hours", self.lead_step_hours)
        check_positive("forecast.min_lead_hours", self.min_lead_hours, optional=True)
        low = resolve_forecast(self).min_lead_hours
        if self.max_lead_hours < low:
            raise ConfigError(f"forecast.max_lead_hours={self.max_lead_hours} must be >= forecast.min_lead_hours={low}")
        if (self.max_lead_hours - low) % self.lead_step_hours:
            raise ConfigError(
                f"forecast.max_lead_hours={self.max_lead_hours} is not forecast.min_lead_hours={low} plus a "
                f"multiple of forecast.lead_step_hours={self.lead_step_hours}"
            )
        if not self.eval_lead_hours:
            raise ConfigError("forecast.eval_lead_hours is empty (give at least one evaluation lead time in hours)")
        bad = [x for x in self.eval_lead_hours if x < 1]
        if bad:
            raise ConfigError(f"forecast.eval_lead_hours={self.eval_lead_hours} must be positive hours (bad: {bad})")
        if len(set(self.eval_lead_hours)) != len(self.eval_lead_hours):
            raise ConfigError(f"forecast.eval_lead_hours={self.eval_lead_hours} repeats a lead time")
        check_names("forecast.output_channels", self.output_channels,
                    empty_hint="leave it unset to predict every input channel")
        check_names("forecast.metric_variables", self.metric_variables)
        check_choice("forecast.latitude_weighting", self.latitude_weighting, LATITUDE_WEIGHTINGS)


@dataclass
class SegmentationConfig:
    """Per-pixel classification of hyperspectral cubes (``finetune_hyperspectral.py``): a head on
    the encoder's tokens, trained from a pretrained MAE encoder or from scratch. The rules here
    need no data; the task checks the label maps against them."""

    mode: str = "finetune"
    """finetune (every weight trains; the encoder at encoder_lr_multiplier x the learning rate) or
    linear_probe (the encoder is frozen; only the head trains; PP = 1)."""
    pretrained: Optional[str] = None
    """MAE run whose encoder starts the model (a save directory or one of its iter_* directories),
    loaded at this run's TP/PP layout (--pretrained). None: from scratch. Not read when
    training.load resumes (the checkpoint holds every weight)."""
    num_classes: Optional[int] = None
    """Classes of the label maps (>= 2): labels 0 .. num_classes - 1. None: the length of the label
    maps' class_names attribute, else 1 + the largest label of the training cubes."""
    class_names: Optional[List[str]] = None
    """Names of the classes, in label order, for the metrics table (num_classes entries). None: the
    label maps' class_names attribute, else class_0, class_1, ..."""
    label_dataset: str = "labels"
    """HDF5 dataset of each cube file holding its per-pixel labels (H x W integers)."""
    ignore_index: int = -1
    """Label of unlabelled pixels: they count in neither the loss nor the metrics."""
    encoder_lr_multiplier: float = 1.0
    """Under finetune: the encoder's learning rate (and min_lr) relative to training.lr; the head
    uses training.lr. In (0, 1]; below 1 fine-tunes the pretrained encoder more gently (on the tiny
    synthetic benchmark of docs/downstream.md, 1 did best)."""

    def validate(self) -> None:
        """Every rule of the section."""
        check_choice("segmentation.mode", self.mode, SEGMENTATION_MODES)
        check_not_empty("segmentation.pretrained", self.pretrained, "training from scratch")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"segmentation.num_classes={self.num_classes} must be >= 2")
        check_names("segmentation.class_names", self.class_names, empty_hint="leave it unset for the label maps' names")
        if self.class_names is not None and self.num_classes is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(f"segmentation.class_names has {len(self.class_names)} names but "
                              f"segmentation.num_classes={self.num_classes}")
        if not self.label_dataset.strip():
            raise ConfigError(f"segmentation.label_dataset='{self.label_dataset}' is empty (the HDF5 dataset "
                              "holding each cube's labels)")
        if self.num_classes is not None and 0 <= self.ignore_index < self.num_classes:
            raise ConfigError(f"segmentation.ignore_index={self.ignore_index} is a class label (0 .. "
                              f"{self.num_classes - 1}); use a value outside them, e.g. -1 or 255")
        if not (0.0 < self.encoder_lr_multiplier <= 1.0):
            raise ConfigError(f"segmentation.encoder_lr_multiplier={self.encoder_lr_multiplier} must be in (0, 1]")


# ----------------------------------------------------------------------------------------------
# parallel, data, training
# ----------------------------------------------------------------------------------------------


@dataclass
class ParallelConfig:
    """The parallel layout (TP x PP x DP = world size; DP follows from the world size).

    Settings without meaning in the layout at hand are ignored rather than refused (as in
    Megatron-LM), so a config trained at scale also evaluates or converts at TP = PP = 1:
    ``sequence_parallel`` at TP = 1, ``virtual_pipeline_model_parallel_size`` and
    ``pipeline_layer_split`` at PP = 1, ``use_torch_fsdp2`` at DP = 1. Combinations that
    megatron-core does not support are refused (FSDP with PP > 1, with the distributed optimizer or
    with ``overlap_grad_reduce``).
    """

    tensor_model_parallel_size: int = 1
    """TP size T: ranks that share each layer (and own G/T channel groups each)."""
    pipeline_model_parallel_size: int = 1
    """PP size: pipeline stages (the first holds the channel stage, the last the head and loss)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism in the backbone (TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over data-parallel ranks (megatron's distributed optimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    pipeline_layer_split: Optional[List[int]] = None
    """Backbone layers on each stage (PP entries, or PP x VPP for the interleaved schedule; 0 is
    allowed). None: an even split."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Virtual stages per pipeline rank (>= 2) for the interleaved schedule. None: 1F1B."""
    use_torch_fsdp2: bool = False
    """Shard parameters, gradients and optimizer state over the data-parallel ranks with torch FSDP2
    (megatron-core's ``TorchFullyShardedDataParallel`` in place of DDP; FSDP units: each transformer
    layer, the channel stage and the head). TP still splits the layers and the channel groups; works
    with sequence parallelism, gradient accumulation, bf16 and recompute. PP = 1, and not with
    ``use_distributed_optimizer`` or ``overlap_grad_reduce``. Ignored at DP = 1."""
    fsdp_reshard_after_forward: bool = True
    """With use_torch_fsdp2: free each FSDP unit's all-gathered parameters after its forward and
    gather them again for its backward; false keeps them from the forward to the backward (more
    memory, one all-gather less per unit and micro-batch)."""

    def validate(self) -> None:
        """The section's own rules; the pipeline split against the model is checked by
        :meth:`ExperimentConfig.validate`."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            check_positive(f"parallel.{name}", getattr(self, name))
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp < 2:
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size={vpp} must be at least 2 (leave it unset "
                "for the non-interleaved 1F1B schedule)"
            )
        split = self.pipeline_layer_split
        if split is not None and any(n < 0 for n in split):
            raise ConfigError(f"parallel.pipeline_layer_split={split} has a negative layer count")
        self._validate_fsdp()

    def _validate_fsdp(self) -> None:
        """What megatron-core's torch FSDP2 wrapper does not combine with (as Megatron-LM refuses)."""
        if not self.use_torch_fsdp2:
            return
        if self.pipeline_model_parallel_size > 1:
            raise ConfigError(
                f"parallel.use_torch_fsdp2=true needs parallel.pipeline_model_parallel_size=1, got "
                f"{self.pipeline_model_parallel_size} (megatron-core's FSDP2 wrapper does not support pipeline parallelism)"
            )
        if self.use_distributed_optimizer:
            raise ConfigError(
                "parallel.use_torch_fsdp2=true cannot be combined with parallel.use_distributed_optimizer=true "
                "(FSDP already shards the optimizer state; megatron-core's distributed optimizer needs DDP's buffers)"
            )
        if self.overlap_grad_reduce:
            raise ConfigError(
                "parallel.use_torch_fsdp2=true cannot be combined with parallel.overlap_grad_reduce=true "
                "(a megatron DDP option; FSDP2 always reduce-scatters gradients during the backward)"
            )


@dataclass
class DataConfig:
    """Where the data is and how it is read."""

    data_path: Optional[str] = None
    """Data location: a directory (or file) of cubes, or an ERA5 zarr store / netCDF file."""
    stats_file: Optional[str] = None
    """Normalisation statistics (tools/compute_stats.py, tools/compute_era5_stats.py)."""
    file_format: str = "auto"
    """Hyperspectral file format: auto (from the file name), hdf5 or envi."""
    dataset_name: str = "cube"
    """Name of the dataset that holds the cube inside each HDF5 file."""
    layout: str = "CHW"
    """Axis order of the stored hyperspectral cubes: CHW or HWC."""
    channels: Optional[List[str]] = None
    """ERA5 input channels (e.g. z_500, t2m), in model order. None: the default ERA5 channel list.
    Given, it also sets model.num_channels, a fitting model.channel_groups and the predicted
    forecast.metric_variables, unless those are given beside it (config.resolve.follow_channel_list)."""
    val_fraction: float = 0.1
    """Fraction of the data held out for validation: ERA5's last time steps; hyperspectral cubes
    chosen by a hash of each cube's file stem (the same in any format), unless data.val_files
    names them."""
    val_files: Optional[List[str]] = None
    """Hyperspectral validation cubes, instead of the val_fraction hash split: entries that are
    folders (every cube in them), files, or globs of names/stems of data.data_path's cubes."""
    test_files: Optional[List[str]] = None
    """Hyperspectral test cubes (entries as in val_files), left out of training and validation."""
    nodata: str = "error"
    """Missing values in hyperspectral cubes (NaN/inf, or the file's no-data value): error (stop
    with a line naming the file and channel), fill (the channel mean, 0 after normalization) or
    mask (filled for the input and left out of the loss)."""
    num_workers: int = 0
    """DataLoader worker processes per rank that build micro-batches in the background (0: inline)."""
    ensemble_member: Optional[str] = None
    """ERA5 data with an ensemble dimension (number, realization, ...): the member to use, an index
    (0, 1, ...), or mean for the ensemble mean. None: the data must not hold several members."""

    def validate(self) -> None:
        """Every rule of the section that needs no data (the tasks check paths and contents)."""
        # The hyperspectral readers own the on-disk contract; imported here, where it is needed,
        # so that loading a config stays light.
        from megatron_dchag.data.hyperspectral.formats import FILE_FORMATS, LAYOUTS
        from megatron_dchag.data.hyperspectral.nodata import NODATA_POLICIES

        check_not_empty("data.data_path", self.data_path, "a path given later with --data-path")
        check_not_empty("data.stats_file", self.stats_file, "no statistics file")
        check_choice("data.file_format", self.file_format, FILE_FORMATS)
        if not self.dataset_name.strip():
            raise ConfigError(f"data.dataset_name='{self.dataset_name}' is empty (the HDF5 dataset holding each cube)")
        check_choice("data.layout", self.layout, LAYOUTS)
        check_names("data.channels", self.channels, empty_hint="leave it unset for the default ERA5 channels")
        check_fraction("data.val_fraction", self.val_fraction)
        check_names("data.val_files", self.val_files, empty_hint="leave it unset for the val_fraction split")
        check_names("data.test_files", self.test_files, empty_hint="leave it unset for no test cubes")
        both = sorted(set(self.val_files or ()) & set(self.test_files or ()))
        if both:
            raise ConfigError(f"data.test_files repeats '{both[0]}' of data.val_files (a cube belongs to one split)")
        check_choice("data.nodata", self.nodata, NODATA_POLICIES)
        check_at_least("data.num_workers", self.num_workers, 0, "0 loads micro-batches in the training process")
        member = self.ensemble_member
        if member is not None and not (member.strip().lower() == "mean" or member.strip().isdigit()):
            raise ConfigError(f"data.ensemble_member={member!r} must be a member index (0, 1, ...) or mean")


@dataclass
class TrainingConfig:
    """Batches, optimizer, schedule, precision, evaluation, checkpoints and logging."""

    micro_batch_size: int = 2
    """Samples per micro-batch on each data-parallel replica."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all replicas; a multiple of micro_batch_size x DP (the
    quotient is the number of micro-batches accumulated per step). None: micro_batch_size x DP."""
    train_iters: int = 100
    """Optimizer steps to train for (0: none)."""
    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 0
    """Steps of linear warm-up from 0 to lr."""
    lr_decay_style: str = "cosine"
    """Decay from lr to min_lr over train_iters: constant, linear, cosine or inverse-square-root."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm (0: no clipping)."""
    bf16: bool = False
    """bf16 parameters and activations with fp32 master weights and gradients."""
    recompute_granularity: Optional[str] = None
    """Activation recompute: full, selective (backbone), channel_stage, or None."""
    seed: int = 1234
    """Seed of initialisation, data order, crops and masks."""
    eval_interval: int = 50
    """Evaluate every this many steps (0: only once at the end of training)."""
    eval_iters: int = 5
    """Steps of evaluation batches per evaluation (0: no evaluation)."""
    log_interval: int = 10
    """Log the averaged training loss every this many steps."""
    save: Optional[str] = None
    """Checkpoint directory. None: no checkpoints."""
    load: Optional[str] = None
    """Checkpoint to load (a save directory or one of its iter_* directories). None: start fresh."""
    save_interval: Optional[int] = None
    """Save a checkpoint every this many steps. None: only at the end (and on a clean stop)."""
    log_dir: Optional[str] = None
    """Where metrics.jsonl, TensorBoard events and config.yaml go. None: the save directory."""
    exit_duration_in_mins: Optional[float] = None
    """Save and stop after this many minutes of wall time. None: no time limit."""
    skip_train: bool = False
    """Only evaluate the loaded model."""
    finetune: bool = False
    """Load the weights only (no optimizer, scheduler, data position or iteration)."""
    max_consecutive_nonfinite: int = 5
    """Stop (after saving the last good state) after this many non-finite steps in a row."""
    keep_last_checkpoints: Optional[int] = None
    """Keep only the newest this many checkpoints. None: keep all."""
    override_opt_param_scheduler: bool = False
    """On resume, take the learning-rate schedule (lr, min_lr, lr_warmup_iters, train_iters as the
    decay length, lr_decay_style) from this config instead of the checkpoint (Megatron-LM's
    ``--override-opt-param-scheduler``). False: the checkpoint's schedule wins, with a notice when
    it differs from this config."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device (GPU, or GCD of an MI250X) that the logged model-FLOPs utilisation
    (MFU) is stated against. None: the vendor's dense peak for the run's precision by device name
    (spec sheets: AMD MI250X per GCD 191.5 bf16 / 47.9 fp32 matrix; NVIDIA H100 and H200 SXM 989
    bf16 / 67 fp32; A100 312 bf16 / 19.5 fp32, fp32 without TF32); on the CPU or an unlisted device
    no MFU is reported. A positive number."""
    wandb_project: Optional[str] = None
    """Weights & Biases project to log to, next to TensorBoard (needs the wandb package). None: no
    W&B logging."""
    wandb_exp_name: Optional[str] = None
    """Name of the W&B run. None: W&B picks one."""
    wandb_save_dir: Optional[str] = None
    """Where W&B keeps its local files. None: ``<log_dir>/wandb``."""

    def validate(self) -> None:
        """Every rule of the section; the global batch against the data-parallel size is checked by
        :func:`~megatron_dchag.config.resolve.run_shape`."""
        check_positive("training.micro_batch_size", self.micro_batch_size)
        check_positive("training.global_batch_size", self.global_batch_size, optional=True)
        check_at_least("training.train_iters", self.train_iters, 0)
        check_at_least("training.lr", self.lr, 0)
        check_at_least("training.min_lr", self.min_lr, 0)
        if self.min_lr > self.lr:
            raise ConfigError(f"training.min_lr={self.min_lr} must be <= training.lr={self.lr}")
        check_at_least("training.lr_warmup_iters", self.lr_warmup_iters, 0)
        check_choice("training.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        check_at_least("training.weight_decay", self.weight_decay, 0)
        check_fraction("training.adam_beta1", self.adam_beta1)
        check_fraction("training.adam_beta2", self.adam_beta2)
        check_greater("training.adam_eps", self.adam_eps, 0)
        check_at_least("training.clip_grad", self.clip_grad, 0, "0 disables clipping")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(
                f"training.recompute_granularity={self.recompute_granularity!r} is not one of "
                f"{', '.join(str(g) for g in RECOMPUTE_GRANULARITIES)}"
            )
        check_at_least("training.seed", self.seed, 0)
        check_at_least("training.eval_interval", self.eval_interval, 0, "0 evaluates only at the end")
        check_at_least("training.eval_iters", self.eval_iters, 0, "0 disables evaluation")
        check_positive("training.log_interval", self.log_interval)
        check_not_empty("training.save", self.save, "no checkpoints")
        check_not_empty("training.load", self.load, "a fresh start")
        check_positive("training.save_interval", self.save_interval, optional=True)
        check_not_empty("training.log_dir", self.log_dir, "the save directory")
        if self.exit_duration_in_mins is not None:
            check_greater("training.exit_duration_in_mins", self.exit_duration_in_mins, 0)
        check_positive("training.max_consecutive_nonfinite", self.max_consecutive_nonfinite)
        check_positive("training.keep_last_checkpoints", self.keep_last_checkpoints, optional=True)
        if self.peak_tflops is not None:
            check_greater("training.peak_tflops", self.peak_tflops, 0)
        check_not_empty("training.wandb_project", self.wandb_project, "no W&B logging")
        check_not_empty("training.wandb_exp_name", self.wandb_exp_name, "a name chosen by W&B")
        check_not_empty("training.wandb_save_dir", self.wandb_save_dir, "<log_dir>/wandb")


# ----------------------------------------------------------------------------------------------
# the whole experiment
# ----------------------------------------------------------------------------------------------


@dataclass
class ExperimentConfig:
    """One run: the architecture, its workload section, the layout, the data and the training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)

    def validate(self, world_size: Optional[int] = None, workload_sections: Optional[Sequence[str]] = None) -> None:
        """Every section's rules, the rules between sections, and (when ``world_size`` is known) the
        layout against TP x PP x DP.

        ``workload_sections``: which workload sections (``mae``, ``forecast``) the run uses and must
        be valid (``None``: all of them). An unused section's defaults must not reject a run, e.g.
        the MAE decoder's 4 heads at TP=8 in a forecasting run.
        """
        sections = WORKLOAD_SECTIONS if workload_sections is None else tuple(workload_sections)
        tp = self.parallel.tensor_model_parallel_size
        self.parallel.validate()
        self.model.validate(tp)
        self._validate_pipeline_split()
        self._validate_sequence_parallel(sections)
        self.training.validate()
        self.data.validate()
        if "mae" in sections:
            self.mae.validate(tp)
        if "forecast" in sections:
            self.forecast.validate()
        if "segmentation" in sections:
            self.segmentation.validate()
            if self.segmentation.mode == "linear_probe" and self.parallel.pipeline_model_parallel_size > 1:
                raise ConfigError(
                    "segmentation.mode=linear_probe needs parallel.pipeline_model_parallel_size=1 (the frozen "
                    "encoder's stages would have nothing to train; use mode=finetune for pipeline parallelism)"
                )
        if world_size is not None:
            run_shape(self, data_parallel_size(self.parallel, world_size))

    def _validate_pipeline_split(self) -> None:
        """The backbone's layers over the pipeline stages (ignored at PP = 1)."""
        par, model = self.parallel, self.model
        pp = par.pipeline_model_parallel_size
        vpp = par.virtual_pipeline_model_parallel_size if pp > 1 else None
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
            if sum(split) != model.num_layers:
                raise ConfigError(
                    f"parallel.pipeline_layer_split sums to {sum(split)} but model.num_layers={model.num_layers}"
                )
        elif model.num_layers % stages:
            what = (f"parallel.pipeline_model_parallel_size={pp}" if not vpp else
                    f"parallel.pipeline_model_parallel_size={pp} x parallel.virtual_pipeline_model_parallel_size={vpp}")
            raise ConfigError(
                f"model.num_layers={model.num_layers} is not divisible by {what} "
                "(or give parallel.pipeline_layer_split)"
            )

    def _validate_sequence_parallel(self, sections: Sequence[str]) -> None:
        """Sequence parallelism splits the backbone's sequence over TP ranks (ignored at TP = 1)."""
        model, tp = self.model, self.parallel.tensor_model_parallel_size
        if not (self.parallel.sequence_parallel and tp > 1):
            return
        if ("forecast" in sections or "segmentation" in sections) and model.num_patches % tp:
            raise ConfigError(
                f"parallel.sequence_parallel=true: the {model.num_patches} patches of model.image_size="
                f"{list(model.image_size)} / model.patch_size={model.patch_size} are not divisible by "
                f"parallel.tensor_model_parallel_size={tp}"
            )
        if "mae" in sections:
            visible = model.num_patches - num_masked_patches(model.num_patches, self.mae.mask_ratio)
            if visible % tp:
                raise ConfigError(
                    f"parallel.sequence_parallel=true: the encoder's {visible} visible patches ({model.num_patches} "
                    f"patches, mae.mask_ratio={self.mae.mask_ratio}) are not divisible by "
                    f"parallel.tensor_model_parallel_size={tp}"
                )


def validate_model_config(model: ModelConfig, tensor_model_parallel_size: int = 1) -> None:
    """:meth:`ModelConfig.validate` (for callers that build a model from its section alone)."""
    model.validate(tensor_model_parallel_size)


def validate_config(cfg: ExperimentConfig, world_size: Optional[int] = None,
                    workload_sections: Optional[Sequence[str]] = None) -> None:
    """:meth:`ExperimentConfig.validate`."""
    cfg.validate(world_size=world_size, workload_sections=workload_sections)

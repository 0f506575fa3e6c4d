"""Weather forecaster on the D-CHAG encoder: state at ``t`` (+ lead time) -> state at ``t + Δ``.

- **Encoder**: :class:`~megatron_dchag.models.encoder.DCHAGEncoder` with its lead-time embedding
  (``model.lead_time_embedding=true``): each TP rank tokenizes only its own input channels.
- **Head**: a :class:`~megatron_dchag.layers.heads.ChannelParallelHead` ``D -> C_out_local * p²``
  per patch; each TP rank predicts only the output channels it owns, and no rank ever holds all
  output channels.
- **Output channels -> ranks** (:class:`ForecastChannels`). Every output channel must be one of
  the input channels, and it is owned by the rank that owns that input channel: output channel
  ``c`` belongs to the channel group of input ``c``. With the default (outputs = inputs) the
  output groups are the input groups. With a subset (``forecast.output_channels``) the outputs
  are put in input order and group ``g`` predicts the outputs whose input lies in group ``g``
  (possibly none). So a rank always has the input state of its outputs: the residual below and
  the persistence reference need no communication, and the head's weights are sharded by
  channel group exactly like the tokenizer (checkpoints reshard to any TP dividing G). A group
  that predicts none of the subset gets one padding row in the head, never used, so that no
  parameter or checkpoint shard has size zero.
- **Residual** (``forecast.residual``, default on): the prediction is ``x_t + head(...)`` in
  normalized units; the head's weights start at zero, so an untrained model is persistence.
- **Loss**: latitude-weighted MSE (normalized units) over all output channels of all ranks,
  :func:`latitude_weighted_sq_error` summed locally and reduced across TP, divided by the global
  element count. Latitude weights are :func:`megatron_dchag.metrics.latitude_weights` (mean 1,
  ``forecast.latitude_weighting`` ``cos`` or ``area``). Constant outputs (land-sea mask,
  orography) are left out of the loss unless ``forecast.loss_on_constants``.
- **Time features** (``forecast.time_features``, default off): the local solar time of each patch
  and the day of year of the input state (:func:`time_features`), projected to the hidden size
  and added to the encoder's input embeddings (:class:`TimeEmbeddedEncoder`); the projection
  starts at zero. Off, the model has no such weights, so older checkpoints load unchanged.

Pipeline parallelism: ``pre_process`` stages own the encoder's channel stage and embeddings,
later stages receive hidden states through :meth:`ForecastModel.set_input_tensor`; only the
``post_process`` stage holds the head and computes the loss. Every stage is given the same batch
(the last stage uses its input channels for the residual).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_dchag.config import ConfigError, ExperimentConfig, resolve_config, split_evenly
from megatron_dchag.layers.channel_plan import ChannelGroupPlan
from megatron_dchag.layers.channel_stage import make_channel_plan
from megatron_dchag.layers.heads import ChannelParallelHead, reduce_loss_across_tp
from megatron_dchag.models.encoder import DCHAGEncoder, make_transformer_config

SECONDS_PER_DAY = 86400.0
DAYS_PER_YEAR = 365.2425
NUM_TIME_FEATURES = 4


# ----------------------------------------------------------------------------------------------
# Channels
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputGroupPlan(ChannelGroupPlan):
    """A :class:`ChannelGroupPlan` with explicit (possibly empty) group sizes, for output subsets."""

    sizes: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.sizes) != self.num_groups or sum(self.sizes) != self.num_channels or min(self.sizes) < 0:
            raise ValueError(f"output group sizes {self.sizes} do not split {self.num_channels} channels into {self.num_groups} groups")
        if self.num_groups % self.tp_size:
            raise ValueError(f"channel_groups={self.num_groups} is not divisible by tensor_model_parallel_size={self.tp_size}")

    @property
    def group_sizes(self) -> List[int]:
        return list(self.sizes)


@dataclass(frozen=True)
class ForecastChannels:
    """Input and output channel lists of a forecaster and how outputs map to channel groups.

    ``inputs``: canonical input channel names (the model's ``num_channels``, in data order);
    ``outputs``: canonical output names **in input order**; ``output_input_index[k]``: the input
    position of output ``k``; ``output_group_sizes[g]``: outputs predicted by channel group ``g``.
    """

    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    output_input_index: Tuple[int, ...]
    output_group_sizes: Tuple[int, ...]
    same_as_inputs: bool

    @staticmethod
    def resolve(channels: Optional[Sequence[str]], output_channels: Optional[Sequence[str]], num_groups: int) -> "ForecastChannels":
        """Raises :class:`ConfigError` naming the field on a bad channel list."""
        from megatron_dchag.data.era5.naming import DEFAULT_ERA5_CHANNELS, parse_channels

        try:
            inputs = [s.name for s in parse_channels(channels if channels is not None else DEFAULT_ERA5_CHANNELS)]
        except ValueError as exc:
            raise ConfigError(f"data.channels: {exc}") from None
        if num_groups > len(inputs):
            raise ConfigError(f"model.channel_groups={num_groups} is larger than the {len(inputs)} channels of data.channels")
        group_sizes = split_evenly(len(inputs), num_groups)
        group_of_input = np.repeat(np.arange(num_groups), group_sizes)
        if output_channels is None:
            return ForecastChannels(tuple(inputs), tuple(inputs), tuple(range(len(inputs))), tuple(group_sizes), True)
        try:
            wanted = [s.name for s in parse_channels(output_channels)]
        except ValueError as exc:
            raise ConfigError(f"forecast.output_channels: {exc}") from None
        position = {name: i for i, name in enumerate(inputs)}
        missing = [name for name in wanted if name not in position]
        if missing:
            raise ConfigError(
                f"forecast.output_channels {missing} are not input channels (data.channels); every output must also be an "
                "input, and it is predicted by the rank that owns that input"
            )
        index = sorted(position[name] for name in wanted)
        sizes = np.bincount(group_of_input[index], minlength=num_groups)
        return ForecastChannels(
            tuple(inputs), tuple(inputs[i] for i in index), tuple(index), tuple(int(s) for s in sizes),
            len(index) == len(inputs),
        )

    def output_plan(self, tp_size: int, tp_rank: int) -> ChannelGroupPlan:
        """Which output channels each group (and so each TP rank) predicts."""
        groups = len(self.output_group_sizes)
        if self.same_as_inputs:
            return ChannelGroupPlan(len(self.outputs), groups, tp_size, tp_rank)
        return OutputGroupPlan(len(self.outputs), groups, tp_size, tp_rank, sizes=self.output_group_sizes)

    def head_plan(self, tp_size: int, tp_rank: int) -> ChannelGroupPlan:
        """The head's layout: :meth:`output_plan` with every empty group given one padding row,
        whose prediction is dropped (checkpoints cannot hold zero-size shards)."""
        if self.same_as_inputs or min(self.output_group_sizes) > 0:
            return self.output_plan(tp_size, tp_rank)
        sizes = tuple(max(1, s) for s in self.output_group_sizes)
        return OutputGroupPlan(sum(sizes), len(sizes), tp_size, tp_rank, sizes=sizes)

    def head_keep_index(self, tp_size: int, tp_rank: int) -> List[int]:
        """Positions of this rank's real outputs among its head rows (padding rows left out)."""
        real, padded = self.output_plan(tp_size, tp_rank), self.head_plan(tp_size, tp_rank)
        keep, offset = [], 0
        for g in padded.owned_groups(sharded=True):
            keep += list(range(offset, offset + real.group_sizes[g]))
            offset += padded.group_sizes[g]
        return keep

    def loss_channel_mask(self, loss_on_constants: bool) -> np.ndarray:
        """Bool ``[C_out]``: outputs that count in the loss."""
        from megatron_dchag.data.era5.naming import parse_channel

        if loss_on_constants:
            return np.ones(len(self.outputs), dtype=bool)
        return np.array([not parse_channel(c).is_constant for c in self.outputs], dtype=bool)


def forecast_channels(cfg: ExperimentConfig) -> ForecastChannels:
    """The run's channels (``cfg`` resolved: G set); ``model.num_channels`` must be their number."""
    channels = ForecastChannels.resolve(cfg.data.channels, cfg.forecast.output_channels, cfg.model.channel_groups)
    if len(channels.inputs) != cfg.model.num_channels:
        raise ConfigError(
            f"model.num_channels={cfg.model.num_channels} does not match the {len(channels.inputs)} channels of "
            "data.channels"
        )
    return channels


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def default_latitudes(num_rows: int) -> np.ndarray:
    """Cell-centre latitudes of a regular global grid of ``num_rows`` rows, south to north."""
    step = 180.0 / num_rows
    return -90.0 + step / 2.0 + step * np.arange(num_rows)


def latitude_weighted_sq_error(
    pred: torch.Tensor, target: torch.Tensor, lat_weights: torch.Tensor, channel_weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``Σ_{b,c,h,w} w_h · m_c · (pred - target)²`` over ``[B, C, H, W]`` fields (float32 sum).

    ``lat_weights [H]`` (mean 1 over the rows), ``channel_weights [C]`` (1 in the loss, 0 out).
    Divided by ``B · C_loss · H · W`` this is the latitude-weighted MSE.
    """
    err = (pred.float() - target.float()) ** 2
    err = err * lat_weights.to(err.dtype)[:, None]
    if channel_weights is not None:
        err = err * channel_weights.to(err.dtype)[:, None, None]
    return err.sum()


def unpatchify(patches: torch.Tensor, grid: Tuple[int, int], patch_size: int) -> torch.Tensor:
    """Head output ``[L, B, C, p*p]`` (L row-major over the patch grid) -> fields ``[B, C, H, W]``."""
    (gh, gw), p = grid, patch_size
    _, b, c, _ = patches.shape
    x = patches.reshape(gh, gw, b, c, p, p).permute(2, 3, 0, 4, 1, 5)
    return x.reshape(b, c, gh * p, gw * p)


def time_features(input_time_s: torch.Tensor, patch_longitudes: torch.Tensor, num_patch_rows: int) -> torch.Tensor:
    """``[L, B, 4]`` (L row-major over the patch grid): sin and cos of each patch's local solar
    time (UTC + longitude / 15 h) and of the day of year, at the input times ``input_time_s [B]``
    (seconds since 1970-01-01 UTC); ``patch_longitudes [gw]`` in degrees east."""
    t = input_time_s.to(torch.float64)
    day = torch.remainder(t, SECONDS_PER_DAY) / SECONDS_PER_DAY  # [B], fraction of the UTC day
    year = torch.remainder(t / SECONDS_PER_DAY, DAYS_PER_YEAR) / DAYS_PER_YEAR
    local = 2 * np.pi * (day[None, :] + patch_longitudes.to(torch.float64)[:, None] / 360.0)  # [gw, B]
    season = 2 * np.pi * year
    gw, b = local.shape
    per_column = torch.stack([local.sin(), local.cos(), season.sin().expand(gw, b), season.cos().expand(gw, b)], dim=-1)
    return per_column.unsqueeze(0).expand(num_patch_rows, gw, b, NUM_TIME_FEATURES).reshape(-1, b, NUM_TIME_FEATURES)


class TimeEmbeddedEncoder(DCHAGEncoder):
    """The D-CHAG encoder with one more term added to its input embeddings: ``extra_embedding``
    ``[L, B, D]``, which the forecaster sets for the duration of one forward call."""

    extra_embedding: Optional[torch.Tensor] = None

    def embed(self, images, patch_index=None, lead_time_hours=None):
        hidden = super().embed(images, patch_index, lead_time_hours)
        if self.extra_embedding is not None:
            hidden = hidden + self.extra_embedding.to(hidden.dtype)
        return hidden


class ForecastOutput(NamedTuple):
    """A tuple, so megatron's Float16Module can cast it; fields in this order."""

    loss: torch.Tensor  # scalar latitude-weighted MSE over all output channels of all ranks
    prediction: torch.Tensor  # [B, C_out_local, H, W], normalized units


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class ForecastModel(MegatronModule):
    """See the module docstring. ``cfg``: as loaded or already resolved (its defaults, G among
    them, are filled in by :func:`~megatron_dchag.config.resolve_config`). ``latitudes``: the data's
    latitude of each image row (degrees, any order; default a regular cell-centre grid, south to north).
    ``longitudes``: the data's longitude of each image column (degrees east; default a regular global
    grid from 0°E); only the time features use them."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        seed: int = 1234,
        latitudes: Optional[Sequence[float]] = None,
        pre_process: bool = True,
        post_process: bool = True,
        longitudes: Optional[Sequence[float]] = None,
    ):
        from megatron_dchag.metrics import latitude_weights

        cfg = resolve_config(cfg)
        model, fc = cfg.model, cfg.forecast
        if not model.lead_time_embedding:
            raise ConfigError("model.lead_time_embedding must be true for forecasting (the lead time is a model input)")
        model.validate(cfg.parallel.tensor_model_parallel_size)
        config = make_transformer_config(model, cfg.parallel, cfg.training)
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.residual = fc.residual
        self.patch_size = model.patch_size
        self.plan = make_channel_plan(model)
        self.channels = forecast_channels(cfg)
        self._input_range = self.plan.owned_channel_range(model.shards_channels)
        self.time_features = fc.time_features
        encoder_class = TimeEmbeddedEncoder if self.time_features else DCHAGEncoder
        self.encoder = encoder_class(
            model, config, seed=seed, pre_process=pre_process, post_process=post_process,
            recompute_channel_stage=cfg.training.recompute_granularity == "channel_stage",
        )
        self.grid = self.encoder.grid
        if self.time_features and pre_process:
            w = model.image_size[1]
            lons = 360.0 * np.arange(w) / w if longitudes is None else np.asarray(longitudes, dtype=np.float64)
            if lons.shape != (w,):
                raise ConfigError(f"the data has {lons.size} longitude columns but model.image_size width is {w}")
            self.register_buffer("patch_longitudes", torch.as_tensor(
                lons.reshape(self.grid[1], self.patch_size).mean(axis=1)), persistent=False)
            self.time_embedding = torch.nn.Linear(NUM_TIME_FEATURES, model.hidden_size, bias=False)
            with torch.no_grad():  # starts as the model without time features
                self.time_embedding.weight.zero_()
        self.output_plan = self.channels.output_plan(self.plan.tp_size, self.plan.tp_rank)
        lo, hi = self.output_plan.owned_channel_range(sharded=True)
        self._output_range = (lo, hi)
        in_lo, in_hi = self._input_range
        local_in = [i - in_lo for i in self.channels.output_input_index[lo:hi]]
        assert all(0 <= i < in_hi - in_lo for i in local_in), "an output's input channel is not on its rank"
        self.register_buffer("output_input_index", torch.tensor(local_in, dtype=torch.long), persistent=False)
        mask = self.channels.loss_channel_mask(fc.loss_on_constants)
        self.num_loss_channels = int(mask.sum())
        if self.num_loss_channels == 0:
            raise ConfigError("no output channel is in the loss (all outputs are constants; set forecast.loss_on_constants=true)")
        self.register_buffer("loss_channel_weights", torch.tensor(mask[lo:hi], dtype=torch.float32), persistent=False)
        h = model.image_size[0]
        lats = default_latitudes(h) if latitudes is None else np.asarray(latitudes, dtype=np.float64)
        if lats.shape != (h,):
            raise ConfigError(f"the data has {lats.size} latitude rows but model.image_size height is {h}")
        self.register_buffer(
            "lat_weights", torch.as_tensor(latitude_weights(lats, fc.latitude_weighting), dtype=torch.float32),
            persistent=False,
        )
        self.head_plan = self.channels.head_plan(self.plan.tp_size, self.plan.tp_rank)
        keep = self.channels.head_keep_index(self.plan.tp_size, self.plan.tp_rank)
        padded = len(keep) != sum(self.head_plan.owned_group_sizes(sharded=True))
        self.register_buffer("head_keep_index", torch.tensor(keep, dtype=torch.long) if padded else None, persistent=False)
        if post_process:
            self.head = ChannelParallelHead(self.head_plan, model.hidden_size, self.patch_size**2, seed, name="forecast.head")
            if self.residual:  # start exactly at persistence: x_t + 0
                with torch.no_grad():
                    self.head.weight.zero_()

    # -- channels of this rank ----------------------------------------------------------------------
    @property
    def input_channel_range(self) -> Tuple[int, int]:
        """Input channels (into ``channels.inputs``) this rank reads: ``[start, stop)``, on every stage."""
        return self._input_range

    @property
    def output_channel_range(self) -> Tuple[int, int]:
        """Output channels (into ``channels.outputs``) this rank predicts: ``[start, stop)``."""
        return self._output_range

    @property
    def output_channel_names(self) -> List[str]:
        return list(self.channels.outputs[slice(*self._output_range)])

    @property
    def uses_time_features(self) -> bool:
        """Whether :meth:`forward` needs ``input_time_s`` (``forecast.time_features``)."""
        return self.time_features

    def set_input_tensor(self, input_tensor) -> None:
        self.encoder.set_input_tensor(input_tensor)

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        images: Optional[torch.Tensor],
        lead_time_hours: Optional[torch.Tensor] = None,
        target: Optional[torch.Tensor] = None,
        input_time_s: Optional[torch.Tensor] = None,
    ):
        """``images [B, C_in_local, H, W]`` (normalized, this rank's input channels),
        ``lead_time_hours [B]``, ``target [B, C_out_local, H, W]`` (normalized) or ``None``,
        ``input_time_s [B]`` the valid time of ``images`` (seconds since 1970-01-01 UTC; read only
        with ``forecast.time_features``).

        Returns the hidden states ``[L, B, D]`` on a non-last pipeline stage; on the last stage a
        :class:`ForecastOutput` (``loss`` is NaN-free zero when ``target`` is ``None``).
        """
        if self.time_features and self.pre_process:
            if input_time_s is None:
                raise ValueError("this forecaster has time features (forecast.time_features): pass input_time_s [B]")
            features = time_features(input_time_s.to(self.patch_longitudes.device), self.patch_longitudes, self.grid[0])
            self.encoder.extra_embedding = self.time_embedding(features.to(self.time_embedding.weight.dtype))
            try:
                hidden = self.encoder(images, lead_time_hours=lead_time_hours)
            finally:
                self.encoder.extra_embedding = None
        else:
            hidden = self.encoder(images if self.pre_process else None, lead_time_hours=lead_time_hours)
        if not self.post_process:
            return hidden
        out = self.head(hidden)  # [L, B, head rows, p*p]
        if self.head_keep_index is not None:
            out = out.index_select(2, self.head_keep_index)
        delta = unpatchify(out, self.grid, self.patch_size)  # [B, C_out_local, H, W]
        if self.residual:
            pred = images.index_select(1, self.output_input_index).to(delta.dtype) + delta
        else:
            pred = delta
        if target is None:
            return ForecastOutput(loss=torch.zeros((), device=pred.device), prediction=pred)
        local = latitude_weighted_sq_error(pred, target, self.lat_weights, self.loss_channel_weights)
        b, _, h, w = target.shape
        loss = reduce_loss_across_tp(local) / float(b * self.num_loss_channels * h * w)
        return ForecastOutput(loss=loss, prediction=pred)

"""Using a pretrained model: load it from a checkpoint or an export, and feed it raw data.

:func:`load_pretrained` rebuilds the model a run trained, from either

- a checkpoint: a ``--save`` directory (its latest checkpoint) or one ``iter_*`` directory, saved
  at any TP x PP layout; the model is rebuilt from the checkpoint's ``config.yaml`` and task name,
  and dist_checkpointing reshards the weights onto this process's layout; or
- a portable ``.safetensors`` file (``tools/convert_checkpoint.py --export``): full TP=1 weights,
  cut into this rank's pieces (:func:`~megatron_dchag.models.full_weights.load_full_state_dict`).

It runs at the TP size of the current megatron ``parallel_state`` (under torchrun or srun, call
:func:`~megatron_dchag.distributed.initialize_distributed` first; each rank then holds and reads
only its own channel groups), or initializes one process at TP=1 when nothing is initialized.
PP must be 1; any DP size works (every DP rank holds the whole TP-sharded model).

The normalization the run trained with comes with the weights (``normalization.json`` in the
checkpoint, the ``normalization`` metadata of an export; :mod:`megatron_dchag.data.normalization`).
Checkpoints saved before that was stored need the run's statistics file (``stats_file=``); a run
that trained without one (raw values) needs nothing.

:class:`PretrainedModel` takes raw data, as read from files (un-normalized; all channels, or this
rank's channels only), normalizes it as training did and returns

- :meth:`~PretrainedModel.tokens`: one embedding per patch ``[B, L, D]`` (batch first);
- :meth:`~PretrainedModel.embed`: one pooled embedding per image ``[B, D]`` (mean over patches);
- :meth:`~PretrainedModel.reconstruct` (MAE): the image with its masked patches predicted, in
  physical units;
- :meth:`~PretrainedModel.forecast` (ERA5): the state at a lead time, in physical units.

Embeddings are replicated on the TP ranks; reconstructions and forecasts are gathered over them,
so every rank returns the whole result. :func:`load_encoder` is the entry for code that builds on
the pretrained encoder (fine-tuning): the encoder module with its weights, its config and the
normalization.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron.core import parallel_state

from megatron_dchag.config import ConfigError, ExperimentConfig
from megatron_dchag.data.normalization import Normalization, NormalizationError, normalization_from_stats_file
from megatron_dchag.device import compute_device
from megatron_dchag.training.builder import build_single_model
from megatron_dchag.training.checkpoint_conversion import checkpoint_description, config_for_layout, read_portable
from megatron_dchag.training.checkpointing import CheckpointError, load_checkpoint, read_checkpoint_normalization

ArrayLike = Union[np.ndarray, torch.Tensor]
MAE_TASK, FORECAST_TASK = "hyperspectral_mae", "era5_forecast"


class Reconstruction(NamedTuple):
    """An MAE reconstruction: ``images [B, C, H, W]`` in physical units (visible patches as given,
    masked patches predicted) and ``masked [B, L]`` (True where the patch was masked)."""

    images: torch.Tensor
    masked: torch.Tensor


class PretrainedEncoder(NamedTuple):
    """What :func:`load_encoder` returns: the encoder module (weights loaded, this rank's part),
    the model's resolved config and the normalization its inputs need."""

    encoder: torch.nn.Module
    config: ExperimentConfig
    normalization: Normalization


def _ensure_parallel_state() -> None:
    if not parallel_state.model_parallel_is_initialized():
        import contextlib
        import io

        from megatron_dchag.distributed import initialize_distributed

        with contextlib.redirect_stdout(io.StringIO()):  # one process: no layout table to show
            initialize_distributed(1, 1)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp != 1:
        raise ConfigError(f"inference needs pipeline_model_parallel_size=1 (this process has {pp})")


def _is_export(source: str) -> bool:
    return os.path.isfile(source) and source.endswith(".safetensors")


def _normalization(recorded: Optional[str], stats_file: Optional[str], saved: dict, where: str) -> Normalization:
    """The record saved with the weights; else the statistics file given; else, for a run that
    trained on raw values (no ``data.stats_file``), none."""
    if stats_file is not None:
        return normalization_from_stats_file(stats_file)
    if recorded is not None:
        return Normalization.from_json(recorded, where)
    if not (saved.get("data") or {}).get("stats_file"):
        return Normalization("none")
    raise CheckpointError(
        f"'{where}' holds no normalization statistics (saved before they were stored); give the run's "
        f"statistics file ({saved['data']['stats_file']}) as stats_file= / --stats-file")


def _check_normalization(normalization: Normalization, cfg: ExperimentConfig, task: str, where: str) -> None:
    if normalization.kind == "none":
        return
    expected = "hyperspectral" if task == MAE_TASK else "era5"
    if normalization.kind != expected:
        raise NormalizationError(f"{where}: {normalization.kind} statistics do not fit a {task} model")
    if expected == "hyperspectral" and normalization.num_channels != cfg.model.num_channels:
        raise NormalizationError(f"{where}: the statistics are for {normalization.num_channels} channels but the "
                                 f"model has model.num_channels={cfg.model.num_channels}")


def _build(saved: dict, task: str) -> Tuple[ExperimentConfig, torch.nn.Module]:
    from megatron_dchag.tasks.registry import task_class

    if task not in (MAE_TASK, FORECAST_TASK):
        raise CheckpointError(f"no inference for task '{task}' (known: {MAE_TASK}, {FORECAST_TASK})")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = config_for_layout(saved, tp, 1, task=task)  # the saved G kept; validated at this TP size
    cfg.training.bf16 = False  # inference in fp32, whatever the run trained in
    model = build_single_model(cfg, task_class(task)(cfg))
    return cfg, model


def load_pretrained(source: str, stats_file: Optional[str] = None) -> "PretrainedModel":
    """The model saved at ``source`` (a save directory, an ``iter_*`` directory or an exported
    ``.safetensors`` file), built at this process's TP size, weights loaded, in eval mode.

    ``stats_file``: the run's statistics file, for checkpoints saved before the statistics were
    stored with them (given, it replaces the stored ones). Collective over the ranks when loading
    a checkpoint directory."""
    source = os.fspath(source)
    _ensure_parallel_state()
    if _is_export(source):
        tensors, metadata = read_portable(source)
        saved, task, iteration = yaml.safe_load(metadata["config"]), metadata.get("task"), int(metadata.get("iteration", 0))
        normalization = _normalization(metadata.get("normalization"), stats_file, saved, source)
        cfg, model = _build(saved, task)
        from megatron_dchag.models.full_weights import load_full_state_dict

        load_full_state_dict(model, tensors)
    elif os.path.isfile(source):
        raise CheckpointError(f"'{source}' is a file but not a .safetensors export; give a checkpoint directory "
                              "or the file tools/convert_checkpoint.py --export wrote")
    else:
        ckpt, saved, state = checkpoint_description(source)
        task, iteration = state.get("task"), int(state.get("iteration", 0))
        if not task:
            raise CheckpointError(f"checkpoint '{ckpt}' does not record its task (saved by an older version)")
        normalization = _normalization(read_checkpoint_normalization(ckpt), stats_file, saved, ckpt)
        cfg, model = _build(saved, task)
        load_checkpoint(source, [model], load_rng=False)
    _check_normalization(normalization, cfg, task, source)
    model = model.to(compute_device()).eval()
    return PretrainedModel(model, cfg, task, normalization, source, iteration)


def load_encoder(source: str, stats_file: Optional[str] = None) -> PretrainedEncoder:
    """The pretrained D-CHAG encoder of ``source`` (as :func:`load_pretrained` takes it) for code
    that builds on it, e.g. a fine-tuning task: the encoder module of this rank (its channel
    groups, at this process's TP size), the resolved config and the normalization."""
    pretrained = load_pretrained(source, stats_file)
    return PretrainedEncoder(pretrained.encoder, pretrained.config, pretrained.normalization)


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return tensor.detach().to("cpu", torch.float32)


class PretrainedModel:
    """A loaded model and the normalization it needs; see the module docstring."""

    def __init__(self, model: torch.nn.Module, cfg: ExperimentConfig, task: str, normalization: Normalization,
                 source: str, iteration: int):
        self.model, self.config, self.task = model, cfg, task
        self.normalization, self.source, self.iteration = normalization, source, iteration
        self.device = next(model.parameters()).device

    # -- what the model is ------------------------------------------------------------------------
    @property
    def encoder(self) -> torch.nn.Module:
        return self.model.encoder

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.config.model.image_size)

    @property
    def num_channels(self) -> int:
        return self.config.model.num_channels

    @property
    def input_channel_range(self) -> Tuple[int, int]:
        """The input channels this rank reads, ``[start, stop)`` (all of them at TP=1)."""
        return tuple(self.model.input_channel_range)

    @property
    def input_channel_names(self) -> Optional[list]:
        """ERA5: the model's input channels in order (None for cubes, whose channels are indices)."""
        return list(self.model.channels.inputs) if self.task == FORECAST_TASK else None

    @property
    def output_channel_names(self) -> Optional[list]:
        """ERA5: the channels :meth:`forecast` returns, in order."""
        return list(self.model.channels.outputs) if self.task == FORECAST_TASK else None

    # -- inputs -------------------------------------------------------------------------------------
    def crop_window(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)``: the centre crop of the model's image size in an ``height x width`` cube."""
        h, w = self.image_size
        if height < h or width < w:
            raise ValueError(f"the cube is {height} x {width} but the model takes {h} x {w} (model.image_size)")
        y0, x0 = (height - h) // 2, (width - w) // 2
        return y0, y0 + h, x0, x0 + w

    def read_cube(self, path: str, window: Optional[Tuple[int, int, int, int]] = None) -> np.ndarray:
        """Raw values of this rank's channels of a cube file, ``[c, h, w]`` float32: the centre crop
        of the model's image size, or ``window`` ``(y0, y1, x0, x1)``. Read as training reads it
        (the run's ``data.dataset_name``, ``layout`` and ``file_format``; NaN at missing values)."""
        from megatron_dchag.data.hyperspectral.formats import open_cube

        if self.task != MAE_TASK:
            raise ValueError(f"read_cube reads hyperspectral cubes; this is a {self.task} model")
        d = self.config.data
        reader = open_cube(path, file_format=d.file_format, dataset_name=d.dataset_name, layout=d.layout)
        try:
            if reader.num_channels != self.num_channels:
                raise ValueError(f"{path}: cube has {reader.num_channels} channels but the model takes {self.num_channels}")
            y0, y1, x0, x1 = window or self.crop_window(reader.height, reader.width)
            return reader.read(*self.input_channel_range, y0, y1, x0, x1)
        finally:
            reader.close()

    def _local_channels(self, x: torch.Tensor, total: int, lo: int, hi: int) -> torch.Tensor:
        c = x.shape[1]
        if c == total:
            return x[:, lo:hi]
        if c == hi - lo:
            return x
        raise ValueError(f"the input has {c} channels; the model takes all {total} or this rank's {hi - lo} "
                         f"(channels [{lo}, {hi}))")

    def normalize(self, raw: ArrayLike) -> torch.Tensor:
        """Raw ``[B, C, H, W]`` or ``[C, H, W]`` (all channels, or this rank's) -> this rank's
        normalized input ``[B, c, H, W]`` on the model's device, exactly as the datasets compute it.
        Missing values (NaN/inf) are an error under ``data.nodata=error`` and are set to the channel
        mean (0 after normalization) otherwise, as in training."""
        x = _as_float_tensor(raw)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(f"expected raw data [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"the input is {x.shape[2]} x {x.shape[3]} but the model takes "
                             f"{self.image_size[0]} x {self.image_size[1]} (model.image_size; read_cube crops)")
        lo, hi = self.input_channel_range
        if self.task == FORECAST_TASK:
            names = self.input_channel_names
            x = self._local_channels(x, len(names), lo, hi)
            mean, std = self.normalization.era5_affine(names[lo:hi])
            x = (x - torch.from_numpy(mean)) / torch.from_numpy(std)
        else:
            x = self._local_channels(x, self.num_channels, lo, hi)
            mean, inv_std = self.normalization.hyperspectral_affine(lo, hi)
            x = (x - torch.from_numpy(mean)) * torch.from_numpy(inv_std)
        finite = torch.isfinite(x)
        missing = torch.tensor([int((~finite).sum())], dtype=torch.long, device=self.device)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:  # every TP rank decides alike
            dist.all_reduce(missing, group=parallel_state.get_tensor_model_parallel_group())
        if int(missing) and self.config.data.nodata == "error":
            first = f"; first at channel {lo + int((~finite).nonzero()[0, 1])}" if not bool(finite.all()) else ""
            raise ValueError(f"the input has {int(missing)} missing values (NaN/inf{first}) and the run has "
                             "data.nodata=error")
        if not bool(finite.all()):
            x = torch.where(finite, x, torch.zeros_like(x))
        return x.contiguous().to(self.device)

    def _lead(self, lead_hours: Optional[Union[float, ArrayLike]], batch: int) -> Optional[torch.Tensor]:
        if self.task != FORECAST_TASK:
            if lead_hours is not None:
                raise ValueError("lead_hours is for forecast models")
            return None
        if lead_hours is None:
            raise ValueError("a forecast model's embeddings depend on the lead time: give lead_hours")
        lead = torch.as_tensor(lead_hours, dtype=torch.float32).reshape(-1)
        return (lead.expand(batch) if lead.numel() == 1 else lead).to(self.device)

    # -- outputs ------------------------------------------------------------------------------------
    @torch.no_grad()
    def tokens(self, raw: ArrayLike, lead_hours: Optional[Union[float, ArrayLike]] = None) -> torch.Tensor:
        """One embedding per patch: ``[B, L, D]`` (``[L, D]`` for one unbatched image), patches
        row-major over the patch grid. Forecast models take ``lead_hours`` (their lead embedding)."""
        x = self.normalize(raw)
        hidden = self.encoder(x, lead_time_hours=self._lead(lead_hours, x.shape[0]))  # [L, B, D]
        out = hidden.transpose(0, 1).float().cpu()
        return out[0] if _as_float_tensor(raw).dim() == 3 else out

    @torch.no_grad()
    def embed(self, raw: ArrayLike, lead_hours: Optional[Union[float, ArrayLike]] = None) -> torch.Tensor:
        """One embedding per image: the mean of its patch embeddings, ``[B, D]`` (``[D]`` unbatched)."""
        return self.tokens(raw, lead_hours).mean(dim=-2)

    def _gather_channels(self, local: torch.Tensor, channel_range: Tuple[int, int]) -> torch.Tensor:
        """``[B, c, H, W]`` of channels ``channel_range`` on each TP rank -> all channels, in order."""
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return local
        parts: list = [None] * parallel_state.get_tensor_model_parallel_world_size()
        dist.all_gather_object(parts, (tuple(channel_range), local.cpu()),
                               group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat([t for _, t in sorted(parts, key=lambda p: p[0]) if t.shape[1]], dim=1)

    @torch.no_grad()
    def reconstruct(self, raw: ArrayLike, mask_ratio: Optional[float] = None, seed: int = 0) -> Reconstruction:
        """MAE: mask a random ``mask_ratio`` of the patches (default: the run's ``mae.mask_ratio``;
        the mask is a function of ``seed``) and predict them. Under ``mae.norm_pix_loss`` the
        prediction is per-patch normalized; it is put back with the true patch's mean and variance,
        as MAE visualisations do."""
        from megatron_dchag.layers.tokenizer import patchify_channels_first
        from megatron_dchag.models.forecast import unpatchify
        from megatron_dchag.models.mae import random_patch_mask

        if self.task != MAE_TASK:
            raise ValueError(f"reconstruct is for MAE models; this is a {self.task} model")
        x = self.normalize(raw)
        b, grid, p = x.shape[0], self.model.grid, self.config.model.patch_size
        ratio = self.config.mae.mask_ratio if mask_ratio is None else float(mask_ratio)
        visible, masked = random_patch_mask(grid[0] * grid[1], ratio, b, torch.Generator().manual_seed(int(seed)))
        out = self.model(x, visible.to(self.device), masked.to(self.device))
        in_lo = self.input_channel_range[0]
        out_lo, out_hi = self.model.output_channel_range
        patches = patchify_channels_first(x[:, out_lo - in_lo: out_hi - in_lo], p).permute(1, 2, 0, 3).cpu()  # [L, B, c, k]
        pred = out.prediction.float().cpu().permute(2, 0, 1, 3)  # [Lm, B, c, k]
        rows = masked.t()  # [Lm, B]
        if self.config.mae.norm_pix_loss:
            truth = torch.stack([patches[rows[:, i], i] for i in range(b)], dim=1)
            pred = pred * (truth.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt() + truth.mean(-1, keepdim=True)
        for i in range(b):
            patches[rows[:, i], i] = pred[:, i]
        image = unpatchify(patches, grid, p).double()
        mean, inv_std = self.normalization.hyperspectral_affine(out_lo, out_hi)
        image = (image / torch.from_numpy(inv_std).double() + torch.from_numpy(mean).double()).float()
        flags = torch.zeros(b, grid[0] * grid[1], dtype=torch.bool)
        flags.scatter_(1, masked, True)
        images = self._gather_channels(image, (out_lo, out_hi))
        unbatched = _as_float_tensor(raw).dim() == 3
        return Reconstruction(images[0], flags[0]) if unbatched else Reconstruction(images, flags)

    @torch.no_grad()
    def forecast(self, state: ArrayLike, lead_hours: Union[float, ArrayLike]) -> torch.Tensor:
        """ERA5: the state ``lead_hours`` after ``state`` (raw ``[B, C_in, H, W]`` or ``[C_in, H, W]``,
        channels in :attr:`input_channel_names` order), in physical units, channels in
        :attr:`output_channel_names` order."""
        if self.task != FORECAST_TASK:
            raise ValueError(f"forecast is for ERA5 forecast models; this is a {self.task} model")
        x = self.normalize(state)
        out = self.model(x, lead_time_hours=self._lead(lead_hours, x.shape[0]))
        lo, hi = self.model.output_channel_range
        mean, std = self.normalization.era5_affine(self.output_channel_names[lo:hi])
        pred = out.prediction.float().cpu().double() * torch.from_numpy(std).double() + torch.from_numpy(mean).double()
        result = self._gather_channels(pred.float(), (lo, hi))
        return result[0] if _as_float_tensor(state).dim() == 3 else result

    def describe(self) -> dict:
        """What the model is, for the attributes of a features file."""
        from megatron_dchag.config import config_to_dict

        return {"source": self.source, "task": self.task, "iteration": self.iteration,
                "config": yaml.safe_dump(config_to_dict(self.config), sort_keys=False, default_flow_style=None,
                                         width=120),
                "normalization": self.normalization.to_json()}

    def __repr__(self) -> str:
        m = self.config.model
        return (f"PretrainedModel({self.task}, {self.source!r}, iteration {self.iteration}, {m.num_channels} channels, "
                f"{m.image_size[0]}x{m.image_size[1]}, patch {m.patch_size}, hidden {m.hidden_size}, "
                f"TP={parallel_state.get_tensor_model_parallel_world_size()})")


__all__ = ["PretrainedEncoder", "PretrainedModel", "Reconstruction", "load_encoder", "load_pretrained"]

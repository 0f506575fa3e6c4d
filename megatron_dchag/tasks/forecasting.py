"""ERA5 forecasting (the workload of ``pretrain_era5.py``).

Data. Every rank reads only its channels: the input channels of its channel groups
(``model.input_channel_range``) and the output channels it predicts
(``model.output_channel_range``), through :class:`~megatron_dchag.data.era5.dataset.ERA5Dataset`,
normalized with the statistics of ``data.stats_file``.

Training draws **one lead time per micro-batch**, a pure function of ``(seed, micro-batch
step)`` (:class:`~megatron_dchag.data.sampler.ERA5TrainBatchSampler`): all TP ranks of a DP rank read
the same samples, and the stream's state is just the step, so a resumed run replays exactly.
``data.num_workers`` background processes read the samples and collate the micro-batches
(:mod:`~megatron_dchag.data.loader`); the saved step is the last one consumed.

Evaluation uses the fixed leads ``forecast.eval_lead_hours`` on the validation split (the last
``data.val_fraction`` of the time steps). The ``eval_iters × micro-batches`` evaluation batches are
spread round-robin over the leads: every lead sees the same initial times, taken evenly over
the validation window. When more batches are asked for than the window has initial times, the
stream cycles, but a forecast (lead, initial time) counts in the metrics once: the counts reported
(``forecasts/<lead>h`` in the eval record, the table's header) are distinct initial times per lead.
Each batch adds to :class:`~megatron_dchag.metrics.ForecastMetrics`, on
**denormalized** values, the latitude-weighted RMSE / MSE / ACC of the model and the persistence
and climatology RMSE of the variables ``forecast.metric_variables`` that the rank predicts; DP
ranks sum their state, TP ranks (which own different variables) gather theirs, the last pipeline
stage sends the result to rank 0. The eval record of ``metrics.jsonl`` gets keys
``<metric>/<variable>/<lead>h`` (e.g. ``rmse/z_500/24h``, ``acc/t_850/72h``,
``persistence_rmse/z_500/6h``) and ``<log-dir>/forecast_metrics.md`` a markdown table.

Before any compute, :meth:`ERA5ForecastTask.prepare` warns (one line, rank 0) when the statistics
file's time range includes validation times (its climatology saw the validation period).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_dchag.config import ConfigError, ExperimentConfig, resolve_config, run_shape
from megatron_dchag.data.loader import CountingPlan, MicroBatchLoader
from megatron_dchag.device import batch_to_device
from megatron_dchag.models.forecast import ForecastChannels, ForecastModel, forecast_channels
from megatron_dchag.tasks.base import Task

METRIC_ORDER = ("rmse", "persistence_rmse", "climatology_rmse", "acc", "mse", "rmse_of_mean_mse")


def _collate(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _data_error(exc: BaseException, what: str) -> ConfigError:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return ConfigError(f"{what}: {message}")


class ForecastBatch:
    """``(time_index, lead_hours)`` pairs -> the collated micro-batch (a pure function of the pairs);
    evaluation batches are marked ``"_eval"``."""

    def __init__(self, dataset, eval_batch: bool = False):
        self.dataset, self.eval_batch = dataset, eval_batch

    def __call__(self, pairs: List[tuple]) -> Dict[str, Any]:
        batch = _collate([self.dataset[p] for p in pairs])
        if self.eval_batch:
            batch["_eval"] = True
        return batch


class ForecastTrainStream(MicroBatchLoader):
    """Training micro-batches ``{"input", "target", "lead_time_hours", ...}``; state = the step."""

    def __init__(self, dataset, sampler, start_step: int = 0, num_workers: int = 0):
        # micro-batch ``step`` holds ``sampler.batch(step)``
        super().__init__(CountingPlan(sampler.batch, "step", start_step), ForecastBatch(dataset),
                         num_workers=num_workers)


class ForecastEvalStream(MicroBatchLoader):
    """Evaluation micro-batches, round-robin over the leads (row 0 at every lead, row 1 ...), cycling."""

    def __init__(self, dataset, batches: List[List[tuple]], num_workers: int = 0):
        super().__init__(CountingPlan(lambda position: batches[position % len(batches)], "position"),
                         ForecastBatch(dataset, eval_batch=True), num_workers=num_workers)


class ERA5ForecastTask(Task):
    name = "era5_forecast"
    config_sections = ("forecast",)

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.channels: Optional[ForecastChannels] = None
        self.latitudes: Optional[np.ndarray] = None  # the data's latitude rows: set by prepare() (or by a tool)
        self._eval_dataset = None
        self._metrics = None
        self._metric_local: Optional[torch.Tensor] = None
        self._forecasts_seen: Set[Tuple[int, int]] = set()  # (lead, initial time index) in this evaluation

    # -- set-up -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        from megatron_dchag.data.era5.dataset import ERA5Dataset
        from megatron_dchag.data.era5.naming import LAT_DIM, LON_DIM, parse_channels
        from megatron_dchag.data.era5.store import open_era5

        cfg, d, m, fc = self.cfg, self.cfg.data, self.cfg.model, self.cfg.forecast
        if not d.data_path:
            raise ConfigError("data.data_path is not set (give --data-path PATH or data.data_path=PATH)")
        if not d.stats_file:
            raise ConfigError("data.stats_file is not set (make one with tools/compute_era5_stats.py)")
        self.channels = forecast_channels(cfg)
        try:
            metric_names = [s.name for s in parse_channels(fc.metric_variables)]
        except ValueError as exc:
            raise ConfigError(f"forecast.metric_variables: {exc}") from None
        missing = [n for n in metric_names if n not in self.channels.outputs]
        if missing:
            raise ConfigError(f"forecast.metric_variables {missing} are not predicted (not in the output channels)")
        self.metric_names = metric_names
        try:
            ds = open_era5(d.data_path, ensemble_member=d.ensemble_member)
        except (ValueError, KeyError) as exc:
            raise _data_error(exc, f"data.data_path '{d.data_path}'") from None
        grid = (ds.sizes.get(LAT_DIM, 0), ds.sizes.get(LON_DIM, 0))
        if tuple(m.image_size) != grid:
            raise ConfigError(
                f"model.image_size={list(m.image_size)} does not match the data grid {grid[0]}x{grid[1]} "
                "(latitude x longitude; regrid with tools/regrid_era5.py)"
            )
        self.latitudes = ds[LAT_DIM].values.astype(np.float64)
        # Validate channels, statistics, splits and lead times against the data (metadata only).
        for split, kwargs in (("train", {}), ("val", dict(lead_times_hours=fc.eval_lead_hours, return_climatology=True))):
            try:
                ERA5Dataset(d.data_path, **self._dataset_kwargs(split), cache=False, **kwargs)
            except (ValueError, KeyError) as exc:
                raise _data_error(exc, f"data ({split} split)") from None
        self._warn_if_statistics_saw_validation(ds)

    def _warn_if_statistics_saw_validation(self, ds) -> None:
        """One ``warning:`` line on rank 0 when the statistics cover validation times."""
        from megatron_dchag.data.era5.naming import TIME_DIM
        from megatron_dchag.data.era5.statistics import load_era5_stats, validation_overlap

        d = self.cfg.data
        overlap = validation_overlap(load_era5_stats(d.stats_file), ds[TIME_DIM].values, d.val_fraction)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if overlap and rank == 0:
            print(f"warning: data.stats_file '{d.stats_file}': {overlap}", file=sys.stderr, flush=True)

    def _dataset_kwargs(self, split: str) -> Dict[str, Any]:
        d, fc = self.cfg.data, self.cfg.forecast
        assert self.channels is not None
        return dict(
            channels=list(self.channels.inputs),
            output_channels=list(self.channels.outputs),
            max_lead_hours=fc.max_lead_hours,
            lead_step_hours=fc.lead_step_hours,
            min_lead_hours=fc.min_lead_hours,
            stats_file=d.stats_file,
            split=split,
            val_fraction=d.val_fraction,
            seed=self.cfg.training.seed,
            ensemble_member=d.ensemble_member,
        )

    def build_model(self, pre_process: bool = True, post_process: bool = True) -> torch.nn.Module:
        return ForecastModel(self.cfg, seed=self.cfg.training.seed, latitudes=self.latitudes,
                             pre_process=pre_process, post_process=post_process)

    def _rank_dataset(self, model: ForecastModel, split: str, **kwargs):
        from megatron_dchag.data.era5.dataset import ERA5Dataset

        return ERA5Dataset(self.cfg.data.data_path, **self._dataset_kwargs(split), channel_range=model.input_channel_range,
                           output_channel_range=model.output_channel_range, **kwargs)

    # -- data -------------------------------------------------------------------------------------
    def train_stream(self, model, dp_rank, dp_size):
        from megatron_dchag.data.sampler import ERA5TrainBatchSampler

        dataset = self._rank_dataset(model, "train")
        try:
            sampler = ERA5TrainBatchSampler(dataset, self.cfg.training.micro_batch_size, seed=self.cfg.training.seed,
                                            data_parallel_rank=dp_rank, data_parallel_size=dp_size)
        except ValueError as exc:
            raise _data_error(exc, "data (train split)") from None
        return ForecastTrainStream(dataset, sampler, num_workers=self.cfg.data.num_workers)

    def eval_stream(self, model, dp_rank, dp_size):
        from megatron_dchag.data.sampler import ERA5EvalBatchSampler
        from megatron_dchag.metrics import ForecastMetrics, latitude_weights

        fc, tr = self.cfg.forecast, self.cfg.training
        leads = [int(x) for x in fc.eval_lead_hours]
        if self._eval_dataset is None:
            self._eval_dataset = self._rank_dataset(model, "val", lead_times_hours=leads, return_climatology=True)
        dataset = self._eval_dataset
        shape = run_shape(self.cfg, dp_size)
        total = max(1, tr.eval_iters) * shape.num_microbatches
        rows = max(1, math.ceil(total / len(leads)))
        per_step = shape.micro_batch_size * shape.data_parallel_size
        stride = max(1, len(dataset.valid_start_indices) // (rows * per_step))
        try:
            sampler = ERA5EvalBatchSampler(dataset, tr.micro_batch_size, lead_times_hours=leads, data_parallel_rank=dp_rank,
                                           data_parallel_size=dp_size, stride=stride, max_batches_per_lead=rows)
        except ValueError as exc:
            raise _data_error(exc, "data (val split)") from None
        lead_major = list(sampler)
        n = sampler.batches_per_lead
        batches = [lead_major[i * n + r] for r in range(n) for i in range(len(leads))]
        # Metrics of the metric variables this rank predicts.
        names = model.output_channel_names
        local = [i for i, name in enumerate(names) if name in self.metric_names]
        self._metric_local = torch.tensor(local, dtype=torch.long)
        self._metrics = ForecastMetrics([names[i] for i in local], leads,
                                        latitude_weights(dataset.latitudes, fc.latitude_weighting),
                                        centered_acc=fc.acc_centered)
        self._forecasts_seen = set()
        self._output_input_index = model.output_input_index.cpu()
        return ForecastEvalStream(dataset, batches, num_workers=self.cfg.data.num_workers)

    # -- step -------------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)  # on the CPU: the metrics read it there
        on_device = batch_to_device(batch)
        out = model(on_device["input"], lead_time_hours=on_device["lead_time_hours"], target=on_device["target"],
                    input_time_s=on_device["time"])  # read only with forecast.time_features
        if isinstance(out, torch.Tensor):  # a non-last pipeline stage: hidden states
            return out, None
        loss, prediction = out[0], out[1]

        def loss_func(output_tensor):
            if batch.get("_eval"):
                self._update_metrics(prediction.detach(), batch)
            return output_tensor, {"loss": output_tensor.detach().clone()}

        return loss, loss_func

    def _update_metrics(self, prediction: torch.Tensor, batch: Dict[str, Any]) -> None:
        if self._metrics is None or self._metric_local is None or not len(self._metric_local):
            return
        # A forecast the cycling stream repeats counts once.
        rows = []
        for row, pair in enumerate(zip(batch["lead_time_hours"].round().long().tolist(), batch["time_index"].tolist())):
            if pair not in self._forecasts_seen:
                self._forecasts_seen.add(pair)
                rows.append(row)
        if not rows:
            return
        if len(rows) < prediction.shape[0]:
            keep = torch.tensor(rows, dtype=torch.long)
            prediction = prediction.index_select(0, keep.to(prediction.device))
            batch = {k: v.index_select(0, keep) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        ds, idx = self._eval_dataset, self._metric_local
        mean, std = ds.output_mean[idx][:, None, None].double(), ds.output_std[idx][:, None, None].double()
        pred = prediction.double().cpu()[:, idx] * std + mean
        target = batch["target"].double()[:, idx] * std + mean
        in_idx = self._output_input_index[idx]
        in_mean, in_std = ds.input_mean[in_idx][:, None, None].double(), ds.input_std[in_idx][:, None, None].double()
        initial = batch["input"].double()[:, in_idx] * in_std + in_mean
        self._metrics.update(pred, target, batch["lead_time_hours"], climatology=batch["climatology"][:, idx],
                             initial_state=initial)

    def flops_per_sample(self) -> float:
        from megatron_dchag.flops import encoder_flops, training_flops

        m = self.cfg.model
        outputs = len(self.channels.outputs) if self.channels is not None else m.num_channels
        head = 2.0 * m.num_patches * m.hidden_size * outputs * m.patch_size**2
        return training_flops(encoder_flops(m, 1, None, self.cfg.parallel.tensor_model_parallel_size) + head)

    def checkpoint_differences(self, saved_config: Dict[str, Any]) -> List[str]:
        """The checkpoint's input and output channels must be this run's (names and order)."""
        from megatron_dchag.config import build_dataclass

        try:
            # resolved at its own TP size: a checkpoint saved with channel_groups null keeps its G
            saved = resolve_config(build_dataclass(ExperimentConfig, {k: saved_config.get(k) or {} for k in (
                "model", "data", "forecast", "parallel")}))
            theirs = forecast_channels(saved)
        except (ConfigError, TypeError, ValueError):
            return []  # not a forecasting checkpoint: the model fields tell the story
        ours = self.channels or forecast_channels(self.cfg)
        diffs = []
        for what, a, b in (("data.channels", theirs.inputs, ours.inputs), ("forecast.output_channels", theirs.outputs,
                                                                           ours.outputs)):
            if a != b:
                changed = [f"{x}->{y}" for x, y in zip(a, b) if x != y][:3]
                diffs.append(f"{what}: checkpoint has {len(a)} channels, config {len(b)}"
                             + (f" (first differences: {', '.join(changed)})" if changed else ""))
        return diffs

    def pipeline_tensor_shape(self):
        return (self.cfg.model.num_patches, self.cfg.model.hidden_size)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate_extra(self, model, step: int) -> Dict[str, Any]:
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        flat: Dict[str, float] = {}
        counts: Dict[int, int] = {}  # lead -> distinct initial times
        if last_stage and self._metrics is not None:
            self._metrics.all_reduce(parallel_state.get_data_parallel_group())
            for lead, per in self._metrics.compute().items():
                counts[lead] = max(entry["num_samples"] for entry in per.values())
            flat = self._metrics.flat()
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            parts: List[Any] = [None] * parallel_state.get_tensor_model_parallel_world_size()
            dist.all_gather_object(parts, (flat, counts), group=parallel_state.get_tensor_model_parallel_group())
            flat, counts = {}, {}
            for f, c in parts:
                flat.update(f)
                for lead, n in c.items():
                    counts[lead] = max(n, counts.get(lead, 0))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            box = [(flat, counts)]
            src = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())[-1]
            dist.broadcast_object_list(box, src=src, group=parallel_state.get_pipeline_model_parallel_group())
            flat, counts = box[0]
        ordered = self._ordered(flat)
        ordered.update({f"forecasts/{lead}h": counts[lead] for lead in sorted(counts)})
        if dist.get_rank() == 0:
            table = self.markdown_table(ordered, step, counts)
            log_dir = self.cfg.training.log_dir or self.cfg.training.save
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                path = os.path.join(log_dir, "forecast_metrics.md")
                with open(path + ".tmp", "w") as fh:
                    fh.write(table)
                os.replace(path + ".tmp", path)
            print(table, flush=True)
        return ordered

    def _ordered(self, flat: Dict[str, float]) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for name in self.metric_names:
            for lead in self.cfg.forecast.eval_lead_hours:
                for metric in METRIC_ORDER:
                    key = f"{metric}/{name}/{int(lead)}h"
                    if key in flat:
                        out[key] = flat[key]
        return out

    def markdown_table(self, metrics: Dict[str, float], step: int, counts: Dict[int, int]) -> str:
        """The metrics table; ``counts``: lead (hours) -> distinct initial times evaluated."""
        from megatron_dchag.data.era5.naming import parse_channel

        fc = self.cfg.forecast
        if counts and len(set(counts.values())) == 1:
            forecasts = f"{next(iter(counts.values()))} forecasts per lead time (distinct initial times, the same at every lead)"
        else:
            forecasts = "forecasts (distinct initial times) per lead time: " + (
                ", ".join(f"{n} at {lead}h" for lead, n in sorted(counts.items())) or "none")
        lines = [
            f"# Forecast metrics at step {step}",
            "",
            f"Validation split of `{self.cfg.data.data_path}`, {forecasts}. "
            f"Latitude-weighted ({fc.latitude_weighting}) over the grid, physical units; RMSE is the mean "
            f"over forecasts of the per-forecast RMSE; ACC is {'centered' if fc.acc_centered else 'uncentered'} "
            "against the statistics file's climatology. Skill = 1 - RMSE / persistence RMSE.",
            "",
            "| variable | units | lead | RMSE | persistence RMSE | climatology RMSE | skill vs persistence | ACC |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in self.metric_names:
            units = parse_channel(name).info.units
            for lead in fc.eval_lead_hours:
                get = lambda k: metrics.get(f"{k}/{name}/{int(lead)}h")  # noqa: E731
                rmse, pers, clim, acc = get("rmse"), get("persistence_rmse"), get("climatology_rmse"), get("acc")
                skill = None if rmse is None or not pers else 1.0 - rmse / pers
                cells = [_fmt(v) for v in (rmse, pers, clim)] + [_fmt(skill, ".3f"), _fmt(acc, ".4f")]
                lines.append(f"| {name} | {units} | {int(lead)}h | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _fmt(value: Optional[float], spec: str = ".4g") -> str:
    return "–" if value is None else format(value, spec)

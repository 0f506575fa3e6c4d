"""Write ERA5 forecasts of a checkpoint as WeatherBench 2 files (zarr or netCDF), with rollouts.

    torchrun --nproc-per-node 2 tools/forecast_era5.py --load RUN_DIR --out forecasts.zarr \\
        --init-times 2020-01-01T00 2020-01-02T00 --leads 6 24 72 240 [--tensor-model-parallel-size 2]
    python tools/forecast_era5.py --load RUN_DIR --out forecasts.nc \\
        --init-start 2020-01-01T00 --init-end 2020-01-31T00 --init-step-hours 24 --leads 6 12 --score

**Layout** (WeatherBench 2): dimensions ``time`` (the initial time), ``prediction_timedelta``
(timedelta64), ``level`` (hPa, for pressure-level variables), ``latitude``, ``longitude``; one
variable per field under its WeatherBench 2 name, e.g. ``temperature(time, prediction_timedelta,
level, latitude, longitude)`` and ``2m_temperature(time, prediction_timedelta, latitude,
longitude)``; physical units (denormalized with the run's statistics); CF attributes (``units``,
``long_name``, ``standard_name`` where known; the coordinates' too). Pressure-level variables share
one ``level`` axis: a variable not written on some of its levels holds NaN there. The suffix of ``--out``
chooses the format: ``.zarr`` (zarr format ``--zarr-format``, default 2) or ``.nc``.

**Leads.** A lead the model was trained for is direct (one model call). A longer lead is an
autoregressive rollout (:mod:`megatron_dchag.models.rollout`): the model's own output is the next
input, with the constant fields (land-sea mask, orography) from the data; by default the step is
the longest trained lead dividing it (``--rollout-step-hours`` sets it). The file's attributes
``direct_lead_hours``, ``rollout_lead_hours`` and ``lead_method`` say which is which. A rollout
is refused (one ``error:`` line) for a model with an input that it does not predict.

**Parallelism.** The checkpoint reshards to ``--tensor-model-parallel-size`` (any TP dividing
its G); the data-parallel ranks (world / TP) split the initial times; every TP rank reads and
predicts only its own channels; rank 0 gathers and writes. The output is written under a
temporary name and renamed into place; an existing output needs ``--overwrite``.

``--score`` prints, after writing, the latitude-weighted RMSE of every variable and lead against
the store (:func:`score_forecast_file`, the project's metric) and of persistence.
Installed as the console script ``dchag-forecast-era5`` with the same flags.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_dchag.config import ConfigError

FORMATS = {".zarr": "zarr", ".nc": "netcdf", ".nc4": "netcdf", ".netcdf": "netcdf"}
LEAD_DIM = "prediction_timedelta"
COORDINATE_ATTRS = {
    "time": dict(long_name="initial time of the forecast", standard_name="forecast_reference_time"),
    LEAD_DIM: dict(long_name="lead time of the forecast", standard_name="forecast_period"),
    "level": dict(units="hPa", long_name="pressure level", standard_name="air_pressure", positive="down"),
    "latitude": dict(units="degrees_north", long_name="latitude", standard_name="latitude", axis="Y"),
    "longitude": dict(units="degrees_east", long_name="longitude", standard_name="longitude", axis="X"),
}


# ----------------------------------------------------------------------------------------------
# Arguments, checked before any compute
# ----------------------------------------------------------------------------------------------


@dataclass
class ForecastRequest:
    """What to forecast, checked: the output, its format, initial times and leads."""

    out: Path
    file_format: str
    init_times: np.ndarray  # datetime64[s]
    leads: List[int]


def _parse_time(text: str, flag: str) -> np.datetime64:
    try:
        return np.datetime64(text, "s")
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a time (write e.g. 2020-01-01T00)") from None


def parse_request(args) -> ForecastRequest:
    """The output, initial times and leads of the command line; a :class:`ConfigError` naming
    the flag on bad input."""
    out = Path(args.out)
    file_format = FORMATS.get(out.suffix.lower())
    if file_format is None:
        raise ConfigError(f"--out {args.out}: the suffix chooses the format: {', '.join(sorted(FORMATS))}")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise ConfigError(f"--out {args.out} exists; pass --overwrite to replace it")
    ranged = [args.init_start, args.init_end, args.init_step_hours]
    if args.init_times and any(v is not None for v in ranged):
        raise ConfigError("--init-times and --init-start/--init-end/--init-step-hours exclude each other")
    if args.init_times:
        times = [_parse_time(t, "--init-times") for t in args.init_times]
    elif args.init_start is not None and args.init_end is not None:
        start, end = _parse_time(args.init_start, "--init-start"), _parse_time(args.init_end, "--init-end")
        step = 24 if args.init_step_hours is None else args.init_step_hours
        if step <= 0:
            raise ConfigError(f"--init-step-hours {step}: must be positive")
        if end < start:
            raise ConfigError(f"--init-end {args.init_end} is before --init-start {args.init_start}")
        times = list(np.arange(start, end + np.timedelta64(1, "s"), np.timedelta64(step * 3600, "s")))
    else:
        raise ConfigError("give the initial times: --init-times T [T ...] or --init-start T0 --init-end T1 "
                          "[--init-step-hours H]")
    init_times = np.array(sorted(set(times)), dtype="datetime64[s]")
    if len(init_times) != len(times):
        raise ConfigError("--init-times: a time is given twice")
    if not args.leads or any(h <= 0 for h in args.leads):
        raise ConfigError(f"--leads {args.leads}: give positive lead times in hours")
    if len(set(args.leads)) != len(args.leads):
        raise ConfigError(f"--leads {args.leads}: a lead is given twice")
    return ForecastRequest(out, file_format, init_times, [int(h) for h in args.leads])


def select_variables(requested: Optional[Sequence[str]], outputs: Sequence[str]) -> List[str]:
    """Output channels to write: channel names (``z_500``, ``t2m``) or WeatherBench 2 variable
    names (``geopotential``: every level the model predicts); default every predicted field that
    is not constant."""
    from megatron_dchag.data.era5.naming import VARIABLES, parse_channel, resolve_variable

    if not requested:
        return [c for c in outputs if not parse_channel(c).is_constant]
    chosen: List[str] = []
    for text in requested:
        variable = resolve_variable(text)
        if variable is not None and VARIABLES[variable].kind == "pressure":
            names = [c for c in outputs if parse_channel(c).variable == variable]
        else:
            try:
                names = [parse_channel(text).name]
            except ValueError as exc:
                raise ConfigError(f"--variables {text}: {exc}") from None
        missing = [n for n in names if n not in outputs]
        if not names or missing:
            raise ConfigError(f"--variables {text}: not predicted by this model (its outputs: "
                              f"{', '.join(list(outputs)[:10])}{', ...' if len(outputs) > 10 else ''})")
        chosen += [n for n in names if n not in chosen]
    return [c for c in outputs if c in chosen]  # in the model's order


# ----------------------------------------------------------------------------------------------
# Inputs of one rank
# ----------------------------------------------------------------------------------------------


class RankInputs:
    """Reads this rank's input channels at given times from the store, normalized as in training,
    and denormalizes this rank's predictions. ``affine(names) -> (mean, std)``: float32
    ``[c, 1, 1]`` each, as the training dataset applies them (``(x - mean) / std``)."""

    def __init__(self, ds, affine, inputs: Sequence[str], outputs: Sequence[str], source: str):
        import torch

        from megatron_dchag.data.era5.store import ChannelReader

        self.reader = ChannelReader(ds, list(inputs), source)
        (in_mean, in_std), (out_mean, out_std) = affine(list(inputs)), affine(list(outputs))
        self.in_mean, self.in_std = torch.from_numpy(in_mean), torch.from_numpy(in_std)
        self.out_mean, self.out_std = torch.from_numpy(out_mean).double(), torch.from_numpy(out_std).double()

    def read(self, time_indices: Sequence[int]):
        import torch

        x = torch.from_numpy(np.stack([self.reader.read(int(i)) for i in time_indices]))
        return (x - self.in_mean) / self.in_std

    def denormalize(self, prediction):
        return (prediction.double().cpu() * self.out_std + self.out_mean).float()


def normalization_of(ckpt: str, stats_file: Optional[str], run_stats_file: Optional[str]):
    """``(affine, what)``: the normalization of ``--stats-file`` when given, else the checkpoint's
    own record (``normalization.json``), else the run's ``data.stats_file``."""
    from megatron_dchag.data.era5.statistics import load_era5_stats

    if stats_file is None:
        try:
            from megatron_dchag.data.normalization import Normalization
            from megatron_dchag.training.checkpointing import read_checkpoint_normalization
        except ImportError:  # a checkpoint API without normalization records
            read_checkpoint_normalization = None
        record = read_checkpoint_normalization(ckpt) if read_checkpoint_normalization is not None else None
        if record is not None:
            where = os.path.join(ckpt, "normalization.json")
            normalization = Normalization.from_json(record, where)
            if normalization.kind == "era5":
                return normalization.era5_affine, where
        stats_file = run_stats_file
    if stats_file is None:
        raise ConfigError("the checkpoint records no statistics file and has no normalization record; give --stats-file")
    try:
        stats = load_era5_stats(stats_file)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--stats-file {stats_file}: {exc}") from None

    def affine(names):
        selected = stats.select(list(names), f"statistics file {stats_file}")
        std = np.where(selected.std > 0, selected.std, 1.0)
        return selected.mean.astype(np.float32)[:, None, None], std.astype(np.float32)[:, None, None]

    return affine, str(stats_file)


# ----------------------------------------------------------------------------------------------
# The forecast
# ----------------------------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def forecast(args) -> Optional[Dict[str, Any]]:
    """Runs the forecasts on every rank; rank 0 returns the assembled result (``None`` elsewhere)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dchag.data.era5.leads import train_lead_hours
    from megatron_dchag.data.era5.naming import LAT_DIM, LON_DIM, parse_channel
    from megatron_dchag.data.era5.store import format_time, open_era5
    from megatron_dchag.distributed import destroy_distributed, initialize_distributed
    from megatron_dchag.launch_env import resolve_launch_env
    from megatron_dchag.models.forecast import forecast_channels
    from megatron_dchag.models.rollout import Rollout, RolloutError, plan_leads, rollout_blockers
    from megatron_dchag.tasks.forecasting import ERA5ForecastTask
    from megatron_dchag.training.builder import build_single_model
    from megatron_dchag.training.checkpoint_conversion import config_for_layout, saved_checkpoint_config
    from megatron_dchag.training.checkpointing import (
        load_checkpoint)

    request = parse_request(args)
    ckpt, saved = saved_checkpoint_config(args.load)
    tp = args.tensor_model_parallel_size
    world = resolve_launch_env().world_size
    if tp < 1 or world % tp:
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the world size {world}")
    cfg = config_for_layout(saved, tp, 1, task="era5_forecast")
    cfg.training.bf16 = False
    fc = cfg.forecast
    channels = forecast_channels(cfg)
    variables = select_variables(args.variables, channels.outputs)
    trained = train_lead_hours(fc.max_lead_hours, fc.lead_step_hours, fc.min_lead_hours)
    try:
        plans = plan_leads(request.leads, trained, args.rollout_step_hours)
    except RolloutError as exc:
        raise ConfigError(f"--leads: {exc}") from None
    blockers = rollout_blockers(channels.inputs, channels.outputs)
    rolled = [p.lead_hours for p in plans if not p.direct]
    if rolled and blockers:
        raise ConfigError(
            f"--leads {' '.join(map(str, rolled))}: a rollout feeds the model's output back as its input, but this model "
            f"does not predict its inputs {blockers[:6]}{' ...' if len(blockers) > 6 else ''} (forecast.output_channels); "
            f"ask only for the leads it was trained for ({', '.join(map(str, trained))} h)")
    data_path = args.data_path or cfg.data.data_path
    try:
        ds = open_era5(data_path, ensemble_member=cfg.data.ensemble_member)
    except (ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ConfigError(f"--data-path {data_path}: {message}") from None
    grid = (ds.sizes.get(LAT_DIM, 0), ds.sizes.get(LON_DIM, 0))
    if tuple(cfg.model.image_size) != grid:
        raise ConfigError(f"--data-path {data_path}: the grid {grid[0]}x{grid[1]} is not the model's "
                          f"{cfg.model.image_size[0]}x{cfg.model.image_size[1]} (model.image_size)")
    store_times = ds["time"].values.astype("datetime64[s]")
    position = {t: i for i, t in enumerate(store_times.astype(np.int64))}
    absent = [format_time(t) for t in request.init_times if int(t.astype(np.int64)) not in position]
    if absent:
        raise ConfigError(f"initial times {absent[:4]}{' ...' if len(absent) > 4 else ''} are not times of "
                          f"{data_path} ({format_time(store_times[0])} .. {format_time(store_times[-1])}, "
                          f"{len(store_times)} steps)")
    init_index = [position[int(t.astype(np.int64))] for t in request.init_times]
    affine, normalization = normalization_of(ckpt, args.stats_file, cfg.data.stats_file)

    initialize_distributed(tp, 1, seed=cfg.training.seed)
    try:
        task = ERA5ForecastTask(cfg)
        task.latitudes = ds[LAT_DIM].values.astype(np.float64)
        model = build_single_model(cfg, task)
        iteration = load_checkpoint(args.load, [model], load_rng=False).iteration
        model.eval()
        in_lo, in_hi = model.input_channel_range
        local_inputs = list(channels.inputs[in_lo:in_hi])
        local_outputs = model.output_channel_names
        try:
            inputs = RankInputs(ds, affine, local_inputs, local_outputs, str(data_path))
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}") from None
        uses_time = bool(getattr(model, "uses_time_features", False))

        def step(x, lead_hours, input_time_s):
            lead = torch.full((x.shape[0],), float(lead_hours))
            extra = {"input_time_s": input_time_s} if uses_time else {}
            return model(x, lead_time_hours=lead, **extra).prediction

        constant = [i for i, name in enumerate(local_inputs) if parse_channel(name).is_constant]
        rollout = Rollout(step, model.output_input_index.tolist(), constant, len(local_inputs))
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        mine = np.array_split(np.arange(len(init_index)), dp_size)[dp_rank]
        local: Dict[int, np.ndarray] = {}
        for start in range(0, len(mine), args.batch_size):
            rows = mine[start:start + args.batch_size]
            x = inputs.read([init_index[r] for r in rows])
            times = torch.as_tensor([int(request.init_times[r].astype(np.int64)) for r in rows], dtype=torch.int64)
            predictions = rollout.run(x, times, plans)
            stacked = torch.stack([inputs.denormalize(predictions[p.lead_hours]) for p in plans], dim=1)  # [B, P, C, H, W]
            for r, values in zip(rows.tolist(), stacked.numpy()):
                local[r] = values
        parts: Optional[List[Any]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((model.output_channel_range, local), parts, dst=0)
        if dist.get_rank() != 0:
            return None
        h, w = grid
        values = np.full((len(init_index), len(plans), len(channels.outputs), h, w), np.nan, dtype=np.float32)
        for (lo, hi), rows in parts:
            for r, v in rows.items():
                values[r, :, lo:hi] = v
        assert np.isfinite(values).all(), "a forecast was not gathered"
        return dict(
            values=values, outputs=list(channels.outputs), variables=variables, plans=plans, request=request,
            latitudes=ds[LAT_DIM].values, longitudes=ds["longitude"].values, checkpoint=ckpt, iteration=iteration,
            data_path=str(data_path), normalization=normalization, latitude_weighting=fc.latitude_weighting,
            trained=trained, ensemble_member=cfg.data.ensemble_member,
        )
    finally:
        destroy_distributed()


# ----------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------


def forecast_dataset(result: Dict[str, Any]):
    """The WeatherBench 2 dataset of an assembled result (see the module docstring)."""
    import xarray as xr

    from megatron_dchag.data.era5.naming import VARIABLES, parse_channel

    values, outputs, plans = result["values"], result["outputs"], result["plans"]
    specs = [parse_channel(c) for c in result["variables"]]
    levels = sorted({s.level for s in specs if s.level is not None})
    coords: Dict[str, Any] = {
        "time": ("time", result["request"].init_times.astype("datetime64[ns]")),
        LEAD_DIM: (LEAD_DIM, np.array([p.lead_hours for p in plans], dtype="timedelta64[h]").astype("timedelta64[ns]")),
        "latitude": ("latitude", np.asarray(result["latitudes"], dtype=np.float64)),
        "longitude": ("longitude", np.asarray(result["longitudes"], dtype=np.float64)),
    }
    if levels:
        coords["level"] = ("level", np.array(levels, dtype=np.int64 if all(float(v).is_integer() for v in levels) else np.float64))
    data_vars: Dict[str, Any] = {}
    for variable in dict.fromkeys(s.variable for s in specs):
        info = VARIABLES[variable]
        mine = [s for s in specs if s.variable == variable]
        if info.kind == "pressure":
            field = np.full(values.shape[:2] + (len(levels),) + values.shape[3:], np.nan, dtype=np.float32)
            for s in mine:
                field[:, :, levels.index(s.level)] = values[:, :, outputs.index(s.name)]
            dims: Tuple[str, ...] = ("time", LEAD_DIM, "level", "latitude", "longitude")
        else:
            field = values[:, :, outputs.index(mine[0].name)]
            dims = ("time", LEAD_DIM, "latitude", "longitude")
        attrs = {"units": info.units, "long_name": info.long_names[0] if info.long_names else variable.replace("_", " ")}
        if info.standard_name:
            attrs["standard_name"] = info.standard_name
        data_vars[variable] = (dims, field, attrs)
    ds = xr.Dataset(data_vars, coords=coords)
    for name, attrs in COORDINATE_ATTRS.items():
        if name in ds.coords:
            ds[name].attrs.update(attrs)
    direct = [p.lead_hours for p in plans if p.direct]
    rolled = [p.lead_hours for p in plans if not p.direct]
    ds.attrs.update(
        title="D-CHAG forecast (megatron_dchag)",
        Conventions="CF-1.8",
        source=f"checkpoint {result['checkpoint']} (iteration {result['iteration']})",
        initial_conditions=f"{result['data_path']} (normalized with {result['normalization']})",
        trained_lead_hours=", ".join(map(str, result["trained"])),
        direct_lead_hours=", ".join(map(str, direct)) or "none",
        rollout_lead_hours=", ".join(map(str, rolled)) or "none",
        lead_method="; ".join(p.describe() for p in plans),
        rollout="rollouts feed the model's own output back as its next input; constant fields come from the data",
        latitude_weighting=result["latitude_weighting"],
    )
    return ds


def write_forecast(ds, out: Path, file_format: str, overwrite: bool, zarr_format: int = 2) -> None:
    """Write ``ds`` to ``out`` under a temporary name in the same directory, then rename it into place."""
    from megatron_dchag.data.era5.zarr_io import check_zarr_format

    out = out.absolute()
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        if file_format == "zarr":
            encoding = {name: {"chunks": (1, 1) + ds[name].shape[2:]} for name in ds.data_vars}
            ds.to_zarr(tmp, mode="w", encoding=encoding, zarr_format=check_zarr_format(zarr_format),
                       consolidated=zarr_format == 2)
        else:
            ds.to_netcdf(tmp, encoding={name: {"zlib": True, "complevel": 1} for name in ds.data_vars})
        if out.is_dir():  # an old store: moved aside, removed once the new one is in place
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------------------
# Scoring against the store
# ----------------------------------------------------------------------------------------------


def open_forecast(path: os.PathLike):
    """A forecast file written by this tool, opened with xarray (zarr or netCDF by the suffix)."""
    import xarray as xr

    path = Path(path)
    if FORMATS.get(path.suffix.lower()) == "zarr":
        return xr.open_zarr(path, consolidated=None)
    return xr.open_dataset(path)


def forecast_channels_of(fc_ds) -> List[Tuple[str, str, Optional[float]]]:
    """``(channel name, variable, level)`` of every field of a forecast dataset."""
    from megatron_dchag.data.era5.naming import channel_name

    found = []
    for variable in fc_ds.data_vars:
        if "level" in fc_ds[variable].dims:
            found += [(channel_name(variable, float(lv)), variable, lv.item()) for lv in fc_ds["level"].values]
        else:
            found.append((channel_name(variable), variable, None))
    return found


def score_forecast_file(path: os.PathLike, data_path, latitude_weighting: Optional[str] = None,
                        ensemble_member=None) -> Dict[Tuple[str, int], Dict[str, float]]:
    """Latitude-weighted RMSE (:mod:`megatron_dchag.metrics`: per forecast, then the mean over
    initial times) of every field and lead of a forecast file against the store, and of persistence.

    ``{(channel, lead_hours): {"rmse", "persistence_rmse", "num_forecasts"}}``; forecasts whose
    valid time the store does not have are left out, and so are the levels a variable has no
    values on (NaN: another variable was written on them). ``latitude_weighting``: default the file's.
    """
    from megatron_dchag.data.era5.store import ChannelReader, open_era5
    from megatron_dchag.metrics import latitude_weights, weighted_rmse

    fc_ds = open_forecast(path)
    store = open_era5(data_path, ensemble_member=ensemble_member)
    kind = latitude_weighting or fc_ds.attrs.get("latitude_weighting", "cos")
    weights = latitude_weights(store["latitude"].values.astype(np.float64), kind)
    if not np.allclose(store["latitude"].values, fc_ds["latitude"].values) or \
            not np.allclose(store["longitude"].values, fc_ds["longitude"].values):
        raise ConfigError(f"{path}: its grid is not the grid of {data_path}")
    fields = forecast_channels_of(fc_ds)
    reader = ChannelReader(store, [name for name, _, _ in fields], str(data_path))
    times_s = store["time"].values.astype("datetime64[s]").astype(np.int64)
    position = {t: i for i, t in enumerate(times_s)}
    init_s = fc_ds["time"].values.astype("datetime64[s]").astype(np.int64)
    leads_h = (fc_ds[LEAD_DIM].values / np.timedelta64(1, "h")).astype(np.int64)
    scores: Dict[Tuple[str, int], Dict[str, float]] = {}
    for j, lead in enumerate(leads_h):
        rows = [i for i, t in enumerate(init_s) if t + lead * 3600 in position and t in position]
        if not rows:
            continue
        truth = reader.read(np.array([position[init_s[i] + lead * 3600] for i in rows])).astype(np.float64)
        initial = reader.read(np.array([position[init_s[i]] for i in rows])).astype(np.float64)
        for c, (name, variable, level) in enumerate(fields):
            sel = {"prediction_timedelta": j, "time": rows}
            if level is not None:
                sel["level"] = list(fc_ds["level"].values).index(level)
            pred = fc_ds[variable].isel(sel).values.astype(np.float64)
            if np.isnan(pred).all():  # a level this variable was not forecast on (others were)
                continue
            scores[(name, int(lead))] = dict(
                rmse=float(weighted_rmse(pred, truth[:, c], weights)),
                persistence_rmse=float(weighted_rmse(initial[:, c], truth[:, c], weights)),
                num_forecasts=len(rows),
            )
    return scores


def score_table(scores: Dict[Tuple[str, int], Dict[str, float]], lead_method: Dict[int, str]) -> str:
    """A markdown table of :func:`score_forecast_file`'s scores."""
    lines = ["| variable | lead | method | forecasts | RMSE | persistence RMSE | skill vs persistence |",
             "|---|---:|---|---:|---:|---:|---:|"]
    order = list(dict.fromkeys(name for name, _ in scores))  # the file's order of fields
    for (name, lead), s in sorted(scores.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        skill = 1.0 - s["rmse"] / s["persistence_rmse"] if s["persistence_rmse"] else float("nan")
        lines.append(f"| {name} | {lead}h | {lead_method.get(lead, '?')} | {s['num_forecasts']} | {s['rmse']:.4g} | "
                     f"{s['persistence_rmse']:.4g} | {skill:.3f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="forecasting checkpoint (save directory or iter_* directory)")
    parser.add_argument("--out", required=True, help="output: NAME.zarr or NAME.nc")
    parser.add_argument("--init-times", nargs="+", default=None, metavar="T", help="initial times, e.g. 2020-01-01T00")
    parser.add_argument("--init-start", default=None, metavar="T0", help="first initial time of a range")
    parser.add_argument("--init-end", default=None, metavar="T1", help="last initial time of a range (inclusive)")
    parser.add_argument("--init-step-hours", type=int, default=None, metavar="H", help="step of the range (default 24)")
    parser.add_argument("--leads", nargs="+", type=int, required=True, metavar="HOURS", help="lead times in hours")
    parser.add_argument("--rollout-step-hours", type=int, default=None, metavar="H",
                        help="step of the rollouts (a trained lead; default: the longest trained lead dividing each lead)")
    parser.add_argument("--variables", nargs="+", default=None,
                        help="channels (z_500, t2m) or WeatherBench 2 variables (geopotential); default all non-constant outputs")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size (divides G and the world size)")
    parser.add_argument("--batch-size", type=int, default=4, help="initial times per model call")
    parser.add_argument("--data-path", default=None, help="ERA5 store of the initial conditions (default: the run's)")
    parser.add_argument("--stats-file", default=None, help="normalization statistics (default: the run's)")
    parser.add_argument("--zarr-format", type=int, choices=(2, 3), default=2)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--score", action="store_true", help="print the RMSE against the store after writing")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_dchag.training.entry_point import report_user_error, user_errors

    quiet = _rank() != 0  # every rank meets the same error; one line is printed
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
        result = forecast(args)
        if result is None:
            return 0
        request = result["request"]
        write_forecast(forecast_dataset(result), request.out, request.file_format, args.overwrite, args.zarr_format)
    except (ValueError, KeyError, *user_errors()) as exc:
        if quiet:
            from megatron_dchag.training.entry_point import EXIT_BAD_INPUT

            return EXIT_BAD_INPUT
        return report_user_error(exc)
    plans = result["plans"]
    print(f"wrote {request.out}: {len(request.init_times)} initial times x {len(plans)} leads "
          f"({'; '.join(p.describe() for p in plans)}), {len(result['variables'])} channels", flush=True)
    if args.score:
        scores = score_forecast_file(request.out, result["data_path"], ensemble_member=result["ensemble_member"])
        print(score_table(scores, {p.lead_hours: ("direct" if p.direct else f"{p.num_steps} x {p.step_hours}h")
                                   for p in plans}), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-channel normalization statistics and climatology of ERA5 data, streamed over time.

Writes (``.npz`` or ``.nc`` by the suffix of ``--out``, atomically):

* ``channels``: the channel names (``z_500``, ``t2m``, ...);
* ``mean``, ``std`` ``[C]``: over all (time, latitude, longitude) values, unweighted, in float64
  (chunks combined with Chan et al.'s parallel update, so streaming loses no precision);
  ``std`` is the population standard deviation (``ddof=0``);
* ``climatology`` ``[C, H, W]``: the time mean at every grid point;
* ``climatology_doy`` ``[366, C, H, W]``: the mean over all times with the same day of year
  (index ``dayofyear - 1``), written when the data spans more than one year (or with
  ``--day-of-year on``); ``--doy-window N`` smooths it with a centred circular N-day moving
  average (WeatherBench 2 uses 61 days). Day 366 is filled from day 365 when no leap day exists;
* ``latitude``, ``longitude`` (latitude ascending), and ``attr_*`` entries: the time range the
  statistics cover (``time_start``, ``time_end``, ``num_times``), which part of the data that is
  (``time_selection``: ``train`` with its ``val_fraction``, ``time_range`` or ``all``), the
  smoothing window and the source.

**Which times.** By default only the **train split**: the first ``1 - val_fraction`` of the
time steps, the same rule as the run's split (:mod:`megatron_dchag.data.era5.splits`), so the
climatology behind ACC and the climatology reference never saw a validation time. The split
comes from the run's config (``--config FILE`` plus dotted overrides such as
``data.val_fraction=0.2``, exactly as given to ``pretrain_era5.py``), from ``--val-fraction``,
or from the default ``data.val_fraction`` (0.1). ``--time-range START END`` or ``--all-times``
choose other times; a warning line says when they include validation times (and
``pretrain_era5.py`` warns again when it is given such a file).

Only ``--time-chunk`` time steps are in memory at once. Constant channels (lsm, orography)
are included (their mean/std are spatial).

Usage::

    python tools/compute_era5_stats.py --data-path data/era5.zarr --out data/stats.npz \\
        [--config configs/era5/tiny.yaml data.val_fraction=0.2 ...] [--val-fraction 0.2] \\
        [--channels z_500 t_850 ...] [--time-range 1979-01-01 2015-12-31 | --all-times] \\
        [--ensemble-member 0|mean] [--time-chunk 64] [--day-of-year auto|on|off] [--doy-window 1]

(installed as the console script ``dchag-compute-era5-stats`` with the same flags).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from megatron_dchag.config import ConfigError, DataConfig, load_config
from megatron_dchag.data.era5.canonical import EnsembleMember
from megatron_dchag.data.era5.naming import LAT_DIM, LON_DIM, TIME_DIM, parse_channels
from megatron_dchag.data.era5.splits import split_window
from megatron_dchag.data.era5.statistics import ERA5Stats, save_era5_stats, validation_overlap
from megatron_dchag.data.era5.store import ChannelReader, available_channels, open_era5


def _time_slice(times: np.ndarray, time_range: Optional[Tuple[str, str]]) -> slice:
    if time_range is None:
        return slice(0, len(times))
    index = pd.DatetimeIndex(times)
    if pd.Timestamp(time_range[0]) < index[0] or pd.Timestamp(time_range[1]) > index[-1]:
        raise ValueError(
            f"--time-range {time_range[0]} {time_range[1]} is not within the data "
            f"({index[0]} .. {index[-1]}, {len(index)} steps)"
        )
    sl = index.slice_indexer(time_range[0], time_range[1])
    lo, hi = int(sl.start or 0), int(sl.stop if sl.stop is not None else len(times))
    if hi <= lo:
        raise ValueError(f"--time-range {time_range[0]} {time_range[1]} selects no time steps")
    return slice(lo, hi)


def _circular_smooth(doy_mean: np.ndarray, window: int) -> np.ndarray:
    """Centred circular moving average of ``[366, ...]`` over ``window`` days."""
    if window <= 1:
        return doy_mean
    half = window // 2
    stacked = np.concatenate([doy_mean[-half:], doy_mean, doy_mean[:half]], axis=0)
    csum = np.cumsum(stacked, axis=0, dtype=np.float64)
    csum = np.concatenate([np.zeros_like(csum[:1]), csum], axis=0)
    return ((csum[window:] - csum[:-window]) / window)[: doy_mean.shape[0]]


def compute_era5_stats(
    data_path: Any,
    channels: Optional[Sequence[str]] = None,
    time_range: Optional[Tuple[str, str]] = None,
    time_chunk: int = 64,
    day_of_year: str = "auto",
    doy_window: int = 1,
    log: Any = print,
    val_fraction: Optional[float] = None,
    ensemble_member: EnsembleMember = None,
) -> ERA5Stats:
    """Stream over the data once and return the statistics (see the module docstring).

    Times: ``time_range`` when given; else the train split of ``val_fraction`` (the first
    ``1 - val_fraction`` of the steps); ``val_fraction=None`` with no ``time_range``: all times.
    """
    ds = open_era5(data_path, ensemble_member=ensemble_member)
    names = [s.name for s in parse_channels(channels)] if channels else available_channels(ds)
    reader = ChannelReader(ds, names, str(data_path))
    if TIME_DIM not in ds.coords:
        raise ValueError(f"{data_path}: no time axis; statistics need time-varying data")
    times_all = ds[TIME_DIM].values
    if time_range is not None:
        sl, selection = _time_slice(times_all, time_range), "time_range"
    elif val_fraction is not None:
        lo, hi = split_window(0, len(times_all), "train", val_fraction)
        if hi - lo < 1:
            raise ValueError(f"{data_path}: the train split of val_fraction={val_fraction} holds no time steps")
        sl, selection = slice(lo, hi), "train"
    else:
        sl, selection = slice(0, len(times_all)), "all"
    times = times_all[sl]
    span_days = (times[-1] - times[0]) / np.timedelta64(1, "D")
    if day_of_year not in ("auto", "on", "off"):
        raise ValueError(f"day_of_year must be auto|on|off, got {day_of_year!r}")
    with_doy = day_of_year == "on" or (day_of_year == "auto" and span_days > 365.0)

    c, h, w = len(names), ds.sizes[LAT_DIM], ds.sizes[LON_DIM]
    count = 0  # number of time steps seen
    mean = np.zeros(c)
    m2 = np.zeros(c)
    time_sum = np.zeros((c, h, w))
    doy_sum = np.zeros((366, c, h, w)) if with_doy else None
    doy_count = np.zeros(366, dtype=np.int64)
    doy_index = pd.DatetimeIndex(times).day_of_year.to_numpy() - 1
    t0 = time.perf_counter()
    for start in range(0, len(times), time_chunk):
        stop = min(start + time_chunk, len(times))
        block = reader.read(slice(sl.start + start, sl.start + stop)).astype(np.float64)  # [T, C, H, W]
        n_b = block.shape[0] * h * w
        b_mean = block.mean(axis=(0, 2, 3))
        b_m2 = ((block - b_mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))
        n_a = count * h * w
        delta = b_mean - mean
        total = n_a + n_b
        mean = mean + delta * n_b / total
        m2 = m2 + b_m2 + delta**2 * n_a * n_b / total
        count += block.shape[0]
        time_sum += block.sum(axis=0)
        if doy_sum is not None:
            d = doy_index[start:stop]
            for day in np.unique(d):
                doy_sum[day] += block[d == day].sum(axis=0)
        np.add.at(doy_count, doy_index[start:stop], 1)
        log(f"  {stop}/{len(times)} time steps ({time.perf_counter() - t0:.1f}s)")

    std = np.sqrt(m2 / (count * h * w))
    climatology = (time_sum / count).astype(np.float32)
    clim_doy = None
    if doy_sum is not None:
        seen = doy_count > 0
        doy_mean = np.zeros_like(doy_sum)
        doy_mean[seen] = doy_sum[seen] / doy_count[seen][:, None, None, None]
        if not seen[365] and seen[364]:
            doy_mean[365] = doy_mean[364]
            seen[365] = True
        missing = np.flatnonzero(~seen)
        if missing.size:  # fill any gaps from the nearest seen day (circularly)
            seen_idx = np.flatnonzero(seen)
            for day in missing:
                dist = np.minimum(np.abs(seen_idx - day), 366 - np.abs(seen_idx - day))
                doy_mean[day] = doy_mean[seen_idx[np.argmin(dist)]]
        clim_doy = _circular_smooth(doy_mean, doy_window).astype(np.float32)
    attrs = {
        "time_start": str(np.datetime_as_string(times[0], unit="s")),
        "time_end": str(np.datetime_as_string(times[-1], unit="s")),
        "num_times": int(count),
        "time_selection": selection,
        "doy_window": int(doy_window),
        "source": str(data_path),
    }
    if selection == "train":
        attrs["val_fraction"] = float(val_fraction)  # type: ignore[arg-type]
    return ERA5Stats(
        channels=names,
        mean=mean,
        std=std,
        climatology=climatology,
        climatology_doy=clim_doy,
        latitude=ds[LAT_DIM].values.astype(np.float64),
        longitude=ds[LON_DIM].values.astype(np.float64),
        attrs=attrs,
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line and exit status 2, no usage dump
        raise ConfigError(message)


def _run_settings(args: argparse.Namespace) -> Tuple[Any, Optional[List[str]], float, EnsembleMember]:
    """``(data path, channels, val_fraction, ensemble member)`` from the flags, else the run's
    config (``--config`` and overrides), else the defaults."""
    cfg = load_config(args.config, args.overrides, workload_sections=("forecast",)) if (
        args.config or args.overrides) else None
    data: Any = args.data_path or (cfg.data.data_path if cfg is not None and cfg.data.data_path else None)
    if not data:
        raise ConfigError("--data-path is not given (and --config sets no data.data_path)")
    if isinstance(data, list):
        data = data[0] if len(data) == 1 else data
    channels = args.channels or (cfg.data.channels if cfg is not None else None)
    if args.val_fraction is not None:
        val_fraction = args.val_fraction
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"--val-fraction={val_fraction} must be in (0, 1)")
    else:
        val_fraction = (cfg.data if cfg is not None else DataConfig()).val_fraction
    member = args.ensemble_member if args.ensemble_member is not None else (
        cfg.data.ensemble_member if cfg is not None else None)
    return data, channels, val_fraction, member


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _Parser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="zarr store(s), netCDF file(s), directories or globs (default: data.data_path of --config)")
    parser.add_argument("--out", required=True, help="output .npz or .nc file")
    parser.add_argument("--config", default=None, help="the run's YAML config (its data section sets the split)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of --config, e.g. data.val_fraction=0.2")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="validation fraction of the run (default: data.val_fraction of --config, else 0.1); "
                             "statistics cover the train split")
    parser.add_argument("--channels", nargs="+", default=None,
                        help="channel names (default: data.channels of --config, else every channel in the data)")
    times = parser.add_mutually_exclusive_group()
    times.add_argument("--time-range", nargs=2, metavar=("START", "END"), default=None,
                       help="cover these times instead of the train split")
    times.add_argument("--all-times", action="store_true", help="cover every time step, validation included")
    parser.add_argument("--ensemble-member", default=None, help="for ensemble data: a member index or 'mean'")
    parser.add_argument("--time-chunk", type=int, default=64)
    parser.add_argument("--day-of-year", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--doy-window", type=int, default=1, help="days in the circular smoothing window of the day-of-year climatology")
    try:
        args = parser.parse_intermixed_args(argv)
        data, channels, val_fraction, member = _run_settings(args)
        time_range = tuple(args.time_range) if args.time_range else None
        stats = compute_era5_stats(data, channels, time_range, args.time_chunk, args.day_of_year, args.doy_window,
                                   val_fraction=None if (args.all_times or time_range) else val_fraction,
                                   ensemble_member=member)
        overlap = validation_overlap(stats, open_era5(data, ensemble_member=member)["time"].values, val_fraction)
        save_era5_stats(args.out, stats)
    except (ValueError, KeyError, FileNotFoundError, ConfigError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"compute_era5_stats: error: {message}", file=sys.stderr)
        return 2
    if overlap:
        print(f"compute_era5_stats: warning: {overlap}", file=sys.stderr)
    covered = "the train split" if stats.attrs["time_selection"] == "train" else (
        "--time-range" if stats.attrs["time_selection"] == "time_range" else "every time step")
    print(f"wrote {args.out}: {len(stats.channels)} channels, {stats.attrs['num_times']} time steps "
          f"({covered}: {stats.attrs['time_start']} .. {stats.attrs['time_end']}), "
          f"day-of-year climatology: {'yes' if stats.climatology_doy is not None else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
* ``latitude``, ``longitude`` (latitude ascending), and ``attr_*`` entries (time range, count).

Only ``--time-chunk`` time steps are in memory at once. Constant channels (lsm, orography)
are included (their mean/std are spatial).

Usage::

    python tools/compute_era5_stats.py --data-path data/era5.zarr --out data/stats.npz \\
        [--channels z_500 t_850 ...] [--time-range 1979-01-01 2015-12-31] [--time-chunk 64] \\
        [--day-of-year auto|on|off] [--doy-window 1]

(installed as the console script ``dchag-compute-era5-stats`` with the same flags).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from megatron_dchag.data.era5.naming import LAT_DIM, LON_DIM, TIME_DIM, parse_channels
from megatron_dchag.data.era5.statistics import ERA5Stats, save_era5_stats
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
) -> ERA5Stats:
    """Stream over the data once and return the statistics (see the module docstring)."""
    ds = open_era5(data_path)
    names = [s.name for s in parse_channels(channels)] if channels else available_channels(ds)
    reader = ChannelReader(ds, names, str(data_path))
    if TIME_DIM not in ds.coords:
        raise ValueError(f"{data_path}: no time axis; statistics need time-varying data")
    times_all = ds[TIME_DIM].values
    sl = _time_slice(times_all, time_range)
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
        "doy_window": int(doy_window),
        "source": str(data_path),
    }
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, nargs="+", help="zarr store(s), netCDF file(s), directories or globs")
    parser.add_argument("--out", required=True, help="output .npz or .nc file")
    parser.add_argument("--channels", nargs="+", default=None, help="channel names (default: every channel in the data)")
    parser.add_argument("--time-range", nargs=2, metavar=("START", "END"), default=None)
    parser.add_argument("--time-chunk", type=int, default=64)
    parser.add_argument("--day-of-year", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--doy-window", type=int, default=1, help="days in the circular smoothing window of the day-of-year climatology")
    args = parser.parse_args(argv)
    data = args.data_path[0] if len(args.data_path) == 1 else args.data_path
    try:
        stats = compute_era5_stats(data, args.channels, tuple(args.time_range) if args.time_range else None,
                                   args.time_chunk, args.day_of_year, args.doy_window)
        save_era5_stats(args.out, stats)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"compute_era5_stats: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(stats.channels)} channels, {stats.attrs['num_times']} time steps, "
          f"day-of-year climatology: {'yes' if stats.climatology_doy is not None else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

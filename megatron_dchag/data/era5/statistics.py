"""ERA5 normalization statistics and climatology per channel: the file format, saved and loaded.

:class:`ERA5Stats` holds per-channel mean/std and the climatology; ``tools/compute_era5_stats.py``
computes them, :func:`save_era5_stats` writes them (``.npz`` or ``.nc``, atomically) and
:func:`load_era5_stats` reads them back. A file records the time range it covers
(``attrs["time_start"]``, ``attrs["time_end"]``); :func:`validation_overlap` says when that range
includes validation times of a run, whose ACC would then be scored against a climatology that
saw the validation period.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import xarray as xr

from megatron_dchag.data.era5.naming import LAT_DIM, LON_DIM, parse_channel
from megatron_dchag.data.era5.splits import split_window
from megatron_dchag.data.era5.store import PathLike

__all__ = ["ERA5Stats", "load_era5_stats", "save_era5_stats", "validation_overlap"]


@dataclass
class ERA5Stats:
    """Normalization statistics and climatology, per channel.

    ``mean``/``std`` ``[C]`` over (time, latitude, longitude), unweighted; ``climatology``
    ``[C, H, W]`` time mean; ``climatology_doy`` ``[366, C, H, W]`` day-of-year mean (index
    ``dayofyear - 1``) when the data spanned more than a year. Latitude ascending.
    """

    channels: List[str]
    mean: np.ndarray
    std: np.ndarray
    climatology: Optional[np.ndarray] = None
    climatology_doy: Optional[np.ndarray] = None
    latitude: Optional[np.ndarray] = None
    longitude: Optional[np.ndarray] = None
    attrs: Dict[str, Any] = field(default_factory=dict)

    def index_of(self, channels: Sequence[str], source: str = "stats file") -> List[int]:
        lookup = {c: i for i, c in enumerate(self.channels)}
        names = [parse_channel(c).name for c in channels]
        missing = [c for c in names if c not in lookup]
        if missing:
            raise KeyError(f"{source} has no statistics for channels {missing}; it has {self.channels}")
        return [lookup[c] for c in names]

    def select(self, channels: Sequence[str], source: str = "stats file") -> "ERA5Stats":
        idx = self.index_of(channels, source)
        return ERA5Stats(
            channels=[self.channels[i] for i in idx],
            mean=self.mean[idx],
            std=self.std[idx],
            climatology=None if self.climatology is None else self.climatology[idx],
            climatology_doy=None if self.climatology_doy is None else self.climatology_doy[:, idx],
            latitude=self.latitude,
            longitude=self.longitude,
            attrs=dict(self.attrs),
        )

    def climatology_at(self, times: np.ndarray) -> np.ndarray:
        """Climatology for each time ``[T] (datetime64 or seconds)`` -> ``[T, C, H, W]``.

        Day-of-year climatology when present, else the time mean.
        """
        times = np.asarray(times)
        if np.issubdtype(times.dtype, np.integer):
            times = times.astype("datetime64[s]")
        if self.climatology_doy is not None:
            import pandas as pd

            doy = pd.DatetimeIndex(times.astype("datetime64[ns]")).day_of_year.to_numpy() - 1
            return self.climatology_doy[doy]
        if self.climatology is None:
            raise ValueError("these statistics hold no climatology; recompute them with tools/compute_era5_stats.py")
        return np.broadcast_to(self.climatology, (len(times),) + self.climatology.shape)


def save_era5_stats(path: PathLike, stats: ERA5Stats) -> None:
    """Write ``stats`` to ``.npz`` or ``.nc`` (by suffix), atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".npz":
            arrays: Dict[str, Any] = {
                "channels": np.asarray(stats.channels, dtype=str),
                "mean": stats.mean.astype(np.float64),
                "std": stats.std.astype(np.float64),
            }
            for key in ("climatology", "climatology_doy", "latitude", "longitude"):
                value = getattr(stats, key)
                if value is not None:
                    arrays[key] = value
            for key, value in stats.attrs.items():
                arrays[f"attr_{key}"] = np.asarray(value)
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        elif suffix in (".nc", ".nc4", ".netcdf"):
            data_vars: Dict[str, Any] = {"mean": ("channel", stats.mean), "std": ("channel", stats.std)}
            if stats.climatology is not None:
                data_vars["climatology"] = (("channel", LAT_DIM, LON_DIM), stats.climatology)
            if stats.climatology_doy is not None:
                data_vars["climatology_doy"] = (("dayofyear", "channel", LAT_DIM, LON_DIM), stats.climatology_doy)
            coords: Dict[str, Any] = {"channel": np.asarray(stats.channels, dtype=object)}
            if stats.latitude is not None:
                coords[LAT_DIM] = stats.latitude
            if stats.longitude is not None:
                coords[LON_DIM] = stats.longitude
            if stats.climatology_doy is not None:
                coords["dayofyear"] = np.arange(1, stats.climatology_doy.shape[0] + 1)
            attrs = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in stats.attrs.items()}
            xr.Dataset(data_vars, coords=coords, attrs=attrs).to_netcdf(tmp)
        else:
            raise ValueError(f"statistics file {path}: use a .npz or .nc suffix")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_era5_stats(path: PathLike) -> ERA5Stats:
    """Read statistics written by :func:`save_era5_stats` (``.npz`` or ``.nc``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ERA5 statistics file {path} does not exist; create it with tools/compute_era5_stats.py")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            get = lambda k: z[k] if k in z.files else None  # noqa: E731
            attrs = {k[5:]: z[k].item() if z[k].ndim == 0 else z[k] for k in z.files if k.startswith("attr_")}
            return ERA5Stats(
                channels=[str(c) for c in z["channels"]],
                mean=z["mean"],
                std=z["std"],
                climatology=get("climatology"),
                climatology_doy=get("climatology_doy"),
                latitude=get("latitude"),
                longitude=get("longitude"),
                attrs=attrs,
            )
    with xr.open_dataset(path) as ds:
        ds = ds.load()
        get_v = lambda k: ds[k].values if k in ds.variables else None  # noqa: E731
        return ERA5Stats(
            channels=[str(c) for c in ds["channel"].values],
            mean=ds["mean"].values,
            std=ds["std"].values,
            climatology=get_v("climatology"),
            climatology_doy=get_v("climatology_doy"),
            latitude=get_v(LAT_DIM),
            longitude=get_v(LON_DIM),
            attrs=dict(ds.attrs),
        )



def validation_overlap(stats: ERA5Stats, times: np.ndarray, val_fraction: float) -> Optional[str]:
    """One line when ``stats`` cover validation times of a run whose data has the time axis
    ``times`` and whose split is ``val_fraction``; ``None`` when they do not, or when the file
    does not record its time range."""
    start, end = stats.attrs.get("time_start"), stats.attrs.get("time_end")
    if start is None or end is None or not 0.0 < val_fraction < 1.0:
        return None
    times = np.asarray(times).astype("datetime64[s]")
    lo, hi = split_window(0, len(times), "val", val_fraction)
    val_times = times[lo:hi]
    inside = int(((val_times >= np.datetime64(str(start))) & (val_times <= np.datetime64(str(end)))).sum())
    if not inside:
        return None
    first, last = (str(np.datetime_as_string(t, unit="m")) for t in (val_times[0], val_times[-1]))
    return (f"the statistics and climatology cover {start} .. {end}, which includes {inside} of the {len(val_times)} "
            f"validation times ({first} .. {last}, the last data.val_fraction={val_fraction:g} of the steps), so ACC and "
            "the climatology reference use a climatology that saw the validation period; recompute them over the "
            "train split with compute_era5_stats --config <the run's config>")

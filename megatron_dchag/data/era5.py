"""ERA5 forecasting data on xarray: opening stores, reading channel slices, samples and samplers.

Pieces, from the bottom up:

* :func:`open_era5` opens zarr stores and netCDF files (one path, a directory of files, a glob,
  or a list; e.g. one file per year or per variable) and returns **one lazy** ``xr.Dataset`` in
  the canonical view of :mod:`megatron_dchag.data.era5_variables` (long variable names,
  ``time/level/latitude/longitude``, latitude **south-to-north**). dask is *not* required:
  without ``chunks`` the files are combined by a small lazy concatenation along time
  (:class:`_LazyConcat`), so indexing one time step reads only that step from disk. dask is
  not used by default even when installed, because per-sample random access through dask graphs
  is slower than direct lazy indexing; pass ``chunks={}`` to get dask arrays instead.
* :class:`ChannelReader` validates a channel list against a dataset (clear errors naming what is
  missing and what the data has) and reads ``[C, H, W]`` (or ``[T, C, H, W]``) arrays for any
  time index; constants are broadcast over time.
* :class:`ERA5Stats` / :func:`load_era5_stats` / :func:`save_era5_stats`: per-channel mean/std
  and climatology written by ``tools/compute_era5_stats.py``.
* :class:`ERA5Dataset`: a map-style dataset of ``(input at t, target at t + Δ)`` pairs. A tensor
  -parallel rank loads only its input channels (``channel_range``) and the output channels it
  owns (``output_channel_range``).
* Lead times. Training draws **one Δ per batch**: :func:`sample_lead_hours` is a pure function of
  ``(seed, step)``, and :class:`ERA5TrainBatchSampler` yields batches of ``(time_index, lead)``
  pairs that all share it, identical on every rank for a given step (so TP ranks agree, DP ranks
  agree on Δ, and resuming at ``start_step`` replays exactly). Evaluation uses fixed lead times:
  :class:`ERA5EvalBatchSampler` yields, per lead, batches of the same initial times.

Sample dict (one item; the default collate stacks them into a batch)::

    input            float32 [C_in_local, H, W]    normalized state at t
    target           float32 [C_out_local, H, W]   normalized state at t + Δ
    lead_time_hours  float32 []                    Δ in hours
    time             int64 []                      t, seconds since 1970-01-01 UTC
    target_time      int64 []                      t + Δ, seconds since 1970-01-01 UTC
    time_index       int64 []                      index of t on the data's time axis
    climatology      float32 [C_out_local, H, W]   only with return_climatology=True (physical units)

Row 0 of every ``[H, W]`` field is the southernmost latitude (see :attr:`ERA5Dataset.latitudes`).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from megatron_dchag.data.era5_variables import (
    DEFAULT_ERA5_CHANNELS,
    LAT_DIM,
    LEVEL_DIM,
    LON_DIM,
    TIME_DIM,
    VARIABLES,
    ChannelSpec,
    canonicalize_dataset,
    channel_name,
    parse_channel,
    parse_channels,
)

__all__ = [
    "ERA5DataError",
    "open_era5",
    "available_channels",
    "ChannelReader",
    "ERA5Stats",
    "load_era5_stats",
    "save_era5_stats",
    "train_lead_hours",
    "sample_lead_hours",
    "ERA5Dataset",
    "ERA5TrainBatchSampler",
    "ERA5EvalBatchSampler",
    "HAS_DASK",
]

HAS_DASK = importlib.util.find_spec("dask") is not None

PathLike = Union[str, os.PathLike]
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5")




class ERA5DataError(ValueError):
    """ERA5 data that cannot be read: a truncated or corrupt file or store (the message names it)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and (
        path.suffix == ".zarr"
        or any((path / marker).exists() for marker in ("zarr.json", ".zgroup", ".zmetadata", ".zattrs"))
    )


def _expand_paths(paths: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Expand a path, directory, glob or list of those into concrete zarr stores / netCDF files."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise FileNotFoundError("open_era5: no paths given")
    out: List[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise FileNotFoundError(f"ERA5 data: the pattern {text!r} matches no files")
            out.extend(_expand_paths(matches))
            continue
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"ERA5 data: {text!r} does not exist")
        if _is_zarr_dir(path):
            out.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_zarr_dir(p) or p.suffix.lower() in NETCDF_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"ERA5 data: directory {text!r} holds no zarr stores or netCDF files")
            out.extend(found)
        else:
            out.append(path)
    return out


def _open_one(path: Path, chunks: Optional[Mapping[str, int]], engine: Optional[str]) -> xr.Dataset:
    """Open one zarr store or netCDF file; an unreadable one raises :class:`ERA5DataError` naming it."""
    try:
        if _is_zarr_dir(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=RuntimeWarning)
                warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
                return xr.open_zarr(path, chunks=chunks, consolidated=None)
        return xr.open_dataset(path, engine=engine, chunks=chunks, cache=False)
    except ImportError:
        raise
    except Exception as exc:  # netCDF4/HDF5, zarr and JSON raise many types for a damaged file
        kind = "zarr store" if path.is_dir() else "netCDF file"
        raise ERA5DataError(
            f"ERA5 data: cannot open the {kind} '{path}' (truncated or corrupt file, or not netCDF/zarr): "
            f"{_first_line(exc)}"
        ) from exc


class _LazyConcat(BackendArray):
    """Lazy concatenation of several (lazy) ``xr.Variable`` pieces along one axis.

    Used to join one-file-per-year (or per-level) archives without dask: indexing reads only
    the pieces (and, within them, only the elements) that the key touches.
    """

    def __init__(self, pieces: Sequence[xr.Variable], axis: int):
        self.pieces = list(pieces)
        self.axis = axis
        first = self.pieces[0].shape
        for p in self.pieces[1:]:
            if len(p.shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(p.shape, first)) if i != axis):
                raise ValueError(f"cannot concatenate pieces of shapes {first} and {p.shape} along axis {axis}")
        self.bounds = np.cumsum([0] + [p.shape[axis] for p in self.pieces])
        self.shape = tuple(int(self.bounds[-1]) if i == axis else n for i, n in enumerate(first))
        self.dtype = np.result_type(*[p.dtype for p in self.pieces])

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._getitem)

    def _getitem(self, key: Tuple[Any, ...]) -> np.ndarray:
        key = tuple(key) + (slice(None),) * (len(self.shape) - len(key))
        axis_key = key[self.axis]
        scalar = isinstance(axis_key, (int, np.integer))
        idx = np.atleast_1d(np.arange(self.shape[self.axis])[axis_key])
        out_axis = sum(1 for k in key[: self.axis] if not isinstance(k, (int, np.integer)))
        piece_of = np.searchsorted(self.bounds, idx, side="right") - 1
        parts: List[np.ndarray] = []
        start = 0
        while start < len(idx):
            p = piece_of[start]
            stop = start + 1
            while stop < len(idx) and piece_of[stop] == p:
                stop += 1
            local = idx[start:stop] - self.bounds[p]
            if len(local) > 1 and np.all(np.diff(local) == 1):
                local_key: Any = slice(int(local[0]), int(local[-1]) + 1)
            else:
                local_key = local
            sub = list(key)
            sub[self.axis] = local_key
            parts.append(np.asarray(self.pieces[p][tuple(sub)].values))
            start = stop
        if parts:
            out = np.concatenate(parts, axis=out_axis) if len(parts) > 1 else parts[0]
        else:
            shape = []
            for k, n in zip(key, self.shape):
                if isinstance(k, (int, np.integer)):
                    continue
                shape.append(len(range(*k.indices(n))) if isinstance(k, slice) else len(np.asarray(k)))
            out = np.empty(shape, dtype=self.dtype)
        if scalar:
            out = np.take(out, 0, axis=out_axis)
        return out.astype(self.dtype, copy=False)


def _concat_along(arrays: List[xr.DataArray], dim: str, name: str, use_dask: bool) -> xr.DataArray:
    """Lazily concatenate DataArrays (same dims, same other coordinates) along ``dim``."""
    if len(arrays) == 1:
        return arrays[0]
    if use_dask:
        return xr.concat(arrays, dim=dim, coords="minimal", compat="override", join="override")
    first = arrays[0]
    axis = first.dims.index(dim)
    data = indexing.LazilyIndexedArray(_LazyConcat([a.transpose(*first.dims).variable for a in arrays], axis))
    coords: Dict[str, Any] = {d: first[d] for d in first.dims if d != dim and d in first.coords}
    coords[dim] = np.concatenate([a[dim].values for a in arrays])
    return xr.DataArray(xr.Variable(first.dims, data, attrs=first.attrs), coords=coords, name=name)


def _concat_time(pieces: List[Tuple[str, xr.DataArray]], name: str, use_dask: bool) -> xr.DataArray:
    """Concatenate one variable's per-file pieces along time, checking order and overlaps."""
    pieces = sorted(pieces, key=lambda sp: sp[1][TIME_DIM].values[0])
    for (src_a, a), (src_b, b) in zip(pieces, pieces[1:]):
        if a[TIME_DIM].values[-1] >= b[TIME_DIM].values[0]:
            raise ValueError(
                f"{name}: the time ranges of {src_a} ({_fmt_time(a[TIME_DIM].values[0])} .. "
                f"{_fmt_time(a[TIME_DIM].values[-1])}) and {src_b} ({_fmt_time(b[TIME_DIM].values[0])} .. "
                f"{_fmt_time(b[TIME_DIM].values[-1])}) overlap"
            )
        for dim in (LEVEL_DIM, LAT_DIM, LON_DIM):
            if dim in a.dims and not np.allclose(a[dim].values, b[dim].values):
                raise ValueError(f"{name}: {src_a} and {src_b} have different {dim} coordinates")
    return _concat_along([p for _, p in pieces], TIME_DIM, name, use_dask)


def _combine_variable(pieces: List[Tuple[str, xr.DataArray]], name: str, use_dask: bool) -> xr.DataArray:
    """One variable from its per-file pieces: files per level set are joined along level, files per
    period along time."""
    first = pieces[0][1]
    if TIME_DIM not in first.dims:
        return first  # a constant repeated in several files: take the first
    if LEVEL_DIM not in first.dims:
        return _concat_time(pieces, name, use_dask)
    by_levels: Dict[Tuple[Any, ...], List[Tuple[str, xr.DataArray]]] = defaultdict(list)
    for src, da in pieces:
        by_levels[tuple(da[LEVEL_DIM].values.tolist())].append((src, da))
    if len(by_levels) == 1:
        return _concat_time(pieces, name, use_dask)
    groups = sorted(by_levels.items(), key=lambda kv: kv[0][0])
    all_levels = [lvl for levels, _ in groups for lvl in levels]
    if len(set(all_levels)) != len(all_levels):
        raise ValueError(f"{name}: files hold overlapping level sets {[list(k) for k, _ in groups]}")
    joined = [_concat_time(g, name, use_dask) for _, g in groups]
    common = joined[0][TIME_DIM].values
    for da in joined[1:]:
        common = np.intersect1d(common, da[TIME_DIM].values)
    if any(da.sizes[TIME_DIM] != len(common) for da in joined):
        warnings.warn(f"open_era5: {name}: keeping the {len(common)} times present for every level")
        joined = [da.sel({TIME_DIM: common}) for da in joined]
    return _concat_along(joined, LEVEL_DIM, name, use_dask)


def _fmt_time(t: Any) -> str:
    """ISO string (minutes) of a datetime64 or of integer seconds since the epoch."""
    if t is None:
        return "?"
    if isinstance(t, (int, np.integer)):
        t = np.datetime64(int(t), "s")
    return str(np.datetime_as_string(np.datetime64(t, "s"), unit="m"))


def open_era5(
    paths: Union[PathLike, Sequence[PathLike]],
    *,
    chunks: Optional[Mapping[str, int]] = None,
    engine: Optional[str] = None,
    keep_unknown: bool = False,
) -> xr.Dataset:
    """Open ERA5 data (zarr stores, netCDF files, directories, globs or a list) as one lazy Dataset.

    Every file is put in the canonical view (:func:`canonicalize_dataset`), then each variable's
    pieces are concatenated along time (files per year/month) and along level (files per level,
    e.g. WeatherBench 1's ``geopotential_500/``), and the variables merged (files per variable). Variables must share the latitude/longitude grid; pressure variables are
    reduced to their common levels and time-varying variables to their common times (a warning
    names what was dropped). ``chunks`` (requires dask) opens with dask arrays instead of the
    built-in lazy indexing. Data is read only when indexed.
    """
    files = _expand_paths(paths)
    if chunks is not None and not HAS_DASK:
        raise ImportError("open_era5(chunks=...) needs dask, which is not installed; leave chunks=None")
    per_var: Dict[str, List[Tuple[str, xr.DataArray]]] = defaultdict(list)
    for path in files:
        raw = _open_one(path, chunks, engine)
        ds = canonicalize_dataset(raw, keep_unknown=keep_unknown, source=str(path))
        for name in ds.data_vars:
            per_var[str(name)].append((str(path), ds[name]))
    if not per_var:
        raise ValueError(f"ERA5 data {[str(f) for f in files]}: no ERA5 variables found")

    merged = {name: _combine_variable(pieces, name, use_dask=chunks is not None) for name, pieces in per_var.items()}

    # Align the grid, the levels and the times across variables.
    names = list(merged)
    ref = merged[names[0]]
    lat, lon = ref[LAT_DIM].values, ref[LON_DIM].values
    for name in names[1:]:
        da = merged[name]
        if da.sizes[LAT_DIM] != len(lat) or da.sizes[LON_DIM] != len(lon) or not (
            np.allclose(da[LAT_DIM].values, lat, atol=1e-5) and np.allclose(da[LON_DIM].values, lon, atol=1e-5)
        ):
            raise ValueError(
                f"ERA5 variables are on different grids: {names[0]} is {len(lat)}x{len(lon)} "
                f"(lat {lat[0]:g}..{lat[-1]:g}, lon {lon[0]:g}..{lon[-1]:g}), {name} is "
                f"{da.sizes[LAT_DIM]}x{da.sizes[LON_DIM]} (lat {da[LAT_DIM].values[0]:g}..{da[LAT_DIM].values[-1]:g}); "
                "regrid with tools/regrid_era5.py first"
            )
    attrs: Dict[str, Any] = {"era5_sources": [str(f) for f in files]}
    pressure = [n for n in names if LEVEL_DIM in merged[n].dims]
    if pressure:
        common = merged[pressure[0]][LEVEL_DIM].values
        for n in pressure[1:]:
            common = np.intersect1d(common, merged[n][LEVEL_DIM].values)
        dropped = {
            n: sorted(set(merged[n][LEVEL_DIM].values.tolist()) - set(common.tolist())) for n in pressure
        }
        dropped = {n: d for n, d in dropped.items() if d}
        if dropped:
            warnings.warn(f"open_era5: keeping the pressure levels common to all variables {common.tolist()}; dropped {dropped}")
            attrs["era5_dropped_levels"] = str(dropped)
            for n in pressure:
                merged[n] = merged[n].sel({LEVEL_DIM: common})
    timed = [n for n in names if TIME_DIM in merged[n].dims]
    if timed:
        common_t = merged[timed[0]][TIME_DIM].values
        for n in timed[1:]:
            common_t = np.intersect1d(common_t, merged[n][TIME_DIM].values)
        lost = {n: merged[n].sizes[TIME_DIM] - len(common_t) for n in timed if merged[n].sizes[TIME_DIM] != len(common_t)}
        if lost:
            warnings.warn(f"open_era5: keeping the {len(common_t)} times common to all variables; time steps dropped per variable: {lost}")
            for n in timed:
                merged[n] = merged[n].sel({TIME_DIM: common_t})
    out = xr.Dataset(
        {n: merged[n].assign_coords({LAT_DIM: lat, LON_DIM: lon}) for n in names},
        attrs=attrs,
    )
    out[LAT_DIM].attrs.update(units="degrees_north", long_name="latitude")
    out[LON_DIM].attrs.update(units="degrees_east", long_name="longitude")
    # Which files hold each variable: read errors name them (ChannelReader.read).
    out.encoding["source_files"] = {name: [src for src, _ in pieces] for name, pieces in per_var.items()}
    return out


def available_channels(ds: xr.Dataset) -> List[str]:
    """Every channel a canonical dataset can provide, in registry order (levels top-down)."""
    out: List[str] = []
    for kind in ("pressure", "surface", "constant"):
        for name, var in VARIABLES.items():
            if var.kind != kind or name not in ds.data_vars:
                continue
            if kind == "pressure":
                out += [channel_name(name, lvl) for lvl in sorted(ds[name][LEVEL_DIM].values.tolist())]
            else:
                out.append(channel_name(name))
    return out


# ----------------------------------------------------------------------------------------------
# Reading channels
# ----------------------------------------------------------------------------------------------


def _describe(ds: xr.Dataset) -> str:
    parts = []
    for name, da in ds.data_vars.items():
        var = VARIABLES.get(str(name))
        tag = f"{name} ({var.channel})" if var is not None else str(name)
        parts.append(tag)
    levels = ds[LEVEL_DIM].values.tolist() if LEVEL_DIM in ds.coords else []
    times = ""
    if TIME_DIM in ds.coords and ds.sizes.get(TIME_DIM, 0):
        t = ds[TIME_DIM].values
        times = f"; times {_fmt_time(t[0])} .. {_fmt_time(t[-1])} ({len(t)} steps)"
    return f"variables [{', '.join(parts)}]; levels {levels} hPa{times}"


@dataclass
class _Run:
    variable: str
    kind: str
    positions: List[int]  # positions in the output channel axis
    level_index: Optional[np.ndarray]  # indices on the level axis (pressure runs)


class ChannelReader:
    """Read a fixed list of channels from a canonical dataset as ``float32`` arrays.

    Construction validates every channel: a missing variable or level raises ``KeyError`` naming
    the missing channels and what the data has. Consecutive channels of the same pressure
    variable are read in one indexing call.
    """

    def __init__(self, ds: xr.Dataset, channels: Sequence[Union[str, ChannelSpec]], source: str = "ERA5 data"):
        self.ds = ds
        self.specs = [c if isinstance(c, ChannelSpec) else parse_channel(c) for c in channels]
        self.source = source
        missing_vars: Dict[str, List[str]] = defaultdict(list)
        missing_levels: Dict[str, List[str]] = defaultdict(list)
        needs_time: List[str] = []
        for spec in self.specs:
            if spec.variable not in ds.data_vars:
                missing_vars[spec.variable].append(spec.name)
                continue
            if spec.level is not None:
                levels = ds[spec.variable][LEVEL_DIM].values
                if not np.any(np.isclose(levels, spec.level)):
                    missing_levels[spec.variable].append(spec.name)
            if not spec.is_constant and TIME_DIM not in ds[spec.variable].dims:
                needs_time.append(spec.name)
        problems = []
        if missing_vars:
            problems.append(
                "missing variables: "
                + "; ".join(f"{v} (for channels {chs})" for v, chs in missing_vars.items())
            )
        if missing_levels:
            problems.append(
                "missing levels: "
                + "; ".join(
                    f"{v} has levels {ds[v][LEVEL_DIM].values.tolist()} hPa but channels {chs} were requested"
                    for v, chs in missing_levels.items()
                )
            )
            if "era5_dropped_levels" in ds.attrs:
                problems.append(f"(levels not shared by all variables were dropped when opening: {ds.attrs['era5_dropped_levels']})")
        if needs_time:
            problems.append(f"channels {needs_time} vary in time but their variables have no time axis")
        if problems:
            raise KeyError(f"{source}: " + "; ".join(problems) + f". The data has: {_describe(ds)}")

        self.runs: List[_Run] = []
        for pos, spec in enumerate(self.specs):
            if spec.level is not None:
                lvl_idx = int(np.flatnonzero(np.isclose(ds[spec.variable][LEVEL_DIM].values, spec.level))[0])
                last = self.runs[-1] if self.runs else None
                if last is not None and last.variable == spec.variable and last.level_index is not None:
                    last.positions.append(pos)
                    last.level_index = np.append(last.level_index, lvl_idx)
                    continue
                self.runs.append(_Run(spec.variable, spec.kind, [pos], np.array([lvl_idx])))
            else:
                self.runs.append(_Run(spec.variable, spec.kind, [pos], None))

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.specs]

    @property
    def num_channels(self) -> int:
        return len(self.specs)

    def _where(self, variable: str) -> str:
        """The files holding ``variable`` (for error messages)."""
        files = (self.ds.encoding.get("source_files") or {}).get(variable) or [self.source]
        return ", ".join(f"'{f}'" for f in files)

    def read(self, time: Union[int, slice, np.ndarray]) -> np.ndarray:
        """``time`` an int -> ``[C, H, W]``; a slice or index array -> ``[T, C, H, W]``.

        Raises :class:`ERA5DataError` naming the file(s) when the data cannot be read or holds
        non-finite values."""
        scalar = isinstance(time, (int, np.integer))
        h, w = self.ds.sizes[LAT_DIM], self.ds.sizes[LON_DIM]
        if scalar:
            out = np.empty((len(self.specs), h, w), dtype=np.float32)
        else:
            n_t = len(range(*time.indices(self.ds.sizes[TIME_DIM]))) if isinstance(time, slice) else len(time)
            out = np.empty((n_t, len(self.specs), h, w), dtype=np.float32)
        for run in self.runs:
            var = self.ds[run.variable].variable
            sel: Dict[str, Any] = {}
            order: List[str] = []
            if TIME_DIM in var.dims:
                sel[TIME_DIM] = time
                if not scalar:
                    order.append(TIME_DIM)
            if run.level_index is not None:
                idx = run.level_index
                sel[LEVEL_DIM] = slice(int(idx[0]), int(idx[-1]) + 1) if np.all(np.diff(idx) == 1) else idx
                order.append(LEVEL_DIM)
            order += [LAT_DIM, LON_DIM]
            sub = var.isel(sel)
            try:
                arr = np.asarray(sub.values)
            except (OSError, RuntimeError, ValueError) as exc:  # a damaged chunk or file, found on reading
                raise ERA5DataError(
                    f"ERA5 data: reading {run.variable} from {self._where(run.variable)} failed (truncated or "
                    f"corrupt file?): {_first_line(exc)}"
                ) from exc
            if not np.isfinite(arr).all():
                # ERA5 fields have no gaps; a missing zarr chunk reads as its fill value (NaN)
                raise ERA5DataError(
                    f"ERA5 data: {run.variable} from {self._where(run.variable)} has {int((~np.isfinite(arr)).sum())} "
                    f"non-finite values in {f'time index {time}' if scalar else 'the time steps read'} (a missing or corrupt "
                    "chunk/file?)"
                )
            arr = np.transpose(arr, [sub.dims.index(d) for d in order])
            if run.level_index is None:
                arr = arr[..., None, :, :] if TIME_DIM in order or scalar else arr[None, None]
            if TIME_DIM not in var.dims and not scalar:
                arr = np.broadcast_to(arr.reshape(1, 1, h, w), (out.shape[0], 1, h, w))
            if scalar:
                out[run.positions] = arr.reshape(len(run.positions), h, w)
            else:
                out[:, run.positions] = arr.reshape(out.shape[0], len(run.positions), h, w)
        return out


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Lead times
# ----------------------------------------------------------------------------------------------


def train_lead_hours(max_lead_hours: int, lead_step_hours: int = 6, min_lead_hours: Optional[int] = None) -> List[int]:
    """The lead times training draws from: ``min, min + step, ..., max`` (``min`` defaults to ``step``)."""
    lo = lead_step_hours if min_lead_hours is None else min_lead_hours
    if lead_step_hours <= 0 or lo <= 0 or max_lead_hours < lo:
        raise ValueError(
            f"lead times: need 0 < min_lead_hours ({lo}) <= max_lead_hours ({max_lead_hours}) and lead_step_hours > 0 ({lead_step_hours})"
        )
    if (max_lead_hours - lo) % lead_step_hours:
        raise ValueError(f"max_lead_hours={max_lead_hours} is not min_lead_hours={lo} plus a multiple of lead_step_hours={lead_step_hours}")
    return list(range(lo, max_lead_hours + 1, lead_step_hours))


def sample_lead_hours(
    seed: int, step: int, max_lead_hours: int, lead_step_hours: int = 6, min_lead_hours: Optional[int] = None
) -> int:
    """The lead time (hours) of training batch ``step``: uniform over :func:`train_lead_hours`.

    A pure function of ``(seed, step)``: every rank computes the same value without
    communication, and a resumed run continues with exactly the same sequence.
    """
    choices = train_lead_hours(max_lead_hours, lead_step_hours, min_lead_hours)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 0x1EAD]))
    return int(choices[int(rng.integers(len(choices)))])


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


def _resolve_range(rng: Optional[Sequence[int]], n: int, what: str, allow_empty: bool = False) -> Tuple[int, int]:
    if rng is None:
        return 0, n
    if len(rng) != 2:
        raise ValueError(f"{what} must be (start, stop), got {rng!r}")
    start, stop = int(rng[0]), int(rng[1])
    if not (0 <= start <= stop <= n if allow_empty else 0 <= start < stop <= n):
        raise ValueError(f"{what}=({start}, {stop}) is not a {'' if allow_empty else 'non-empty '}range within [0, {n}]")
    return start, stop


class ERA5Dataset(torch.utils.data.Dataset):
    """Forecasting pairs ``(state at t, state at t + Δ)`` from ERA5 data, for one rank's channels.

    Args:
        path: anything :func:`open_era5` accepts.
        channels: the model's input channel list (global, all ranks), e.g. ``DEFAULT_ERA5_CHANNELS``.
        channel_range: ``(start, stop)`` into ``channels``: the input channels this rank loads
            (default all).
        output_channels: the predicted channel list (global); default ``channels``.
        output_channel_range: ``(start, stop)`` into ``output_channels``: the outputs this rank
            owns. Default: ``channel_range`` when ``output_channels`` is ``None`` (each rank
            predicts its own input channels), else all outputs.
        time_range: ``(start, end)`` time labels (inclusive; strings such as ``"2018-01-01"`` or
            ``"2018"``), applied before the split. Must lie within the data.
        max_lead_hours, lead_step_hours, min_lead_hours: training leads are
            ``min, min + step, ..., max`` (``min`` defaults to ``step``).
        lead_times_hours: fixed evaluation leads. When given, every index covers the initial
            times valid for *all* of them (the same initial times for every lead).
        stats_file: statistics from ``tools/compute_era5_stats.py`` (or an :class:`ERA5Stats`);
            inputs and targets are normalized with them. ``None``: values stay in physical units.
        split: ``"train"`` (the first ``1 - val_fraction`` of the time steps), ``"val"`` (the rest)
            or ``"all"``. Targets never cross the split boundary.
        seed: used by integer indexing in training mode (per-sample lead, see ``__getitem__``).
        cache: load this rank's channels for the whole time window into memory at construction
            (``None``: when that takes at most ``cache_max_bytes``).
        return_climatology: add each target's climatology (physical units) to the sample.
    """

    def __init__(
        self,
        path: Union[PathLike, Sequence[PathLike]],
        channels: Sequence[str] = DEFAULT_ERA5_CHANNELS,
        channel_range: Optional[Tuple[int, int]] = None,
        output_channels: Optional[Sequence[str]] = None,
        output_channel_range: Optional[Tuple[int, int]] = None,
        time_range: Optional[Tuple[Any, Any]] = None,
        max_lead_hours: int = 72,
        lead_step_hours: int = 6,
        min_lead_hours: Optional[int] = None,
        lead_times_hours: Optional[Sequence[int]] = None,
        stats_file: Optional[Union[PathLike, ERA5Stats]] = None,
        split: str = "all",
        val_fraction: float = 0.1,
        seed: int = 0,
        cache: Optional[bool] = None,
        cache_max_bytes: int = 2 << 30,
        return_climatology: bool = False,
    ):
        super().__init__()
        self.path = path
        self.source = str(path) if isinstance(path, (str, os.PathLike)) else f"{len(path)} paths"
        self.seed = int(seed)
        self._ds: Optional[xr.Dataset] = None
        self._pid: Optional[int] = None
        ds = self.dataset

        # Channels.
        self.channel_specs = parse_channels(channels)
        self.channel_range = _resolve_range(channel_range, len(self.channel_specs), "channel_range")
        if output_channels is None:
            self.output_specs = list(self.channel_specs)
            default_out = self.channel_range
        else:
            self.output_specs = parse_channels(output_channels)
            default_out = (0, len(self.output_specs))
        self.output_channel_range = (
            default_out if output_channel_range is None
            # empty: a rank that predicts none of a subset of outputs (it still reads its inputs)
            else _resolve_range(output_channel_range, len(self.output_specs), "output_channel_range", allow_empty=True)
        )
        # Validate the *global* lists (metadata only) so every rank fails with the same message.
        ChannelReader(ds, self.channel_specs, self.source)
        ChannelReader(ds, self.output_specs, self.source)
        self.input_specs = self.channel_specs[slice(*self.channel_range)]
        self.local_output_specs = self.output_specs[slice(*self.output_channel_range)]
        union: List[ChannelSpec] = list(dict.fromkeys(self.input_specs + self.local_output_specs))
        self._reader = ChannelReader(ds, union, self.source)
        pos = {s.name: i for i, s in enumerate(union)}
        self._input_pos = np.array([pos[s.name] for s in self.input_specs], dtype=np.int64)
        self._output_pos = np.array([pos[s.name] for s in self.local_output_specs], dtype=np.int64)

        # Times: range, split, leads, valid initial times.
        if TIME_DIM not in ds.coords or ds.sizes.get(TIME_DIM, 0) == 0:
            raise ValueError(f"{self.source}: the data has no time axis; {_describe(ds)}")
        all_times = ds[TIME_DIM].values.astype("datetime64[s]")
        if np.any(np.diff(all_times.astype(np.int64)) <= 0):
            raise ValueError(f"{self.source}: time coordinate is not strictly increasing")
        lo, hi = self._time_window(all_times, time_range)
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if split != "all":
            if not 0.0 < val_fraction < 1.0:
                raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
            n_train = int(round((hi - lo) * (1.0 - val_fraction)))
            lo, hi = (lo, lo + n_train) if split == "train" else (lo + n_train, hi)
            if hi - lo < 2:
                raise ValueError(f"split={split!r} of {self.source} has {hi - lo} time steps; it needs at least 2")
        self.split = split
        self.window = (lo, hi)  # absolute time indices [lo, hi)
        self._times_s = all_times.astype(np.int64)

        self.max_lead_hours, self.lead_step_hours, self.min_lead_hours = max_lead_hours, lead_step_hours, min_lead_hours
        self.lead_times_hours = None if lead_times_hours is None else [int(x) for x in lead_times_hours]
        if self.lead_times_hours is not None:
            if not self.lead_times_hours or any(x <= 0 for x in self.lead_times_hours):
                raise ValueError(f"lead_times_hours must be positive, got {lead_times_hours!r}")
            self.active_leads = sorted(set(self.lead_times_hours))
        else:
            self.active_leads = train_lead_hours(max_lead_hours, lead_step_hours, min_lead_hours)
        self._starts = self._valid_starts(self.active_leads)

        # Statistics.
        self.stats: Optional[ERA5Stats] = None
        if stats_file is not None:
            full = stats_file if isinstance(stats_file, ERA5Stats) else load_era5_stats(stats_file)
            src = "statistics" if isinstance(stats_file, ERA5Stats) else f"statistics file {stats_file}"
            if full.latitude is not None and (
                len(full.latitude) != ds.sizes[LAT_DIM] or not np.allclose(full.latitude, ds[LAT_DIM].values, atol=1e-4)
            ):
                raise ValueError(f"{src} was computed on a different latitude grid ({len(full.latitude)} rows) than {self.source} ({ds.sizes[LAT_DIM]})")
            self.stats = full.select([s.name for s in union], src)
            std = np.where(self.stats.std > 0, self.stats.std, 1.0)
            self._mean = self.stats.mean.astype(np.float32)[:, None, None]
            self._std = std.astype(np.float32)[:, None, None]
        else:
            self._mean = np.zeros((len(union), 1, 1), np.float32)
            self._std = np.ones((len(union), 1, 1), np.float32)
        self.return_climatology = return_climatology
        if return_climatology and (self.stats is None or (self.stats.climatology is None and self.stats.climatology_doy is None)):
            raise ValueError("return_climatology=True needs a stats_file with a climatology")

        # Cache.
        n_bytes = (hi - lo) * len(union) * ds.sizes[LAT_DIM] * ds.sizes[LON_DIM] * 4
        self._cache: Optional[np.ndarray] = None
        if cache or (cache is None and n_bytes <= cache_max_bytes):
            self._cache = self._reader.read(slice(lo, hi))

    # -- opening (per process: file handles must not cross a fork) ------------------------------
    @property
    def dataset(self) -> xr.Dataset:
        if self._ds is None or self._pid != os.getpid():
            self._ds = open_era5(self.path)
            self._pid = os.getpid()
            if getattr(self, "_reader", None) is not None:
                self._reader.ds = self._ds
        return self._ds

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"] = None
        state["_pid"] = None
        if state.get("_reader") is not None:
            reader = ChannelReader.__new__(ChannelReader)
            reader.__dict__.update(self._reader.__dict__)
            reader.ds = None  # type: ignore[assignment]
            state["_reader"] = reader
        return state

    # -- time bookkeeping -------------------------------------------------------------------------
    def _time_window(self, times: np.ndarray, time_range: Optional[Tuple[Any, Any]]) -> Tuple[int, int]:
        if time_range is None:
            return 0, len(times)
        import pandas as pd

        if len(time_range) != 2:
            raise ValueError(f"time_range must be (start, end), got {time_range!r}")
        index = pd.DatetimeIndex(times.astype("datetime64[ns]"))
        start, end = pd.Timestamp(time_range[0]), pd.Timestamp(time_range[1])
        have = f"the data covers {_fmt_time(times[0])} .. {_fmt_time(times[-1])} ({len(times)} steps)"
        if start > end:
            raise ValueError(f"time_range {time_range!r}: start is after end")
        if start < index[0] or end > index[-1]:
            raise ValueError(f"time_range {tuple(map(str, time_range))} is not within the data: {have} ({self.source})")
        sl = index.slice_indexer(time_range[0], time_range[1])
        lo, hi = int(sl.start or 0), int(sl.stop if sl.stop is not None else len(times))
        if hi - lo < 2:
            raise ValueError(f"time_range {tuple(map(str, time_range))} selects {hi - lo} time steps; {have}")
        return lo, hi

    def _valid_starts(self, leads: Sequence[int]) -> np.ndarray:
        lo, hi = self.window
        t = self._times_s[lo:hi]
        ok = np.ones(len(t), dtype=bool)
        for lead in leads:
            target = t + int(lead) * 3600
            j = np.searchsorted(t, target)
            found = (j < len(t)) & (t[np.minimum(j, len(t) - 1)] == target)
            if not found.any():
                span_h = (t[-1] - t[0]) // 3600
                raise ValueError(
                    f"lead time {lead} h: no initial time in {_fmt_time(t[0])} .. {_fmt_time(t[-1])} "
                    f"(split={self.split!r}, {span_h} h, step {int(np.median(np.diff(t)) // 3600) if len(t) > 1 else '?'} h) "
                    f"has a target at +{lead} h inside the same window"
                )
            ok &= found
        if not ok.any():
            raise ValueError(f"no initial time in the {self.split!r} window has targets at all lead times {list(leads)}")
        return np.flatnonzero(ok) + lo

    def target_index(self, time_index: int, lead_hours: int) -> int:
        """Absolute index of ``time[time_index] + lead_hours`` (``KeyError`` if outside the window)."""
        lo, hi = self.window
        if not lo <= time_index < hi:
            raise KeyError(f"time index {time_index} is outside this dataset's window [{lo}, {hi})")
        target = self._times_s[time_index] + int(lead_hours) * 3600
        j = int(np.searchsorted(self._times_s[lo:hi], target)) + lo
        if j >= hi or self._times_s[j] != target:
            raise KeyError(f"no target at {_fmt_time(target)} (+{lead_hours} h) in the window")
        return j

    # -- public properties ------------------------------------------------------------------------
    @property
    def latitudes(self) -> np.ndarray:
        """Latitudes in degrees, ascending (south-to-north): row 0 is the southernmost."""
        return self.dataset[LAT_DIM].values.astype(np.float64)

    @property
    def longitudes(self) -> np.ndarray:
        """Longitudes in degrees, ascending in ``[0, 360)``."""
        return self.dataset[LON_DIM].values.astype(np.float64)

    @property
    def times(self) -> np.ndarray:
        """Times of this dataset's window (datetime64[s])."""
        return self._times_s[slice(*self.window)].astype("datetime64[s]")

    @property
    def valid_start_indices(self) -> np.ndarray:
        """Absolute time indices that are valid initial times for every active lead."""
        return self._starts

    @property
    def input_channel_names(self) -> List[str]:
        return [s.name for s in self.input_specs]

    @property
    def output_channel_names(self) -> List[str]:
        return [s.name for s in self.local_output_specs]

    @property
    def output_is_constant(self) -> torch.Tensor:
        """Bool ``[C_out_local]``: outputs that never change (lsm, orography), e.g. to leave out of the loss."""
        return torch.tensor([s.is_constant for s in self.local_output_specs], dtype=torch.bool)

    @property
    def output_mean(self) -> torch.Tensor:
        return torch.from_numpy(self._mean[self._output_pos, 0, 0].copy())

    @property
    def output_std(self) -> torch.Tensor:
        return torch.from_numpy(self._std[self._output_pos, 0, 0].copy())

    @property
    def input_mean(self) -> torch.Tensor:
        return torch.from_numpy(self._mean[self._input_pos, 0, 0].copy())

    @property
    def input_std(self) -> torch.Tensor:
        return torch.from_numpy(self._std[self._input_pos, 0, 0].copy())

    def denormalize_output(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized ``[..., C_out_local, H, W]`` -> physical units."""
        mean = self.output_mean.to(x.device, x.dtype)[:, None, None]
        std = self.output_std.to(x.device, x.dtype)[:, None, None]
        return x * std + mean

    def climatology_for(self, target_times: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """Climatology of this rank's outputs at ``target_times`` (seconds or datetime64) -> ``[B, C_out_local, H, W]``."""
        if self.stats is None:
            raise ValueError("climatology_for needs a stats_file")
        if isinstance(target_times, torch.Tensor):
            target_times = target_times.cpu().numpy()
        clim = self.stats.climatology_at(np.asarray(target_times))
        return np.ascontiguousarray(clim[:, self._output_pos], dtype=np.float32)

    # -- indexing ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.lead_times_hours is not None:
            return len(self.lead_times_hours) * len(self._starts)
        return len(self._starts)

    def index_to_pair(self, index: int) -> Tuple[int, int]:
        """Integer index -> ``(time_index, lead_hours)``.

        Evaluation mode (``lead_times_hours`` given): lead-major enumeration of every
        (lead, initial time). Training mode: the ``index``-th valid initial time with a lead drawn
        per sample from ``(seed, index)``; use :class:`ERA5TrainBatchSampler` for one lead per batch.
        """
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        if self.lead_times_hours is not None:
            lead = self.lead_times_hours[index // len(self._starts)]
            return int(self._starts[index % len(self._starts)]), int(lead)
        lead = sample_lead_hours(self.seed, index, self.max_lead_hours, self.lead_step_hours, self.min_lead_hours)
        return int(self._starts[index]), lead

    def _read(self, time_index: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[time_index - self.window[0]]
        _ = self.dataset  # reopen after a fork
        return self._reader.read(int(time_index))

    def __getitem__(self, index: Union[int, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        """``index`` an int (see :meth:`index_to_pair`) or an explicit ``(time_index, lead_hours)``."""
        if isinstance(index, tuple):
            time_index, lead = int(index[0]), int(index[1])
        else:
            time_index, lead = self.index_to_pair(int(index))
        target_index = self.target_index(time_index, lead)
        x = self._read(time_index)[self._input_pos]
        y = self._read(target_index)[self._output_pos]
        x = (x - self._mean[self._input_pos]) / self._std[self._input_pos]
        y = (y - self._mean[self._output_pos]) / self._std[self._output_pos]
        sample = {
            "input": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)),
            "lead_time_hours": torch.tensor(float(lead), dtype=torch.float32),
            "time": torch.tensor(int(self._times_s[time_index]), dtype=torch.int64),
            "target_time": torch.tensor(int(self._times_s[target_index]), dtype=torch.int64),
            "time_index": torch.tensor(time_index, dtype=torch.int64),
        }
        if self.return_climatology:
            clim = self.climatology_for(np.array([self._times_s[target_index]]))[0]
            sample["climatology"] = torch.from_numpy(clim)
        return sample


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


class ERA5TrainBatchSampler(torch.utils.data.Sampler):
    """Shuffled training batches of ``(time_index, lead_hours)`` with one lead per batch.

    Step ``k`` (counting micro-batches from 0, the same count on every rank) covers positions
    ``[k * B * dp, (k + 1) * B * dp)`` of epoch ``k // steps_per_epoch``'s permutation of the valid
    initial times (a pure function of ``(seed, epoch)``); data-parallel rank ``r`` takes its
    ``B`` of them, and every sample of the step gets the lead ``sample_lead_hours(seed, k)``.
    TP ranks with the same ``data_parallel_rank`` therefore read the same samples. ``start_step``
    resumes exactly; ``num_steps=None`` iterates forever (no ``len``).
    """

    def __init__(
        self,
        dataset: ERA5Dataset,
        micro_batch_size: int,
        *,
        seed: int = 0,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        start_step: int = 0,
        num_steps: Optional[int] = None,
        shuffle: bool = True,
    ):
        if micro_batch_size < 1 or data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"bad sampler setup: micro_batch_size={micro_batch_size}, data_parallel_rank={data_parallel_rank}, "
                f"data_parallel_size={data_parallel_size}"
            )
        self.starts = np.asarray(dataset.valid_start_indices)
        self.per_step = micro_batch_size * data_parallel_size
        self.steps_per_epoch = len(self.starts) // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training data has {len(self.starts)} valid initial times, fewer than one step's "
                f"micro_batch_size * data_parallel_size = {self.per_step}"
            )
        self.micro_batch_size, self.seed = micro_batch_size, int(seed)
        self.dp_rank, self.dp_size = data_parallel_rank, data_parallel_size
        self.start_step, self.num_steps, self.shuffle = int(start_step), num_steps, shuffle
        self.max_lead_hours, self.lead_step_hours = dataset.max_lead_hours, dataset.lead_step_hours
        self.min_lead_hours = dataset.min_lead_hours
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[np.ndarray] = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, 0x5A3B]))
                self._perm = rng.permutation(len(self.starts))
            else:
                self._perm = np.arange(len(self.starts))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def lead_for_step(self, step: int) -> int:
        return sample_lead_hours(self.seed, step, self.max_lead_hours, self.lead_step_hours, self.min_lead_hours)

    def batch(self, step: int) -> List[Tuple[int, int]]:
        """The ``(time_index, lead_hours)`` pairs this rank reads at micro-batch ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        offset = k * self.per_step + self.dp_rank * self.micro_batch_size
        lead = self.lead_for_step(step)
        return [(int(self.starts[i]), lead) for i in perm[offset : offset + self.micro_batch_size]]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("ERA5TrainBatchSampler(num_steps=None) is infinite")
        return self.num_steps


class ERA5EvalBatchSampler(torch.utils.data.Sampler):
    """Evaluation batches at fixed lead times: for each lead, the same initial times in order.

    The dataset's valid initial times (valid for every lead) are taken every ``stride``-th,
    truncated to a multiple of ``micro_batch_size * data_parallel_size`` (so every DP rank runs
    the same number of batches) and optionally to ``max_batches_per_lead`` steps; rank ``r`` gets
    the ``r``-th micro-batch of each step. Every batch has a single lead.
    """

    def __init__(
        self,
        dataset: ERA5Dataset,
        micro_batch_size: int,
        *,
        lead_times_hours: Optional[Sequence[int]] = None,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        stride: int = 1,
        max_batches_per_lead: Optional[int] = None,
    ):
        leads = lead_times_hours if lead_times_hours is not None else dataset.lead_times_hours
        if not leads:
            raise ValueError("ERA5EvalBatchSampler needs lead_times_hours (here or on the dataset)")
        missing = [lead for lead in leads if int(lead) not in dataset.active_leads]
        if missing:
            raise ValueError(f"leads {missing} h were not declared to the dataset (lead_times_hours={dataset.active_leads})")
        self.leads = [int(x) for x in leads]
        starts = np.asarray(dataset.valid_start_indices)[:: max(1, int(stride))]
        per_step = micro_batch_size * data_parallel_size
        steps = len(starts) // per_step
        if max_batches_per_lead is not None:
            steps = min(steps, int(max_batches_per_lead))
        if steps == 0:
            raise ValueError(
                f"evaluation has {len(starts)} initial times, fewer than micro_batch_size * data_parallel_size = {per_step}"
            )
        self.batches_per_lead = steps
        self._starts = starts[: steps * per_step].reshape(steps, data_parallel_size, micro_batch_size)[:, data_parallel_rank]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for lead in self.leads:
            for row in self._starts:
                yield [(int(t), lead) for t in row]

    def __len__(self) -> int:
        return len(self.leads) * self.batches_per_lead

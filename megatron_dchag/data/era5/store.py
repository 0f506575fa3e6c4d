"""ERA5 stores: opening zarr/netCDF files as one lazy canonical dataset, and reading channels.

* :func:`open_era5` opens zarr stores (format 2 or 3) and netCDF files (one path, a directory of
  files, a glob, or a list; e.g. one file per year or per variable) and returns **one lazy**
  ``xr.Dataset`` in the canonical view of :mod:`megatron_dchag.data.era5.canonical` (long variable
  names, ``time/level/latitude/longitude``, latitude **south-to-north**). What each file's
  variables became, and why any was left out, is kept in ``ds.encoding["era5_variables"]``
  (:func:`describe_dataset` shows it in errors). dask is *not* required:
  without ``chunks`` the files are combined by a small lazy concatenation along time
  (:class:`_LazyConcat`), so indexing one time step reads only that step from disk. dask is
  not used by default even when installed, because per-sample random access through dask graphs
  is slower than direct lazy indexing; pass ``chunks={}`` to get dask arrays instead.
* :class:`ChannelReader` validates a channel list against a dataset (clear errors naming what is
  missing and what the data has) and reads ``[C, H, W]`` (or ``[T, C, H, W]``) arrays for any
  time index; constants are broadcast over time.

A truncated or corrupt file or store raises :class:`ERA5DataError` naming it, when opened or when
read.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from megatron_dchag.data.era5.canonical import EnsembleMember, VariableMatch, canonicalize_dataset, describe_matches
from megatron_dchag.data.era5.naming import (
    LAT_DIM,
    LEVEL_DIM,
    LON_DIM,
    TIME_DIM,
    VARIABLES,
    ChannelSpec,
    channel_name,
    parse_channel,
)

__all__ = [
    "ERA5DataError",
    "open_era5",
    "available_channels",
    "ChannelReader",
    "describe_dataset",
    "format_time",
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
                f"{name}: the time ranges of {src_a} ({format_time(a[TIME_DIM].values[0])} .. "
                f"{format_time(a[TIME_DIM].values[-1])}) and {src_b} ({format_time(b[TIME_DIM].values[0])} .. "
                f"{format_time(b[TIME_DIM].values[-1])}) overlap"
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


def format_time(t: Any) -> str:
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
    ensemble_member: EnsembleMember = None,
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
    matches: List[VariableMatch] = []
    ensembles = []
    for path in files:
        raw = _open_one(path, chunks, engine)
        ds = canonicalize_dataset(raw, keep_unknown=keep_unknown, source=str(path), ensemble_member=ensemble_member)
        matches += ds.encoding["era5_variables"]
        if ds.encoding.get("era5_ensemble"):
            ensembles.append(ds.encoding["era5_ensemble"])
        for name in ds.data_vars:
            per_var[str(name)].append((str(path), ds[name]))
    if not per_var:
        raise ValueError(
            f"ERA5 data {[str(f) for f in files]}: no ERA5 variables found; the files hold: {describe_matches(matches)}"
        )
    if ensemble_member is not None and not ensembles:
        raise ValueError(
            f"ERA5 data {[str(f) for f in files]}: ensemble member {ensemble_member!r} was asked for, but the data has "
            "no ensemble dimension (leave data.ensemble_member unset)"
        )

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
    out.encoding["era5_variables"] = list(dict.fromkeys(matches))  # each file's variables, recognised or not
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


def describe_dataset(ds: xr.Dataset) -> str:
    """What a canonical dataset holds: its variables (and channel prefixes), levels and times, and
    how each variable of the files was recognised or why it was left out."""
    parts = []
    for name, da in ds.data_vars.items():
        var = VARIABLES.get(str(name))
        tag = f"{name} ({var.channel})" if var is not None else str(name)
        parts.append(tag)
    levels = ds[LEVEL_DIM].values.tolist() if LEVEL_DIM in ds.coords else []
    times = ""
    if TIME_DIM in ds.coords and ds.sizes.get(TIME_DIM, 0):
        t = ds[TIME_DIM].values
        times = f"; times {format_time(t[0])} .. {format_time(t[-1])} ({len(t)} steps)"
    matches = ds.encoding.get("era5_variables")
    files = f"; in the files: {describe_matches(matches)}" if matches else ""
    return f"variables [{', '.join(parts)}]; levels {levels} hPa{times}{files}"


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
            raise KeyError(f"{source}: " + "; ".join(problems) + f". The data has: {describe_dataset(ds)}")

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


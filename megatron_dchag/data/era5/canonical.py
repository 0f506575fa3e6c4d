"""The canonical view of one opened ERA5 dataset, and the record of how each variable was recognised.

Files from the CDS, WeatherBench 1/2, cfgrib, CDO or a user's own pipeline name the same fields
and axes differently. :func:`canonicalize_dataset` maps any of them onto one view, so the rest of
the code never sees the difference:

* **variables** are recognised by name (every convention of :mod:`~megatron_dchag.data.era5.naming`),
  then by their CF ``standard_name`` attribute, then by their ``long_name`` attribute. A name
  shared by a pressure-level field and a surface field (``air_temperature``, ``eastward_wind``,
  ``geopotential``) means the pressure field when the variable has a level axis and the surface
  field otherwise. Nothing is dropped silently: every data variable gets a
  :class:`VariableMatch` saying what it became and how, or why it was left out, in
  ``ds.encoding["era5_variables"]``;
* **coordinates** become ``time`` (datetime64), ``level`` (hPa), ``latitude`` and ``longitude``
  (degrees), found by name (:data:`~megatron_dchag.data.era5.naming.COORDINATE_ALIASES`) or by
  CF attributes (``standard_name``, ``axis``, ``units``). A numeric time axis with CF units
  (``hours since 1900-01-01``) is decoded; cftime dates of the standard calendars are converted;
* an **ensemble** dimension (``number``, ``realization``, ...) with several members is refused
  unless ``ensemble_member`` selects one member (an index) or ``"mean"`` (the ensemble mean, lazy);
* **latitude runs south-to-north (ascending)**: row 0 is the southernmost latitude;
* **longitude** is ascending and in ``[0, 360)``; a regional grid that crosses the prime meridian
  (12°W .. 20°E) stays contiguous instead, starting at its western edge (-12 .. 20), so the image
  has no seam;
* constant fields (``land_sea_mask``, ``geopotential_at_surface``) carry no time axis (the first
  step is used when a file stores one); ``geopotential_at_surface`` is in m² s⁻² (an orography or
  ``surface_altitude`` in metres is multiplied by g);
* dimensions are *not* transposed (a lazy transpose would turn into vectorized indexing over the
  whole array); readers select by dimension name and transpose the small loaded result.

Every step is lazy (renames, ``isel`` and small lazy wrappers), so opening a 0.25° archive costs
nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from megatron_dchag.data.era5.naming import (
    COORDINATE_ALIASES,
    GRAVITY,
    LAT_DIM,
    LEVEL_DIM,
    LON_DIM,
    TIME_DIM,
    VARIABLES,
    is_metres_name,
    resolve_variable,
    variable_candidates,
)

__all__ = [
    "ENSEMBLE_DIMS",
    "EnsembleMember",
    "VariableMatch",
    "canonicalize_dataset",
    "parse_ensemble_member",
    "describe_matches",
]

#: Dimension names that hold ensemble members (CF: ``standard_name = realization``).
ENSEMBLE_DIMS: Tuple[str, ...] = ("number", "ensemble_member", "member", "member_id", "realization", "ensemble", "ens")

#: ``None`` (no ensemble expected), a member index, or ``"mean"``.
EnsembleMember = Union[None, int, str]

_TIME_UNITS = re.compile(r"^\s*\w+\s+since\s+\S", re.IGNORECASE)
_PRESSURE_UNITS = {"hpa", "pa", "millibar", "millibars", "mbar", "mb"}
_LAT_UNITS = {"degrees_north", "degree_north", "degrees_n", "degree_n", "degreesn", "degreen"}
_LON_UNITS = {"degrees_east", "degree_east", "degrees_e", "degree_e", "degreese", "degreee"}
_METRE_UNITS = {"m", "meter", "meters", "metre", "metres", "gpm"}
_STANDARD_CALENDARS = {"standard", "gregorian", "proleptic_gregorian"}


@dataclass(frozen=True)
class VariableMatch:
    """What one data variable of a file became: ``canonical`` (``None`` if left out) and ``how``
    it was recognised, or why it was not."""

    name: str
    canonical: Optional[str]
    how: str

    def describe(self) -> str:
        if self.canonical is None:
            return f"{self.name}: left out ({self.how})"
        return f"{self.name} -> {self.canonical} ({self.how})"


def describe_matches(matches: Sequence[VariableMatch]) -> str:
    """``"t -> temperature (name); foo: left out (...)"`` for error messages (duplicates once)."""
    return "; ".join(dict.fromkeys(m.describe() for m in matches))


def parse_ensemble_member(value: Any) -> EnsembleMember:
    """``None``, a non-negative integer (or its string) or ``"mean"``; anything else is a ValueError."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    text = str(value).strip().lower()
    if text == "mean":
        return "mean"
    if text.isdigit():
        return int(text)
    raise ValueError(f"ensemble member {value!r} must be a member index (0, 1, ...) or 'mean'")


# ----------------------------------------------------------------------------------------------
# Lazy wrappers
# ----------------------------------------------------------------------------------------------


def _out_axis(key: Tuple, axis: int) -> int:
    """Position of ``axis`` in the result of indexing with ``key`` (integer keys drop their axis)."""
    return sum(1 for k in key[:axis] if not isinstance(k, (int, np.integer)))


class _LazyNewAxis(BackendArray):
    """A lazy variable with a size-1 axis inserted at ``axis`` (``expand_dims`` would load the data)."""

    def __init__(self, variable: xr.Variable, axis: int):
        self.variable = variable
        self.axis = axis
        self.shape = tuple(variable.shape[:axis]) + (1,) + tuple(variable.shape[axis:])
        self.dtype = variable.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._getitem)

    def _getitem(self, key: Tuple) -> np.ndarray:
        key = tuple(key) + (slice(None),) * (len(self.shape) - len(key))
        new_key = key[self.axis]
        arr = np.asarray(self.variable[key[: self.axis] + key[self.axis + 1 :]].values)
        if isinstance(new_key, (int, np.integer)):
            return arr
        out_axis = _out_axis(key, self.axis)
        return np.take(np.expand_dims(arr, out_axis), np.arange(1)[new_key], axis=out_axis)


class _LazyMeanOverAxis(BackendArray):
    """A lazy mean over one axis (the ensemble members): indexing reads only the selected
    elements of every member and averages them in float64."""

    def __init__(self, variable: xr.Variable, axis: int):
        self.variable = variable
        self.axis = axis
        self.shape = tuple(variable.shape[:axis]) + tuple(variable.shape[axis + 1 :])
        self.dtype = variable.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._getitem)

    def _getitem(self, key: Tuple) -> np.ndarray:
        key = tuple(key) + (slice(None),) * (len(self.shape) - len(key))
        full = key[: self.axis] + (slice(None),) + key[self.axis :]
        arr = np.asarray(self.variable[full].values, dtype=np.float64)
        return arr.mean(axis=_out_axis(full, self.axis)).astype(self.dtype, copy=False)


def _with_level_axis(da: xr.DataArray, level: float) -> xr.DataArray:
    """Give a single-level field (a scalar ``level`` coordinate) a lazy size-1 level dimension."""
    axis = 1 if da.dims and da.dims[0] == TIME_DIM else 0
    dims = da.dims[:axis] + (LEVEL_DIM,) + da.dims[axis:]
    data = indexing.LazilyIndexedArray(_LazyNewAxis(da.variable, axis))
    coords = {d: da[d].values for d in da.dims if d in da.coords}
    coords[LEVEL_DIM] = np.array([level])
    return xr.DataArray(xr.Variable(dims, data, attrs=da.attrs), coords=coords, name=da.name)


def _ensemble_mean(da: xr.DataArray, dim: str) -> xr.DataArray:
    axis = da.dims.index(dim)
    dims = da.dims[:axis] + da.dims[axis + 1 :]
    data = indexing.LazilyIndexedArray(_LazyMeanOverAxis(da.variable, axis))
    coords = {d: da[d].values for d in dims if d in da.coords}
    return xr.DataArray(xr.Variable(dims, data, attrs=da.attrs), coords=coords, name=da.name)


# ----------------------------------------------------------------------------------------------
# Coordinates
# ----------------------------------------------------------------------------------------------


def _attr(var: Any, name: str) -> str:
    return str(var.attrs.get(name, "")).strip()


def _looks_like(canonical: str, var: xr.Variable) -> bool:
    """Whether a 1-D coordinate's CF attributes say it is ``canonical``."""
    standard, axis, units = _attr(var, "standard_name").lower(), _attr(var, "axis").upper(), _attr(var, "units")
    if canonical == TIME_DIM:
        return (standard == "time" or axis == "T" or bool(_TIME_UNITS.match(units))
                or np.issubdtype(var.dtype, np.datetime64))
    if canonical == LEVEL_DIM:
        return standard == "air_pressure" or (units.lower() in _PRESSURE_UNITS and axis in ("Z", ""))
    if canonical == LAT_DIM:
        return standard == "latitude" or units.lower() in _LAT_UNITS
    return standard == "longitude" or units.lower() in _LON_UNITS


def _find_coordinate(ds: xr.Dataset, canonical: str, taken: Sequence[str]) -> Optional[str]:
    """The dataset's name for a canonical coordinate: a known name (a dimension first), else a
    1-D dimension coordinate whose CF attributes say so."""
    candidates = [n for n in COORDINATE_ALIASES[canonical] if n in ds.dims or n in ds.coords]
    dims = [n for n in candidates if n in ds.dims]
    if len(dims) > 1:
        raise ValueError(f"dataset has several dimensions that mean {canonical!r}: {dims}")
    if dims:
        return dims[0]
    if candidates:
        return candidates[0]
    by_attrs = [str(n) for n in ds.dims if n in ds.coords and n not in taken and ds[n].ndim == 1
                and _looks_like(canonical, ds[n].variable)]
    if len(by_attrs) > 1:
        raise ValueError(f"dataset has several dimensions whose CF attributes mean {canonical!r}: {by_attrs}")
    return by_attrs[0] if by_attrs else None


def _decode_time(ds: xr.Dataset, source: str) -> xr.Dataset:
    """A numeric time axis with CF units, or cftime dates of a standard calendar -> datetime64."""
    if TIME_DIM not in ds.coords:
        return ds
    var = ds[TIME_DIM].variable
    if np.issubdtype(var.dtype, np.datetime64):
        return ds
    units = _attr(var, "units") or str(var.encoding.get("units", ""))
    calendar = (_attr(var, "calendar") or str(var.encoding.get("calendar", "")) or "standard").lower()
    if np.issubdtype(var.dtype, np.number):
        if not _TIME_UNITS.match(units):
            raise ValueError(
                f"{source}: the time coordinate is numeric ({var.dtype}) without CF units (e.g. 'hours since "
                f"1900-01-01'); its units are {units or 'missing'!r}"
            )
        try:
            decoded = xr.decode_cf(xr.Dataset(coords={TIME_DIM: var}))[TIME_DIM].variable
        except Exception as exc:  # xarray raises several types for undecodable units
            raise ValueError(f"{source}: cannot decode the time axis (units {units!r}, calendar {calendar!r}): {exc}") from None
        var = decoded
    if var.dtype == object:
        if calendar not in _STANDARD_CALENDARS:
            raise ValueError(
                f"{source}: the time axis uses the {calendar!r} calendar; ERA5 data needs the standard "
                "(proleptic Gregorian) calendar"
            )
        try:
            values = xr.CFTimeIndex(np.asarray(var.values)).to_datetimeindex(time_unit="ns")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: cannot convert the time axis to datetime64: {exc}") from None
        var = xr.Variable(var.dims, np.asarray(values, dtype="datetime64[ns]"))
    return ds.assign_coords({TIME_DIM: (TIME_DIM, np.asarray(var.values), {})})


def _canonical_longitudes(lon: np.ndarray, source: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(order, values)``: the permutation of the longitude axis and its canonical values
    (ascending in ``[0, 360)``, or contiguous from the western edge for a regional grid that
    crosses the prime meridian)."""
    wrapped = np.mod(lon, 360.0)
    order = np.argsort(wrapped, kind="stable")
    sorted_lon = wrapped[order]
    if np.any(np.diff(sorted_lon) <= 0):
        raise ValueError(f"{source}: longitudes repeat after wrapping to [0, 360): {lon}")
    if sorted_lon.size < 3:
        return order, sorted_lon
    gaps = np.append(np.diff(sorted_lon), sorted_lon[0] + 360.0 - sorted_lon[-1])
    widest = int(np.argmax(gaps))
    if widest == gaps.size - 1 or gaps[widest] <= 1.5 * float(np.median(gaps[:-1])):
        return order, sorted_lon  # global, or a regional grid that does not cross 0°
    start = widest + 1  # a regional grid across 0°: begin at its western edge
    order = np.concatenate([order[start:], order[:start]])
    return order, np.concatenate([sorted_lon[start:] - 360.0, sorted_lon[:start]])


# ----------------------------------------------------------------------------------------------
# Variables
# ----------------------------------------------------------------------------------------------


def _recognise(name: str, da: xr.DataArray, has_level: bool) -> Tuple[Optional[str], str, bool]:
    """``(canonical, how, in_metres)`` of one data variable; ``canonical`` None: ``how`` says why."""
    routes = [("name", name)]
    for attr in ("standard_name", "long_name"):
        if _attr(da, attr):
            routes.append((f"{attr} attribute", _attr(da, attr)))
    for route, text in routes:
        candidates = variable_candidates(text)
        if not candidates:
            continue
        if route != "name":
            how = f"{route} {text!r}"
        else:
            how = "name" if resolve_variable(text) is not None else (
                "CF standard name" if any(text.lower() in [n.lower() for n in VARIABLES[c].standard_names +
                                                           VARIABLES[c].metres_standard_names] for c in candidates)
                else "ECMWF long name")
        wanted = [c for c in candidates if (VARIABLES[c].kind == "pressure") == has_level]
        canonical = (wanted or candidates)[0]
        if canonical == "geopotential" and not has_level:
            canonical, how = "geopotential_at_surface", f"{how}; no level axis: the surface geopotential"
        elif len(candidates) > 1:
            how += "; has a level axis" if has_level else "; no level axis"
        return canonical, how, is_metres_name(canonical, text)
    tried = [f"{route} {text!r}" for route, text in routes[1:]]
    return None, "not an ERA5 variable: unknown name" + (f", {', '.join(tried)}" if tried else
                                                          ", no standard_name or long_name attribute"), False


def canonicalize_dataset(
    ds: xr.Dataset, *, keep_unknown: bool = False, source: str = "dataset", ensemble_member: EnsembleMember = None,
) -> xr.Dataset:
    """Return the canonical view (see the module docstring) of one opened ERA5 dataset.

    Renames coordinates and variables, decodes a numeric time axis, selects ``ensemble_member``
    (``None``: an ensemble dimension of several members is an error; an index; ``"mean"``),
    squeezes other size-1 foreign dimensions (``step``, ``expver``), sorts latitude ascending and
    longitude as described above, converts levels given in Pa to hPa, drops the time axis of
    constant fields and drops variables that are not ERA5 fields (unless ``keep_unknown``). All
    lazy. ``source`` names the file in errors. ``ds.encoding["era5_variables"]`` lists a
    :class:`VariableMatch` for every data variable of the file; ``ds.encoding["era5_ensemble"]``
    is ``(dimension, members)`` when the file had an ensemble dimension.
    """
    ensemble_member = parse_ensemble_member(ensemble_member)
    # 1. Coordinates.
    renames: Dict[str, str] = {}
    dropped: List[str] = []
    taken: List[str] = []
    for canonical in (LAT_DIM, LON_DIM, LEVEL_DIM, TIME_DIM):
        found = _find_coordinate(ds, canonical, taken)
        if found is None:
            continue
        taken.append(found)
        # Other aliases that are plain (non-dimension) coordinates, e.g. cfgrib's valid_time next
        # to a time dimension, would clash with the rename: drop them.
        for alias in COORDINATE_ALIASES[canonical]:
            if alias != found and alias in ds.coords and alias not in ds.dims:
                dropped.append(alias)
        if found != canonical:
            renames[found] = canonical
    # a non-dimension variable already holding a canonical name the rename needs, e.g. a 'time'
    # (forecast reference time) coordinate next to a 'valid_time' axis
    dropped += [c for c in renames.values() if c in ds.variables and c not in ds.dims and c not in dropped]
    if dropped:
        ds = ds.drop_vars(list(dict.fromkeys(dropped)))
    if renames:
        ds = ds.rename(renames)
    for needed in (LAT_DIM, LON_DIM):
        if needed not in ds.dims:
            raise ValueError(
                f"{source}: no {needed} dimension (looked for {list(COORDINATE_ALIASES[needed])} and CF attributes "
                f"standard_name/units); dimensions present: {dict(ds.sizes)}"
            )
    if TIME_DIM in ds.coords and TIME_DIM not in ds.dims:
        ds = ds.drop_vars(TIME_DIM)  # scalar time coordinate of a single-time file without a time dim
    ds = _decode_time(ds, source)

    # 2. Ensemble members, then other foreign singleton dims; drop foreign coordinates.
    canonical_dims = {TIME_DIM, LEVEL_DIM, LAT_DIM, LON_DIM}
    ensemble_dims = [str(d) for d in ds.dims if d in ENSEMBLE_DIMS or (
        d in ds.coords and _attr(ds[d], "standard_name").lower() == "realization")]
    ensemble_info: Optional[Tuple[str, int]] = None
    if len(ensemble_dims) > 1:
        raise ValueError(f"{source}: several ensemble dimensions {ensemble_dims}")
    if ensemble_dims:
        dim = ensemble_dims[0]
        members = int(ds.sizes[dim])
        ensemble_info = (dim, members)
        if ensemble_member is None and members > 1:
            raise ValueError(
                f"{source}: the data has an ensemble dimension {dim!r} with {members} members; choose one with "
                f"data.ensemble_member=<index 0..{members - 1}> or average them with data.ensemble_member=mean "
                "(tools: --ensemble-member)"
            )
        if isinstance(ensemble_member, int):
            if ensemble_member >= members:
                raise ValueError(
                    f"{source}: ensemble member {ensemble_member} does not exist; the ensemble dimension {dim!r} has "
                    f"{members} members (0..{members - 1})"
                )
            ds = ds.isel({dim: ensemble_member}, drop=True)
        elif ensemble_member == "mean" and members > 1:
            for name in [n for n, v in ds.data_vars.items() if dim in v.dims]:
                ds[name] = _ensemble_mean(ds[name], dim)
            ds = ds.drop_dims(dim) if dim in ds.dims else ds
        else:
            ds = ds.isel({dim: 0}, drop=True)
    singleton = [d for d, n in ds.sizes.items() if d not in canonical_dims and n == 1]
    if singleton:
        ds = ds.isel({d: 0 for d in singleton}, drop=True)
    foreign_coords = [c for c in ds.coords if c not in canonical_dims]
    if foreign_coords:
        ds = ds.drop_vars(foreign_coords)

    # 3. Variables.
    scalar_level = LEVEL_DIM in ds.coords and ds[LEVEL_DIM].ndim == 0
    var_renames: Dict[str, str] = {}
    drop_vars: List[str] = []
    matches: List[VariableMatch] = []
    in_metres: List[str] = []
    for name, da in ds.data_vars.items():
        name = str(name)
        if LAT_DIM not in da.dims or LON_DIM not in da.dims:
            matches.append(VariableMatch(name, None, f"no latitude/longitude axes (dims {list(da.dims)})"))
            if not keep_unknown:
                drop_vars.append(name)
            continue
        canonical, how, metres = _recognise(name, da, LEVEL_DIM in da.dims or scalar_level)
        if canonical is None:
            matches.append(VariableMatch(name, None, how))
            if not keep_unknown:
                drop_vars.append(name)
            continue
        owner = next((k for k, v in var_renames.items() if v == canonical), None)
        if owner is None and canonical in ds.data_vars and canonical != name:
            owner = canonical
        if owner is not None:
            raise ValueError(f"{source}: variables {owner!r} and {name!r} both mean {canonical!r}")
        matches.append(VariableMatch(name, canonical, how))
        if metres:
            in_metres.append(canonical)
        if canonical != name:
            var_renames[name] = canonical
    if drop_vars:
        ds = ds.drop_vars(drop_vars)
    if var_renames:
        ds = ds.rename(var_renames)
    if scalar_level:
        level_value = float(ds[LEVEL_DIM].values)
        expanded = {
            str(n): _with_level_axis(da.drop_vars(LEVEL_DIM), level_value)
            for n, da in ds.data_vars.items()
            if n in VARIABLES and VARIABLES[str(n)].kind == "pressure" and LEVEL_DIM not in da.dims
        }
        ds = ds.drop_vars(LEVEL_DIM)
        for n, da in expanded.items():
            ds[n] = da

    for name, da in ds.data_vars.items():
        var = VARIABLES.get(str(name))
        if var is None:
            continue
        foreign = [d for d in da.dims if d not in canonical_dims]
        if foreign:
            raise ValueError(
                f"{source}: variable {name!r} has dimensions {list(da.dims)}; only {sorted(canonical_dims)} (and size-1 "
                f"extras) are understood, and {foreign} is none of them (a time axis is recognised by the names "
                f"{list(COORDINATE_ALIASES[TIME_DIM])} or by CF attributes: standard_name 'time', axis 'T' or units "
                f"'<unit> since <date>'; an ensemble axis by the names {list(ENSEMBLE_DIMS)})"
            )
        if var.kind == "pressure" and LEVEL_DIM not in da.dims:
            raise ValueError(f"{source}: pressure-level variable {name!r} has no level dimension (dims {list(da.dims)})")
        if var.kind == "constant" and LEVEL_DIM in da.dims:
            raise ValueError(f"{source}: constant field {name!r} has a level dimension")

    # 4. Constants lose their time axis.
    for name in [n for n, v in ds.data_vars.items() if n in VARIABLES and VARIABLES[str(n)].kind == "constant"]:
        if TIME_DIM in ds[name].dims:
            ds[name] = ds[name].isel({TIME_DIM: 0}, drop=True)
    if TIME_DIM in ds.dims and not any(TIME_DIM in v.dims for v in ds.data_vars.values()):
        ds = ds.isel({TIME_DIM: 0}, drop=True)  # a constants-only file: forget its time axis

    # 5. Orography in metres -> geopotential.
    if "geopotential_at_surface" in ds.data_vars:
        units = str(ds["geopotential_at_surface"].attrs.get("units", "")).strip().lower()
        if units in _METRE_UNITS or ("geopotential_at_surface" in in_metres and units in ("",)):
            attrs = dict(ds["geopotential_at_surface"].attrs, units="m**2 s**-2")
            ds["geopotential_at_surface"] = (ds["geopotential_at_surface"].load() * GRAVITY).assign_attrs(attrs)

    # 6. Coordinate values.
    if LEVEL_DIM in ds.coords:
        levels = np.asarray(ds[LEVEL_DIM].values, dtype=np.float64)
        units = str(ds[LEVEL_DIM].attrs.get("units", "")).lower()
        if units in ("pa", "pascal", "pascals") or (levels.size and levels.max() > 2000.0):
            levels = levels / 100.0
        if levels.size and np.all(np.isclose(levels, np.round(levels))):
            new_levels: np.ndarray = np.round(levels).astype(np.int64)
        else:
            new_levels = levels
        ds = ds.assign_coords({LEVEL_DIM: (LEVEL_DIM, new_levels, {"units": "hPa", "long_name": "pressure level"})})
    lat = np.asarray(ds[LAT_DIM].values, dtype=np.float64)
    if lat.size > 1 and lat[0] > lat[-1]:
        ds = ds.isel({LAT_DIM: slice(None, None, -1)})
        lat = lat[::-1]
    if lat.size > 1 and np.any(np.diff(lat) <= 0):
        raise ValueError(f"{source}: latitude is not monotonic: {lat}")
    lon = np.asarray(ds[LON_DIM].values, dtype=np.float64)
    order, new_lon = _canonical_longitudes(lon, source)
    if not np.array_equal(order, np.arange(lon.size)):
        ds = ds.isel({LON_DIM: order})
    ds = ds.assign_coords(
        {
            LAT_DIM: (LAT_DIM, lat, {"units": "degrees_north", "long_name": "latitude"}),
            LON_DIM: (LON_DIM, new_lon, {"units": "degrees_east", "long_name": "longitude"}),
        }
    )
    if TIME_DIM in ds.coords and not np.issubdtype(ds[TIME_DIM].dtype, np.datetime64):
        raise ValueError(
            f"{source}: time coordinate has dtype {ds[TIME_DIM].dtype}; ERA5 data needs a standard "
            "(proleptic Gregorian) calendar decoded to datetime64"
        )
    ds.encoding["era5_variables"] = matches
    ds.encoding["era5_ensemble"] = ensemble_info
    return ds

"""ERA5 naming: canonical variables, their aliases, channel names and the canonical dataset view.

ERA5 data reaches users under several naming conventions (CDS netCDF short names, WeatherBench 2
long names, cfgrib's GRIB names, WeatherBench 1 files). This module maps all of them onto one
canonical view so the rest of the code never sees the difference.

**Canonical view** of a dataset (what :func:`canonicalize_dataset` returns):

* data variables use the WeatherBench 2 / CDS long names (``geopotential``, ``temperature``,
  ``2m_temperature``, ``land_sea_mask``, ``geopotential_at_surface``, ...);
* coordinates are ``time`` (datetime64), ``level`` (pressure in hPa), ``latitude`` and
  ``longitude`` (degrees);
* **latitude runs south-to-north (ascending)**, as in the WeatherBench 1 5.625° files and the
  output of ``tools/regrid_era5.py``; row 0 of every tensor is the southernmost latitude;
* longitude is in ``[0, 360)`` and ascending (``-180..180`` inputs are wrapped and re-sorted);
* constant fields (``land_sea_mask``, ``geopotential_at_surface``) carry no time axis; if a file
  stores them with one (CDS downloads do), the first time step is used;
* ``geopotential_at_surface`` is in m² s⁻²; a WeatherBench 1 ``orography`` field in metres
  (``units="m"``) is multiplied by g = 9.80665;
* dimensions are *not* transposed (a lazy transpose would turn into vectorized indexing over the
  whole array); readers select by dimension name and transpose the small loaded result.

Every step is lazy (renames and ``isel``), so opening a 0.25° archive costs nothing.

**Channels** are named ``<short>_<level>`` for pressure-level variables (``z_500``, ``t_850``)
and ``<short>`` for surface and constant fields (``t2m``, ``u10``, ``lsm``, ``orography``).
:func:`parse_channel` also accepts long forms (``geopotential_500``, ``2m_temperature``).

**Default channel set** (:data:`DEFAULT_ERA5_CHANNELS`, 80 channels, variable-major, levels from
the top of the atmosphere down): z, t, u, v, q on the 15 pressure levels
:data:`DEFAULT_PRESSURE_LEVELS` = the 13 WeatherBench 2 levels
(50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000 hPa) plus 70 hPa (lower
stratosphere) and 975 hPa (boundary layer), all standard ERA5 levels; then t2m, u10, v10, lsm,
orography.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

__all__ = [
    "ERA5Variable",
    "ChannelSpec",
    "VARIABLES",
    "DEFAULT_PRESSURE_LEVELS",
    "DEFAULT_PRESSURE_VARIABLES",
    "DEFAULT_SURFACE_VARIABLES",
    "DEFAULT_CONSTANT_VARIABLES",
    "DEFAULT_ERA5_CHANNELS",
    "STANDARD_ERA5_LEVELS",
    "GRAVITY",
    "TIME_DIM",
    "LEVEL_DIM",
    "LAT_DIM",
    "LON_DIM",
    "register_variable",
    "resolve_variable",
    "parse_channel",
    "parse_channels",
    "channel_name",
    "make_channel_list",
    "canonicalize_dataset",
    "regular_latlon_grid",
]

GRAVITY = 9.80665  # m s^-2, the ECMWF value

TIME_DIM = "time"
LEVEL_DIM = "level"
LAT_DIM = "latitude"
LON_DIM = "longitude"

#: Coordinate aliases -> canonical coordinate name.
COORDINATE_ALIASES: Dict[str, Tuple[str, ...]] = {
    TIME_DIM: ("time", "valid_time"),
    LEVEL_DIM: ("level", "pressure_level", "isobaricInhPa", "plev", "lev"),
    LAT_DIM: ("latitude", "lat"),
    LON_DIM: ("longitude", "lon"),
}

#: The 37 pressure levels (hPa) ERA5 publishes.
STANDARD_ERA5_LEVELS: Tuple[int, ...] = (
    1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100, 125, 150, 175, 200, 225, 250, 300, 350, 400, 450, 500,
    550, 600, 650, 700, 750, 775, 800, 825, 850, 875, 900, 925, 950, 975, 1000,
)


@dataclass(frozen=True)
class ERA5Variable:
    """One physical ERA5 field.

    ``name`` is the canonical (WeatherBench 2 / CDS long) name, ``channel`` the prefix used in
    channel names, ``short`` the CDS short name written by ``--naming short``, ``aliases`` every
    other name it is found under. ``kind`` is ``"pressure"`` (has a level axis), ``"surface"``
    (time-varying, no level) or ``"constant"`` (no time, no level).
    """

    name: str
    channel: str
    short: str
    kind: str
    units: str
    aliases: Tuple[str, ...] = ()

    @property
    def all_names(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys((self.name, self.channel, self.short) + self.aliases))


VARIABLES: Dict[str, ERA5Variable] = {}
_ALIAS_TO_NAME: Dict[str, str] = {}
_CHANNEL_TO_NAME: Dict[str, str] = {}


def register_variable(var: ERA5Variable) -> None:
    """Add a variable to the registry (e.g. for a project-specific field). Names must be unique."""
    if var.kind not in ("pressure", "surface", "constant"):
        raise ValueError(f"ERA5Variable {var.name!r}: kind must be pressure|surface|constant, got {var.kind!r}")
    for alias in var.all_names:
        owner = _ALIAS_TO_NAME.get(alias)
        if owner is not None and owner != var.name:
            raise ValueError(f"ERA5 variable alias {alias!r} is already used by {owner!r}")
    VARIABLES[var.name] = var
    for alias in var.all_names:
        _ALIAS_TO_NAME[alias] = var.name
    _CHANNEL_TO_NAME[var.channel] = var.name


for _v in (
    ERA5Variable("geopotential", "z", "z", "pressure", "m**2 s**-2"),
    ERA5Variable("temperature", "t", "t", "pressure", "K"),
    ERA5Variable("u_component_of_wind", "u", "u", "pressure", "m s**-1"),
    ERA5Variable("v_component_of_wind", "v", "v", "pressure", "m s**-1"),
    ERA5Variable("specific_humidity", "q", "q", "pressure", "kg kg**-1"),
    ERA5Variable("relative_humidity", "r", "r", "pressure", "%"),
    ERA5Variable("vertical_velocity", "w", "w", "pressure", "Pa s**-1"),
    ERA5Variable("2m_temperature", "t2m", "t2m", "surface", "K", ("2t",)),
    ERA5Variable("10m_u_component_of_wind", "u10", "u10", "surface", "m s**-1", ("10u",)),
    ERA5Variable("10m_v_component_of_wind", "v10", "v10", "surface", "m s**-1", ("10v",)),
    ERA5Variable("mean_sea_level_pressure", "msl", "msl", "surface", "Pa"),
    ERA5Variable("surface_pressure", "sp", "sp", "surface", "Pa"),
    ERA5Variable("total_precipitation", "tp", "tp", "surface", "m"),
    ERA5Variable("toa_incident_solar_radiation", "tisr", "tisr", "surface", "J m**-2"),
    ERA5Variable("land_sea_mask", "lsm", "lsm", "constant", "1"),
    ERA5Variable(
        "geopotential_at_surface", "orography", "orography", "constant", "m**2 s**-2",
        ("z_surface", "surface_geopotential", "oro"),
    ),
):
    register_variable(_v)

DEFAULT_PRESSURE_LEVELS: Tuple[int, ...] = (50, 70, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 975, 1000)
DEFAULT_PRESSURE_VARIABLES: Tuple[str, ...] = ("z", "t", "u", "v", "q")
DEFAULT_SURFACE_VARIABLES: Tuple[str, ...] = ("t2m", "u10", "v10")
DEFAULT_CONSTANT_VARIABLES: Tuple[str, ...] = ("lsm", "orography")


# ----------------------------------------------------------------------------------------------
# Channels
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelSpec:
    """A parsed channel: ``name`` (canonical, e.g. ``z_500``), its variable and level (hPa)."""

    name: str
    variable: str
    level: Optional[int]

    @property
    def info(self) -> ERA5Variable:
        return VARIABLES[self.variable]

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant"


def resolve_variable(name: str) -> Optional[str]:
    """Canonical variable name for any known alias (case-insensitive fallback), else ``None``."""
    if name in _ALIAS_TO_NAME:
        return _ALIAS_TO_NAME[name]
    lowered = {k.lower(): v for k, v in _ALIAS_TO_NAME.items()}
    return lowered.get(name.lower())


def channel_name(variable: str, level: Optional[float] = None) -> str:
    """Channel name of ``variable`` (any alias) at ``level`` hPa: ``("geopotential", 500) -> "z_500"``."""
    canonical = resolve_variable(variable)
    if canonical is None:
        raise ValueError(f"unknown ERA5 variable {variable!r}; known: {sorted(VARIABLES)}")
    var = VARIABLES[canonical]
    if var.kind == "pressure":
        if level is None:
            raise ValueError(f"variable {canonical!r} is on pressure levels; a level is required")
        return f"{var.channel}_{_format_level(level)}"
    if level is not None:
        raise ValueError(f"variable {canonical!r} is a {var.kind} field; it has no level")
    return var.channel


def _format_level(level: float) -> str:
    return str(int(level)) if float(level).is_integer() else f"{float(level):g}"


_LEVEL_SUFFIX = re.compile(r"^(?P<prefix>.+)_(?P<level>\d+(?:\.\d+)?)$")


def parse_channel(channel: str) -> ChannelSpec:
    """Parse a channel name into its variable and level.

    ``"z_500"`` and ``"geopotential_500"`` -> ``ChannelSpec("z_500", "geopotential", 500)``;
    ``"t2m"`` and ``"2m_temperature"`` -> ``ChannelSpec("t2m", "2m_temperature", None)``.
    """
    if not isinstance(channel, str) or not channel:
        raise ValueError(f"channel names must be non-empty strings, got {channel!r}")
    match = _LEVEL_SUFFIX.match(channel)
    if match:
        canonical = resolve_variable(match.group("prefix"))
        if canonical is not None and VARIABLES[canonical].kind == "pressure":
            level_f = float(match.group("level"))
            level = int(level_f) if level_f.is_integer() else level_f
            return ChannelSpec(channel_name(canonical, level), canonical, level)  # type: ignore[arg-type]
    canonical = resolve_variable(channel)
    if canonical is not None:
        var = VARIABLES[canonical]
        if var.kind == "pressure":
            raise ValueError(
                f"channel {channel!r} names the pressure-level variable {canonical!r} without a level; "
                f"write it as '{var.channel}_<hPa>', e.g. '{var.channel}_500'"
            )
        return ChannelSpec(var.channel, canonical, None)
    known = sorted({v.channel for v in VARIABLES.values()})
    hint = difflib.get_close_matches(channel.split("_")[0], known, n=1)
    raise ValueError(
        f"unknown ERA5 channel {channel!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; channels are '<var>_<hPa>' for pressure variables {[v.channel for v in VARIABLES.values() if v.kind == 'pressure']} "
        f"or one of {[v.channel for v in VARIABLES.values() if v.kind != 'pressure']}"
    )


def parse_channels(channels: Iterable[str]) -> List[ChannelSpec]:
    """Parse a channel list; duplicates (after canonicalization) are an error."""
    specs = [parse_channel(c) for c in channels]
    seen: Dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise ValueError(f"channel {spec.name!r} appears twice in the channel list (positions {seen[spec.name]} and {i})")
        seen[spec.name] = i
    return specs


def make_channel_list(
    pressure_variables: Sequence[str] = DEFAULT_PRESSURE_VARIABLES,
    levels: Sequence[int] = DEFAULT_PRESSURE_LEVELS,
    surface_variables: Sequence[str] = DEFAULT_SURFACE_VARIABLES,
    constant_variables: Sequence[str] = DEFAULT_CONSTANT_VARIABLES,
) -> List[str]:
    """Variable-major channel list: every pressure variable on every level, then surface, then constants."""
    out = [channel_name(v, lvl) for v in pressure_variables for lvl in levels]
    out += [channel_name(v) for v in surface_variables]
    out += [channel_name(v) for v in constant_variables]
    return out


DEFAULT_ERA5_CHANNELS: Tuple[str, ...] = tuple(make_channel_list())
assert len(DEFAULT_ERA5_CHANNELS) == 80


# ----------------------------------------------------------------------------------------------
# Canonical dataset view
# ----------------------------------------------------------------------------------------------


def _find_coordinate(ds: xr.Dataset, canonical: str) -> Optional[str]:
    """The dataset's name for a canonical coordinate, preferring one that is a dimension."""
    candidates = [n for n in COORDINATE_ALIASES[canonical] if n in ds.dims or n in ds.coords]
    dims = [n for n in candidates if n in ds.dims]
    if len(dims) > 1:
        raise ValueError(f"dataset has several dimensions that mean {canonical!r}: {dims}")
    if dims:
        return dims[0]
    return candidates[0] if candidates else None


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
        out_axis = sum(1 for k in key[: self.axis] if not isinstance(k, (int, np.integer)))
        return np.take(np.expand_dims(arr, out_axis), np.arange(1)[new_key], axis=out_axis)


def _with_level_axis(da: xr.DataArray, level: float) -> xr.DataArray:
    """Give a single-level field (a scalar ``level`` coordinate) a lazy size-1 level dimension."""
    axis = 1 if da.dims and da.dims[0] == TIME_DIM else 0
    dims = da.dims[:axis] + (LEVEL_DIM,) + da.dims[axis:]
    data = indexing.LazilyIndexedArray(_LazyNewAxis(da.variable, axis))
    coords = {d: da[d].values for d in da.dims if d in da.coords}
    coords[LEVEL_DIM] = np.array([level])
    return xr.DataArray(xr.Variable(dims, data, attrs=da.attrs), coords=coords, name=da.name)


def canonicalize_dataset(ds: xr.Dataset, *, keep_unknown: bool = False, source: str = "dataset") -> xr.Dataset:
    """Return the canonical view (see the module docstring) of one opened ERA5 dataset.

    Renames coordinates and variables, squeezes size-1 foreign dimensions (``number``, ``step``,
    ``expver``), sorts latitude ascending (south-to-north) and longitude into ``[0, 360)``, converts
    levels given in Pa to hPa, drops the time axis of constant fields and drops variables that are
    not ERA5 fields (unless ``keep_unknown``). All lazy. ``source`` names the file in errors.
    """
    # 1. Coordinates.
    renames: Dict[str, str] = {}
    dropped: List[str] = []
    for canonical in (TIME_DIM, LEVEL_DIM, LAT_DIM, LON_DIM):
        found = _find_coordinate(ds, canonical)
        if found is None:
            continue
        # Other aliases that are plain (non-dimension) coordinates, e.g. cfgrib's valid_time next
        # to a time dimension, would clash with the rename: drop them.
        for alias in COORDINATE_ALIASES[canonical]:
            if alias != found and alias in ds.coords and alias not in ds.dims:
                dropped.append(alias)
        if found != canonical:
            renames[found] = canonical
    if dropped:
        ds = ds.drop_vars(dropped)
    if renames:
        ds = ds.rename(renames)
    for needed in (LAT_DIM, LON_DIM):
        if needed not in ds.dims:
            raise ValueError(
                f"{source}: no {needed} dimension (looked for {list(COORDINATE_ALIASES[needed])}); "
                f"dimensions present: {dict(ds.sizes)}"
            )
    if TIME_DIM in ds.coords and TIME_DIM not in ds.dims:
        ds = ds.drop_vars(TIME_DIM)  # scalar time coordinate of a single-time file without a time dim

    # 2. Squeeze foreign singleton dims; drop foreign coordinates.
    canonical_dims = {TIME_DIM, LEVEL_DIM, LAT_DIM, LON_DIM}
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
    for name, da in ds.data_vars.items():
        canonical = resolve_variable(str(name))
        # A geopotential without any level information is the surface geopotential (CDS
        # single-levels 'z'); with a scalar level coordinate it is one pressure level (WeatherBench 1).
        if canonical == "geopotential" and LEVEL_DIM not in da.dims and LAT_DIM in da.dims and not scalar_level:
            canonical = "geopotential_at_surface"
        if canonical is None or LAT_DIM not in da.dims or LON_DIM not in da.dims:
            if not keep_unknown:
                drop_vars.append(str(name))
            continue
        if canonical != name:
            if canonical in var_renames.values() or (canonical in ds.data_vars and canonical != name):
                raise ValueError(f"{source}: variables {name!r} and another both mean {canonical!r}")
            var_renames[str(name)] = canonical
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
                f"{source}: variable {name!r} has dimensions {list(da.dims)}; only "
                f"{sorted(canonical_dims)} (and size-1 extras) are understood"
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
        if units in ("m", "meter", "meters", "metre", "metres", "gpm"):
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
    wrapped = np.mod(lon, 360.0)
    if np.any(wrapped != lon) or np.any(np.diff(wrapped) <= 0):
        order = np.argsort(wrapped, kind="stable")
        if np.any(np.diff(wrapped[order]) <= 0):
            raise ValueError(f"{source}: longitudes repeat after wrapping to [0, 360): {lon}")
        ds = ds.isel({LON_DIM: order})
        lon = wrapped[order]
    ds = ds.assign_coords(
        {
            LAT_DIM: (LAT_DIM, lat, {"units": "degrees_north", "long_name": "latitude"}),
            LON_DIM: (LON_DIM, lon, {"units": "degrees_east", "long_name": "longitude"}),
        }
    )
    if TIME_DIM in ds.coords and not np.issubdtype(ds[TIME_DIM].dtype, np.datetime64):
        raise ValueError(
            f"{source}: time coordinate has dtype {ds[TIME_DIM].dtype}; ERA5 data needs a standard "
            "(proleptic Gregorian) calendar decoded to datetime64"
        )
    return ds


def regular_latlon_grid(resolution: float) -> Tuple[np.ndarray, np.ndarray]:
    """Cell-centre grid at ``resolution`` degrees, latitude ascending (WeatherBench convention).

    5.625 -> 32 latitudes -87.1875 .. 87.1875 and 64 longitudes 0 .. 354.375.
    """
    n_lat = int(round(180.0 / resolution))
    n_lon = int(round(360.0 / resolution))
    if n_lat < 1 or not np.isclose(n_lat * resolution, 180.0) or not np.isclose(n_lon * resolution, 360.0):
        raise ValueError(f"resolution {resolution} does not divide 180 and 360 degrees evenly")
    lat = -90.0 + resolution / 2.0 + resolution * np.arange(n_lat)
    lon = resolution * np.arange(n_lon)
    return lat, lon

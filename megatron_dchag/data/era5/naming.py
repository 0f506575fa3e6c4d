"""ERA5 naming: canonical variables, every name they are found under, and channel names.

ERA5 data reaches users under several naming conventions, and this module knows them all:

* WeatherBench 2 / CDS long names (``geopotential``, ``temperature``, ``2m_temperature``,
  ``land_sea_mask``, ``geopotential_at_surface``, ...), the canonical names;
* ECMWF / CDS short names (``z``, ``t``, ``u``, ``v``, ``q``, ``w``, ``2t``/``t2m``,
  ``10u``/``u10``, ``10v``/``v10``, ``lsm``; a level-less ``z`` is the surface geopotential);
* WeatherBench 1 names (``orography`` in metres, ``lsm``);
* CF standard names (``air_temperature``, ``eastward_wind``, ``northward_wind``,
  ``lagrangian_tendency_of_air_pressure``, ``land_binary_mask``, ``surface_altitude``, ...), as
  variable names or as ``standard_name`` attributes, and ECMWF ``long_name`` attributes
  (``"2 metre temperature"``, ``"U component of wind"``, ...).

A CF standard name may mean two fields: ``air_temperature`` is ``temperature`` on pressure levels
and ``2m_temperature`` without a level axis (likewise ``eastward_wind``/``northward_wind`` and
``geopotential``). :func:`variable_candidates` returns every field a name may mean; the canonical
view (:mod:`megatron_dchag.data.era5.canonical`) picks one by the presence of a level axis.

**Channels** are named ``<short>_<level>`` for pressure-level variables (``z_500``, ``t_850``)
and ``<short>`` for surface and constant fields (``t2m``, ``u10``, ``lsm``, ``orography``).
:func:`parse_channel` also accepts long forms (``geopotential_500``, ``2m_temperature``).

**Default channel set** (:data:`DEFAULT_ERA5_CHANNELS`, 80 channels, variable-major, levels from
the top of the atmosphere down): z, t, u, v, q on the 15 pressure levels
:data:`DEFAULT_PRESSURE_LEVELS` = the 13 WeatherBench 2 levels
(50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000 hPa) plus 70 hPa (lower
stratosphere) and 975 hPa (boundary layer), all standard ERA5 levels; then t2m, u10, v10, lsm,
orography.

Plain Python and numpy (no xarray), so the config layer can parse channel names cheaply.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "ERA5Variable",
    "ChannelSpec",
    "VARIABLES",
    "COORDINATE_ALIASES",
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
    "variable_candidates",
    "is_metres_name",
    "parse_channel",
    "parse_channels",
    "channel_name",
    "make_channel_list",
    "regular_latlon_grid",
]

GRAVITY = 9.80665  # m s^-2, the ECMWF value

TIME_DIM = "time"
LEVEL_DIM = "level"
LAT_DIM = "latitude"
LON_DIM = "longitude"

#: Coordinate aliases -> canonical coordinate name (CF attributes are recognised as well, see
#: :mod:`megatron_dchag.data.era5.canonical`).
COORDINATE_ALIASES: Dict[str, Tuple[str, ...]] = {
    TIME_DIM: ("time", "valid_time", "date", "datetime"),
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
    other variable name it is found under (each unique to this field). ``kind`` is
    ``"pressure"`` (has a level axis), ``"surface"`` (time-varying, no level) or ``"constant"``
    (no time, no level). ``standard_names`` are its CF standard names and ``long_names`` the
    ``long_name`` attributes ECMWF files give it; both may be shared with the field's pressure or
    surface counterpart (``air_temperature``). ``metres_standard_names`` are CF standard names
    whose values are in metres and need multiplying by g (``surface_altitude``).
    """

    name: str
    channel: str
    short: str
    kind: str
    units: str
    aliases: Tuple[str, ...] = ()
    standard_names: Tuple[str, ...] = ()
    long_names: Tuple[str, ...] = ()
    metres_standard_names: Tuple[str, ...] = ()

    @property
    def all_names(self) -> Tuple[str, ...]:
        """The variable names unique to this field (canonical, channel, short, aliases)."""
        return tuple(dict.fromkeys((self.name, self.channel, self.short) + self.aliases))

    @property
    def standard_name(self) -> Optional[str]:
        """The CF standard name written by ``--naming cf`` (the first of ``standard_names``)."""
        return self.standard_names[0] if self.standard_names else None


VARIABLES: Dict[str, ERA5Variable] = {}
_ALIAS_TO_NAME: Dict[str, str] = {}
_CHANNEL_TO_NAME: Dict[str, str] = {}
# lower-cased CF standard name / long_name -> the canonical fields it may mean, in registry order
_DESCRIPTION_TO_NAMES: Dict[str, List[str]] = {}


def _key(text: str) -> str:
    return " ".join(str(text).replace("_", " ").split()).lower()


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
    for text in var.standard_names + var.metres_standard_names + var.long_names:
        names = _DESCRIPTION_TO_NAMES.setdefault(_key(text), [])
        if var.name not in names:
            names.append(var.name)


for _v in (
    ERA5Variable("geopotential", "z", "z", "pressure", "m**2 s**-2",
                 standard_names=("geopotential",), long_names=("Geopotential",)),
    ERA5Variable("temperature", "t", "t", "pressure", "K", ("ta",),
                 standard_names=("air_temperature",), long_names=("Temperature",)),
    ERA5Variable("u_component_of_wind", "u", "u", "pressure", "m s**-1", ("ua",),
                 standard_names=("eastward_wind",), long_names=("U component of wind",)),
    ERA5Variable("v_component_of_wind", "v", "v", "pressure", "m s**-1", ("va",),
                 standard_names=("northward_wind",), long_names=("V component of wind",)),
    ERA5Variable("specific_humidity", "q", "q", "pressure", "kg kg**-1", ("hus",),
                 standard_names=("specific_humidity",), long_names=("Specific humidity",)),
    ERA5Variable("relative_humidity", "r", "r", "pressure", "%", ("hur",),
                 standard_names=("relative_humidity",), long_names=("Relative humidity",)),
    ERA5Variable("vertical_velocity", "w", "w", "pressure", "Pa s**-1", ("wap",),
                 standard_names=("lagrangian_tendency_of_air_pressure",), long_names=("Vertical velocity",)),
    ERA5Variable("2m_temperature", "t2m", "t2m", "surface", "K", ("2t", "tas"),
                 standard_names=("air_temperature",), long_names=("2 metre temperature",)),
    ERA5Variable("10m_u_component_of_wind", "u10", "u10", "surface", "m s**-1", ("10u", "uas"),
                 standard_names=("eastward_wind",), long_names=("10 metre U wind component",)),
    ERA5Variable("10m_v_component_of_wind", "v10", "v10", "surface", "m s**-1", ("10v", "vas"),
                 standard_names=("northward_wind",), long_names=("10 metre V wind component",)),
    ERA5Variable("mean_sea_level_pressure", "msl", "msl", "surface", "Pa", ("psl",),
                 standard_names=("air_pressure_at_mean_sea_level",), long_names=("Mean sea level pressure",)),
    ERA5Variable("surface_pressure", "sp", "sp", "surface", "Pa", ("ps",),
                 standard_names=("surface_air_pressure",), long_names=("Surface pressure",)),
    ERA5Variable("total_precipitation", "tp", "tp", "surface", "m",
                 standard_names=("lwe_thickness_of_precipitation_amount",), long_names=("Total precipitation",)),
    ERA5Variable("toa_incident_solar_radiation", "tisr", "tisr", "surface", "J m**-2",
                 long_names=("TOA incident solar radiation",)),
    ERA5Variable("land_sea_mask", "lsm", "lsm", "constant", "1", (),
                 standard_names=("land_binary_mask",), long_names=("Land-sea mask",)),
    ERA5Variable(
        "geopotential_at_surface", "orography", "orography", "constant", "m**2 s**-2",
        ("z_surface", "oro", "surface_geopotential"),
        standard_names=("surface_geopotential", "geopotential"), long_names=("Geopotential", "Orography"),
        metres_standard_names=("surface_altitude",),
    ),
):
    register_variable(_v)

DEFAULT_PRESSURE_LEVELS: Tuple[int, ...] = (50, 70, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 975, 1000)
DEFAULT_PRESSURE_VARIABLES: Tuple[str, ...] = ("z", "t", "u", "v", "q")
DEFAULT_SURFACE_VARIABLES: Tuple[str, ...] = ("t2m", "u10", "v10")
DEFAULT_CONSTANT_VARIABLES: Tuple[str, ...] = ("lsm", "orography")


def variable_candidates(text: str) -> List[str]:
    """Every canonical field ``text`` may mean, as a variable name, CF standard name or long name.

    A unique name (canonical, short or alias, case-insensitive fallback) gives one field; a CF
    standard name or long name may give two, e.g. ``air_temperature`` -> ``["temperature",
    "2m_temperature"]``. Unknown text gives ``[]``.
    """
    canonical = resolve_variable(text)
    if canonical is not None:
        return [canonical]
    return list(_DESCRIPTION_TO_NAMES.get(_key(text), []))


def is_metres_name(variable: str, text: str) -> bool:
    """Whether ``text`` is a CF standard name of ``variable`` whose values are in metres."""
    return _key(text) in {_key(n) for n in VARIABLES[variable].metres_standard_names}


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

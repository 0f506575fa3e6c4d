"""Write an ERA5-shaped synthetic dataset with physically plausible, predictable dynamics.

For tests and the demo. All 80 default channels (z, t, u, v, q on 15 levels; t2m, u10, v10;
land-sea mask and orography) on a regular cell-centre grid (default 5.625°, 32×64), 6-hourly,
written with ERA5 / WeatherBench naming as zarr or netCDF.

The fields are built so that persistence has real error but the evolution is learnable:

* **Temperature**: a zonal-mean state (warm tropics, cold poles, a seasonal cycle of opposite
  sign in the two hemispheres, larger over land, tropospheric lapse rate with a tropopause
  floor), plus **eastward-travelling Rossby-like waves** (several zonal wavenumbers, each
  confined to a latitude band with its own phase speed: 4–14 m/s in mid-latitudes, a fast
  eastward Kelvin-like and a slow westward wave in the tropics), whose amplitudes breathe with
  periods of 8–20 days and are stronger in the winter hemisphere, tilting westward with height;
  and a **diurnal cycle** at the surface (by local solar time, strong over land, decaying with
  height).
* **Geopotential**: hydrostatic integration of temperature from a 1000 hPa field with
  subtropical highs and subpolar lows — so z is consistent with t.
* **Wind**: geostrophic from z (u, v on every level; jets follow the temperature gradient);
  10 m wind is the 1000 hPa wind reduced by friction (more over land) and turned toward low
  pressure.
* **Humidity**: Clausius–Clapeyron saturation at the local temperature times a relative
  humidity that decreases with height and follows the waves.
* Small white noise on every field (deterministic given ``--seed``).

A 6-hour step moves mid-latitude waves by about half a grid cell at 5.625°, so persistence has
a clear error at 6–24 h while a model that learns the advection can beat it.

The same data can be written in the shapes real ERA5 files have, for tests and for trying the
tools: ``--naming long|short|cf`` (WeatherBench 2 long names; CDS short names; CF standard names,
with ``standard_name``/``long_name`` attributes on every variable, where the 2 m temperature and
10 m winds are found by their attributes and the orography is ``surface_altitude`` in metres),
``--coords`` / ``--time-name`` (axis names), ``--numeric-time`` (the time axis stored as
``hours since 1900-01-01 00:00:00.0`` integers, as the CDS writes it), ``--ensemble N`` (an
ensemble dimension ``number`` of N members), ``--region LAT0 LAT1 LON0 LON1`` (a regional grid,
longitudes in -180..180 as the CDS writes a regional download) and ``--zarr-format 2|3``.

Usage::

    python tools/make_synthetic_era5.py --out data/synth.zarr --start 2018-01-01 --days 120 \\
        --hours 6 [--format zarr|netcdf] [--naming long|short|cf] [--coords default|short|cds|grib] \\
        [--time-name valid_time] [--numeric-time] [--ensemble 4] [--region 35 60 -12 20] \\
        [--latitude-order ascending|descending] [--split-files none|variable|year] [--zarr-format 2|3] \\
        [--resolution 5.625] [--levels 50,500,850] [--seed 0] [--overwrite]

(installed as the console script ``dchag-make-synthetic-era5`` with the same flags).
Writing 120 days at 32×64 takes a few seconds. Writes are atomic (a temporary path renamed into
place). Python API: :func:`generate_synthetic_era5`, :func:`add_ensemble`, :func:`select_region`,
:func:`apply_convention`, :func:`numeric_time_axis`, :func:`write_era5`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from megatron_dchag.data.era5.naming import (
    DEFAULT_PRESSURE_LEVELS,
    GRAVITY,
    VARIABLES,
    regular_latlon_grid,
)
from megatron_dchag.data.era5.zarr_io import ZARR_FORMATS, check_zarr_format

EARTH_RADIUS = 6.371e6  # m
OMEGA = 7.292e-5  # s^-1
R_DRY = 287.05  # J kg^-1 K^-1

# (zonal wavenumber, centre latitude, half-width deg, phase speed m/s at the centre, amplitude K)
WAVE_COMPONENTS = (
    (4, 50.0, 12.0, 7.0, 5.0),
    (6, 43.0, 10.0, 11.0, 4.0),
    (8, 38.0, 8.0, 14.0, 3.0),
    (3, 62.0, 9.0, 4.0, 3.0),
    (4, -50.0, 12.0, 8.0, 5.0),
    (6, -43.0, 10.0, 12.0, 4.0),
    (7, -38.0, 8.0, 13.0, 3.0),
    (3, -62.0, 9.0, 5.0, 3.0),
    (1, 0.0, 8.0, 18.0, 1.0),  # Kelvin-like, eastward
    (3, 8.0, 8.0, -6.0, 0.8),  # Rossby-like, westward
    (3, -8.0, 8.0, -6.0, 0.8),
)

PRESSURE_VARS = ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind", "specific_humidity")
SURFACE_VARS = ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind")
CONSTANT_VARS = ("land_sea_mask", "geopotential_at_surface")


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, phi: np.ndarray, lam: np.ndarray, max_m: int = 5, max_n: int = 4) -> np.ndarray:
    """A smooth random field on the sphere-ish grid, normalized to zero mean and unit std."""
    field = np.zeros((phi.size, lam.size))
    for m in range(0, max_m + 1):
        for n in range(1, max_n + 1):
            a = rng.normal() / (1.0 + m + n)
            field += a * np.cos(n * phi[:, None] + rng.uniform(0, 2 * np.pi)) * np.cos(m * lam[None, :] + rng.uniform(0, 2 * np.pi))
    return (field - field.mean()) / (field.std() + 1e-12)


def _constants(lat: np.ndarray, lon: np.ndarray, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0457]))
    phi, lam = np.deg2rad(lat), np.deg2rad(lon)
    land = _smooth_field(rng, phi, lam)
    threshold = np.quantile(land, 0.7)
    lsm = 1.0 / (1.0 + np.exp(-(land - threshold) / 0.12))
    lsm = np.where(lat[:, None] < -66.0, 1.0, lsm)
    lsm = np.clip(lsm, 0.0, 1.0)
    relief = _smooth_field(rng, phi, lam, max_m=8, max_n=6)
    height = lsm * (250.0 + 1800.0 * np.clip(relief + 0.5, 0.0, None))  # metres
    height = np.where(lat[:, None] < -66.0, 2500.0 + 300.0 * relief, height)
    height = np.clip(height, 0.0, None)
    return {"land_sea_mask": lsm, "geopotential_at_surface": GRAVITY * height}


def _wave_params(seed: int) -> List[Dict[str, float]]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x3A7E]))
    params = []
    for m, lat_c, width, speed, amp in WAVE_COMPONENTS:
        params.append(
            dict(
                m=m, lat_c=lat_c, width=width, amp=amp,
                # angular phase speed (rad of longitude per hour) of a wave moving at `speed` m/s at lat_c
                omega=speed / (EARTH_RADIUS * np.cos(np.deg2rad(lat_c))) * 3600.0,
                phase=rng.uniform(0, 2 * np.pi),
                mod_period=rng.uniform(8.0, 20.0) * 24.0,
                mod_phase=rng.uniform(0, 2 * np.pi),
            )
        )
    return params


def _saturation_vapour_pressure(temp: np.ndarray) -> np.ndarray:
    """hPa, Bolton (1980)."""
    return 6.112 * np.exp(17.67 * (temp - 273.15) / (temp - 29.65))


class _Generator:
    def __init__(self, lat: np.ndarray, lon: np.ndarray, levels: Sequence[float], seed: int):
        self.lat, self.lon = lat, lon
        self.phi = np.deg2rad(lat)[:, None]  # [H, 1]
        self.lam = np.deg2rad(lon)[None, :]  # [1, W]
        self.levels = np.asarray(sorted(levels), dtype=np.float64)  # ascending hPa, as ERA5 stores them
        self.seed = seed
        self.const = _constants(lat, lon, seed)
        self.waves = _wave_params(seed)
        self.height = self.const["geopotential_at_surface"] / GRAVITY

    def wave_sum(self, hours: np.ndarray, doy: np.ndarray, p: np.ndarray, shift: float = 0.0, weight_by_amp: bool = True) -> np.ndarray:
        """Σ_k amp_k · envelope_k(φ) · A_k(t) · cos(m λ − m ω t + α + tilt(p) + shift) -> [T, P, H, W]."""
        t = hours[:, None, None, None]
        season = np.cos(2 * np.pi * (doy - 15.0) / 365.25)[:, None, None, None]
        tilt = 0.3 * np.log(1000.0 / p)[None, :, None, None]
        out = np.zeros((len(hours), len(p), self.lat.size, self.lon.size))
        for w in self.waves:
            env = np.exp(-(((np.rad2deg(self.phi) - w["lat_c"]) / w["width"]) ** 2))[None, None]
            mod = 1.0 + 0.35 * np.sin(2 * np.pi * t / w["mod_period"] + w["mod_phase"])
            mod = mod * (1.0 + 0.25 * season * np.sign(w["lat_c"]))
            phase = w["m"] * (self.lam[None, None] - w["omega"] * t) + w["phase"] + tilt + shift
            out += (w["amp"] if weight_by_amp else 1.0) * env * mod * np.cos(phase)
        return out

    def temperature(self, hours: np.ndarray, doy: np.ndarray, utc_hour: np.ndarray, p: np.ndarray) -> np.ndarray:
        """[T, P, H, W] in K."""
        phi = self.phi[None, None]
        lsm = self.const["land_sea_mask"][None, None]
        season = np.cos(2 * np.pi * (doy - 15.0) / 365.25)[:, None, None, None]
        pp = p[None, :, None, None]
        near_surface = np.exp(-(1000.0 - pp) / 200.0)
        t_sfc = 300.0 - 45.0 * np.sin(phi) ** 2 - (10.0 + 8.0 * lsm * near_surface) * season * np.sin(phi)
        t_trop = t_sfc * (pp / 1000.0) ** 0.19
        t_floor = 200.0 + 18.0 * np.sin(phi) ** 2 + 8.0 * np.log(np.maximum(100.0 / pp, 1.0))
        base = np.maximum(t_trop, t_floor)
        vert = (0.6 + 0.4 * np.exp(-((np.log(pp / 500.0) / 0.8) ** 2))) * np.sqrt(np.minimum(1.0, pp / 150.0))
        waves = vert * self.wave_sum(hours, doy, p)
        local_hour = (utc_hour[:, None, None, None] + np.rad2deg(self.lam)[None, None] / 15.0) % 24.0
        diurnal = (1.0 + 4.0 * lsm) * np.cos(phi) * np.exp(-(1000.0 - pp) / 60.0) * np.cos(2 * np.pi * (local_hour - 15.0) / 24.0)
        return base + waves + diurnal

    def geopotential(self, temp: np.ndarray, hours: np.ndarray, doy: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Hydrostatic integration of ``temp`` [T, P, H, W] (levels ``p`` ascending) from 1000 hPa."""
        absphi = np.abs(np.rad2deg(self.phi))[None, None]
        z1000 = GRAVITY * (100.0 + 70.0 * np.exp(-(((absphi - 32.0) / 12.0) ** 2)) - 60.0 * np.exp(-(((absphi - 62.0) / 10.0) ** 2)))
        z1000 = z1000 + GRAVITY * 8.0 * self.wave_sum(hours, doy, np.array([1000.0]), shift=-np.pi / 2, weight_by_amp=False)
        z = np.empty_like(temp)
        order = np.argsort(-p)  # bottom (largest p) first
        prev_p, prev_t, prev_z = 1000.0, None, z1000[:, 0]
        for k in order:
            t_k = temp[:, k]
            t_layer = t_k if prev_t is None else 0.5 * (t_k + prev_t)
            prev_z = prev_z + R_DRY * t_layer * np.log(prev_p / p[k])
            z[:, k] = prev_z
            prev_p, prev_t = p[k], t_k
        return z

    def geostrophic_wind(self, z: np.ndarray) -> np.ndarray:
        """u, v [2, T, P, H, W] from z [T, P, H, W]."""
        phi = self.phi[:, 0]
        dz_dphi = np.gradient(z, phi, axis=-2)
        dlam = np.deg2rad(self.lon[1] - self.lon[0]) if self.lon.size > 1 else 1.0
        dz_dlam = (np.roll(z, -1, axis=-1) - np.roll(z, 1, axis=-1)) / (2 * dlam)
        # 1/f regularized near the equator (f / (f^2 + f0^2)): balanced winds fade out smoothly there.
        f = 2 * OMEGA * np.sin(phi)
        f0 = 2 * OMEGA * np.sin(np.deg2rad(10.0))
        inv_f = (f / (f**2 + f0**2))[:, None]
        u = -dz_dphi * inv_f / EARTH_RADIUS
        # cos(lat) floored at 0.3 so zonal gradients near the poles do not blow up the meridional wind.
        v = dz_dlam * inv_f / (EARTH_RADIUS * np.maximum(np.cos(phi), 0.3)[:, None])
        return np.stack([u, v])

    def specific_humidity(self, temp: np.ndarray, hours: np.ndarray, doy: np.ndarray, p: np.ndarray) -> np.ndarray:
        pp = p[None, :, None, None]
        lsm = self.const["land_sea_mask"][None, None]
        rh = 0.8 - 0.55 * (1.0 - pp / 1000.0) - 0.1 * lsm + 0.06 * self.wave_sum(hours, doy, p, shift=np.pi / 2)
        rh = np.clip(rh, 0.03, 0.98)
        e = rh * _saturation_vapour_pressure(temp)
        e = np.minimum(e, 0.5 * pp)
        q = 0.622 * e / (pp - 0.378 * e)
        return np.maximum(q, 2.5e-6)

    def block(self, times: pd.DatetimeIndex) -> Dict[str, np.ndarray]:
        hours = ((times - pd.Timestamp("2000-01-01")) / pd.Timedelta(hours=1)).to_numpy(dtype=np.float64)
        doy = (times.day_of_year - 1 + times.hour / 24.0).to_numpy(dtype=np.float64)
        utc_hour = (times.hour + times.minute / 60.0).to_numpy(dtype=np.float64)
        p = self.levels
        temp = self.temperature(hours, doy, utc_hour, p)
        z = self.geopotential(temp, hours, doy, p)
        u, v = self.geostrophic_wind(z)
        q = self.specific_humidity(temp, hours, doy, p)
        # Surface fields from the 1000 hPa state.
        p_sfc = np.array([1000.0])
        t_sfc = self.temperature(hours, doy, utc_hour, p_sfc)
        z_sfc = self.geopotential(t_sfc, hours, doy, p_sfc)
        u_sfc, v_sfc = self.geostrophic_wind(z_sfc)
        lsm = self.const["land_sea_mask"][None]
        t2m = t_sfc[:, 0] - 0.0065 * self.height[None]
        factor = 0.7 - 0.3 * lsm
        angle = np.deg2rad(20.0) * np.where(self.phi >= 0, 1.0, -1.0)[None]  # turn toward low pressure
        u10 = factor * (u_sfc[:, 0] * np.cos(angle) - v_sfc[:, 0] * np.sin(angle))
        v10 = factor * (u_sfc[:, 0] * np.sin(angle) + v_sfc[:, 0] * np.cos(angle))
        fields = {
            "geopotential": z, "temperature": temp, "u_component_of_wind": u, "v_component_of_wind": v,
            "specific_humidity": q, "2m_temperature": t2m, "10m_u_component_of_wind": u10, "10m_v_component_of_wind": v10,
        }
        self._add_noise(fields, times)
        return fields

    def _add_noise(self, fields: Dict[str, np.ndarray], times: pd.DatetimeIndex) -> None:
        scales = {
            "geopotential": 15.0, "temperature": 0.25, "u_component_of_wind": 0.4, "v_component_of_wind": 0.4,
            "specific_humidity": 0.02, "2m_temperature": 0.25, "10m_u_component_of_wind": 0.25, "10m_v_component_of_wind": 0.25,
        }
        stamp = (times - pd.Timestamp("1970-01-01")) // pd.Timedelta(hours=1)
        for i, hour in enumerate(np.asarray(stamp)):
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(hour), 0x401CE]))
            for name, scale in scales.items():
                shape = fields[name].shape[1:]
                noise = rng.standard_normal(shape, dtype=np.float32)
                if name == "specific_humidity":
                    fields[name][i] *= 1.0 + scale * noise
                else:
                    fields[name][i] += scale * noise


def generate_synthetic_era5(
    start: str = "2018-01-01",
    days: float = 120,
    hours: int = 6,
    resolution: float = 5.625,
    seed: int = 0,
    levels: Sequence[float] = DEFAULT_PRESSURE_LEVELS,
    block_size: int = 32,
) -> xr.Dataset:
    """The synthetic dataset in memory, canonical naming (WeatherBench 2 long names, latitude ascending).

    Every time step depends only on its timestamp and ``seed`` (not on ``start`` or blocking).
    """
    if hours <= 0 or days <= 0:
        raise ValueError(f"days ({days}) and hours ({hours}) must be positive")
    n_times = int(round(days * 24 / hours))
    if n_times < 1:
        raise ValueError(f"{days} days at {hours}-hourly steps is less than one time step")
    times = pd.date_range(pd.Timestamp(start), periods=n_times, freq=f"{hours}h")
    lat, lon = regular_latlon_grid(resolution)
    gen = _Generator(lat, lon, levels, seed)
    n_lev, h, w = len(gen.levels), lat.size, lon.size
    out = {name: np.empty((n_times, n_lev, h, w), np.float32) for name in PRESSURE_VARS}
    out.update({name: np.empty((n_times, h, w), np.float32) for name in SURFACE_VARS})
    for b in range(0, n_times, block_size):
        fields = gen.block(times[b : b + block_size])
        for name, arr in fields.items():
            out[name][b : b + block_size] = arr
    data_vars = {}
    for name in PRESSURE_VARS:
        data_vars[name] = (("time", "level", "latitude", "longitude"), out[name], {"units": VARIABLES[name].units})
    for name in SURFACE_VARS:
        data_vars[name] = (("time", "latitude", "longitude"), out[name], {"units": VARIABLES[name].units})
    for name in CONSTANT_VARS:
        data_vars[name] = (("latitude", "longitude"), gen.const[name].astype(np.float32), {"units": VARIABLES[name].units})
    levels_coord = gen.levels.astype(np.int64) if np.all(gen.levels == np.round(gen.levels)) else gen.levels
    return xr.Dataset(
        data_vars,
        coords={
            "time": times,
            "level": ("level", levels_coord, {"units": "hPa"}),
            "latitude": ("latitude", lat, {"units": "degrees_north"}),
            "longitude": ("longitude", lon, {"units": "degrees_east"}),
        },
        attrs={"title": "megatron_dchag synthetic ERA5", "seed": seed, "resolution_deg": resolution},
    )


# ----------------------------------------------------------------------------------------------
# Naming conventions and writing
# ----------------------------------------------------------------------------------------------

COORD_CONVENTIONS = {
    "default": {"time": "time", "level": "level", "latitude": "latitude", "longitude": "longitude"},
    "short": {"time": "time", "level": "level", "latitude": "lat", "longitude": "lon"},
    "cds": {"time": "valid_time", "level": "pressure_level", "latitude": "latitude", "longitude": "longitude"},
    "grib": {"time": "time", "level": "isobaricInhPa", "latitude": "latitude", "longitude": "longitude"},
}


NAMINGS = ("long", "short", "cf")
# --naming cf: a field whose CF standard name another field of the file already uses is named
# <standard name>_<height> and found by its standard_name attribute.
CF_HEIGHT_SUFFIX = {"2m_temperature": "2m", "10m_u_component_of_wind": "10m", "10m_v_component_of_wind": "10m"}


def _cf_names(ds: xr.Dataset) -> xr.Dataset:
    """CF standard names as variable names, ``standard_name``/``long_name`` attributes on every
    variable; the orography becomes ``surface_altitude`` in metres."""
    renames: Dict[str, str] = {}
    for name in ds.data_vars:
        var = VARIABLES[str(name)]
        attrs = dict(ds[name].attrs, long_name=var.long_names[0])
        if var.name == "geopotential_at_surface":
            ds[name] = (ds[name] / GRAVITY).assign_attrs(attrs, units="m", standard_name="surface_altitude",
                                                        long_name="Surface altitude")
            renames[str(name)] = "surface_altitude"
            continue
        ds[name] = ds[name].assign_attrs(attrs, standard_name=var.standard_name)
        suffix = CF_HEIGHT_SUFFIX.get(var.name)
        renames[str(name)] = f"{var.standard_name}_{suffix}" if suffix else var.standard_name
    return ds.rename(renames)


def apply_convention(
    ds: xr.Dataset,
    naming: str = "long",
    coords: str = "default",
    latitude_order: str = "ascending",
    coord_names: Optional[Dict[str, str]] = None,
    time_name: Optional[str] = None,
) -> xr.Dataset:
    """Rename a canonical dataset into a file convention.

    ``naming``: ``"long"`` (WeatherBench 2 / CDS long names), ``"short"`` (CDS short names:
    z, t, u, v, q, t2m, u10, v10, lsm, orography, with ``long_name`` attributes as the CDS writes
    them) or ``"cf"`` (see :func:`_cf_names`). ``coords``: a key of :data:`COORD_CONVENTIONS`, or
    explicit ``coord_names`` (canonical -> file name); ``time_name`` renames the time axis on top.
    ``latitude_order``: ``"ascending"`` (south-to-north, WeatherBench) or ``"descending"``
    (north-to-south, as ERA5 from the CDS).
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {', '.join(NAMINGS)}, got {naming!r}")
    if latitude_order not in ("ascending", "descending"):
        raise ValueError(f"latitude_order must be 'ascending' or 'descending', got {latitude_order!r}")
    names = dict(COORD_CONVENTIONS[coords]) if coord_names is None else dict(coord_names)
    if time_name:
        names["time"] = time_name
    if (latitude_order == "descending") == bool(ds["latitude"].values[0] < ds["latitude"].values[-1]):
        ds = ds.isel(latitude=slice(None, None, -1))
    if naming == "short":
        ds = ds.rename({n: VARIABLES[n].short for n in ds.data_vars if n in VARIABLES})
        for name in ds.data_vars:
            ds[name].attrs["long_name"] = VARIABLES[VARIABLES_BY_SHORT[str(name)]].long_names[0]
    elif naming == "cf":
        ds = _cf_names(ds.copy())
    return ds.rename({k: v for k, v in names.items() if k in ds.dims and k != v})


VARIABLES_BY_SHORT = {v.short: v.name for v in VARIABLES.values()}


def add_ensemble(ds: xr.Dataset, members: int, seed: int = 0, spread: float = 0.02) -> xr.Dataset:
    """An ensemble dimension ``number`` (0 .. members-1, first) on every time-varying field: member
    ``k`` is the field plus deterministic noise of ``spread`` times the field's standard deviation."""
    if members < 1:
        raise ValueError(f"ensemble members must be >= 1, got {members}")
    out = {}
    for name, da in ds.data_vars.items():
        if "time" not in da.dims:
            out[name] = da
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, members, 0xE45]))
        base = da.values
        noise = rng.standard_normal((members,) + base.shape).astype(np.float32) * np.float32(spread * float(base.std()))
        out[name] = xr.DataArray((base[None] + noise).astype(base.dtype), dims=("number",) + da.dims, attrs=da.attrs)
    return xr.Dataset(out, coords=dict(ds.coords, number=("number", np.arange(members))), attrs=ds.attrs)


def select_region(ds: xr.Dataset, lat0: float, lat1: float, lon0: float, lon1: float) -> xr.Dataset:
    """The grid points within latitudes ``[lat0, lat1]`` and longitudes ``[lon0, lon1]`` (degrees
    east; ``lon0 > lon1`` or negative values cross the prime meridian). Longitudes are written in
    ``-180 .. 180``, west to east, as the CDS writes a regional download."""
    if not (-90.0 <= lat0 < lat1 <= 90.0):
        raise ValueError(f"region latitudes must satisfy -90 <= LAT0 < LAT1 <= 90, got {lat0} {lat1}")
    lat, lon = ds["latitude"].values, ds["longitude"].values
    west = np.mod(lon - lon0, 360.0)
    width = np.mod(lon1 - lon0, 360.0) or 360.0
    keep_lon = np.flatnonzero(west <= width)
    keep_lon = keep_lon[np.argsort(west[keep_lon], kind="stable")]
    keep_lat = np.flatnonzero((lat >= lat0) & (lat <= lat1))
    if keep_lat.size < 2 or keep_lon.size < 2:
        raise ValueError(f"region {lat0} {lat1} {lon0} {lon1} holds fewer than 2x2 grid points")
    out = ds.isel(latitude=keep_lat, longitude=keep_lon)
    new_lon = np.mod(out["longitude"].values + 180.0, 360.0) - 180.0
    return out.assign_coords(longitude=("longitude", new_lon, out["longitude"].attrs))


def numeric_time_axis(ds: xr.Dataset, time_dim: str, units: str = "hours since 1900-01-01 00:00:00.0") -> xr.Dataset:
    """The time axis as integers in CF ``units`` with a ``calendar`` attribute (how the CDS stores it)."""
    times = pd.DatetimeIndex(ds[time_dim].values)
    origin = pd.Timestamp(units.split("since", 1)[1].strip())
    step = pd.Timedelta(1, unit=units.split()[0].rstrip("s")[0])
    values = ((times - origin) // step).to_numpy().astype(np.int64)
    attrs = {"units": units, "calendar": "gregorian", "standard_name": "time", "long_name": "time"}
    return ds.assign_coords({time_dim: (time_dim, values, attrs)})


def _encoding(ds: xr.Dataset, fmt: str) -> Dict[str, Dict]:
    enc: Dict[str, Dict] = {}
    for name, da in ds.data_vars.items():
        if fmt == "zarr":
            # One time step per chunk: random access reads one step per variable.
            time_axis = next((i for i, d in enumerate(da.dims) if d not in ("number",)), 0) if da.ndim > 2 else None
            enc[str(name)] = {"chunks": tuple(1 if i == time_axis or (d == "number") else n
                                              for i, (d, n) in enumerate(zip(da.dims, da.shape)))}
        else:
            enc[str(name)] = {"zlib": False}
    return enc


def _time_dim(ds: xr.Dataset) -> str:
    """The time axis of a dataset in any of the conventions written here."""
    for dim in ds.dims:
        if dim in ds.coords and (np.issubdtype(ds[dim].dtype, np.datetime64) or " since " in str(ds[dim].attrs.get("units", ""))):
            return str(dim)
    raise ValueError("the dataset has no time axis")


def _atomic_target(out: Path, overwrite: bool):
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _commit(tmp: Path, out: Path) -> None:
    """Move ``tmp`` (a file or directory) into place at ``out``, replacing what was there."""
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    os.replace(tmp, out)
    if backup is not None:
        shutil.rmtree(backup) if backup.is_dir() else backup.unlink()


def write_era5(
    ds: xr.Dataset,
    out: os.PathLike,
    fmt: str = "zarr",
    split_files: str = "none",
    overwrite: bool = False,
    zarr_format: int = 2,
) -> List[Path]:
    """Write ``ds`` (already in the wanted convention) atomically; returns the written paths.

    ``fmt="zarr"``: one store at ``out`` in ``zarr_format`` 2 or 3. ``fmt="netcdf"`` with
    ``split_files="none"``: one file ``out``; ``"variable"`` / ``"year"``: a directory ``out`` of
    one file per variable / year.
    """
    out = Path(out)
    if fmt == "zarr":
        check_zarr_format(zarr_format, "zarr_format")
    if fmt not in ("zarr", "netcdf"):
        raise ValueError(f"format must be 'zarr' or 'netcdf', got {fmt!r}")
    if split_files not in ("none", "variable", "year"):
        raise ValueError(f"split_files must be none|variable|year, got {split_files!r}")
    if fmt == "zarr" and split_files != "none":
        raise ValueError("zarr output is one store; split_files applies to netCDF")
    tmp_dir = _atomic_target(out, overwrite)
    try:
        if fmt == "zarr":
            store = tmp_dir / "store.zarr"
            ds.to_zarr(store, mode="w", encoding=_encoding(ds, "zarr"), zarr_format=zarr_format,
                       consolidated=zarr_format == 2)
            _commit(store, out)
            return [out]
        if split_files == "none":
            target = tmp_dir / "data.nc"
            ds.to_netcdf(target, encoding=_encoding(ds, "netcdf"))
            _commit(target, out)
            return [out]
        pieces: Dict[str, xr.Dataset] = {}
        if split_files == "variable":
            for name in ds.data_vars:
                pieces[f"{name}.nc"] = ds[[name]]
        else:
            time_dim = _time_dim(ds)
            years = pd.DatetimeIndex(xr.decode_cf(ds[[time_dim]])[time_dim].values).year
            for year in sorted(set(years)):
                pieces[f"{year}.nc"] = ds.isel({time_dim: np.flatnonzero(years == year)})
        folder = tmp_dir / "data"
        folder.mkdir()
        for fname, piece in pieces.items():
            piece.to_netcdf(folder / fname, encoding=_encoding(piece, "netcdf"))
        _commit(folder, out)
        return sorted(out.iterdir())
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output zarr store, netCDF file, or directory (split files)")
    parser.add_argument("--start", default="2018-01-01")
    parser.add_argument("--days", type=float, default=120)
    parser.add_argument("--hours", type=int, default=6, help="time step in hours")
    parser.add_argument("--format", choices=("zarr", "netcdf"), default="zarr")
    parser.add_argument("--naming", choices=NAMINGS, default="long",
                        help="variable names: WeatherBench 2 long names, CDS short names, or CF standard names")
    parser.add_argument("--coords", choices=sorted(COORD_CONVENTIONS), default="default")
    parser.add_argument("--time-name", default=None, help="name of the time axis (e.g. valid_time)")
    parser.add_argument("--numeric-time", action="store_true",
                        help="store the time axis as integer 'hours since 1900-01-01 00:00:00.0' (CF units)")
    parser.add_argument("--ensemble", type=int, default=None, metavar="N",
                        help="add an ensemble dimension 'number' with N members")
    parser.add_argument("--region", type=float, nargs=4, default=None, metavar=("LAT0", "LAT1", "LON0", "LON1"),
                        help="write only this latitude/longitude box (degrees; LON0 > LON1 or negative crosses 0°)")
    parser.add_argument("--zarr-format", type=int, choices=ZARR_FORMATS, default=2)
    parser.add_argument("--latitude-order", choices=("ascending", "descending"), default="ascending")
    parser.add_argument("--split-files", choices=("none", "variable", "year"), default="none")
    parser.add_argument("--resolution", type=float, default=5.625)
    parser.add_argument("--levels", default=None, help="comma-separated hPa levels (default: the 15 default levels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        levels = DEFAULT_PRESSURE_LEVELS if args.levels is None else [float(x) for x in args.levels.split(",") if x]
        t0 = time.perf_counter()
        ds = generate_synthetic_era5(args.start, args.days, args.hours, args.resolution, args.seed, levels)
        if args.region is not None:
            ds = select_region(ds, *args.region)
        if args.ensemble is not None:
            ds = add_ensemble(ds, args.ensemble, args.seed)
        ds = apply_convention(ds, args.naming, args.coords, args.latitude_order, time_name=args.time_name)
        time_dim = args.time_name or COORD_CONVENTIONS[args.coords]["time"]
        if args.numeric_time:
            ds = numeric_time_axis(ds, time_dim)
        written = write_era5(ds, args.out, args.format, args.split_files, args.overwrite, args.zarr_format)
    except (ValueError, FileExistsError, ImportError) as exc:
        print(f"make_synthetic_era5: error: {exc}", file=sys.stderr)
        return 2
    n_t = ds.sizes[time_dim]
    print(
        f"wrote {len(written)} path(s) at {args.out}: {n_t} times x {len(levels)} levels x "
        f"{ds.sizes[[d for d in ds.dims if 'lat' in d][0]]}x{ds.sizes[[d for d in ds.dims if 'lon' in d][0]]} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

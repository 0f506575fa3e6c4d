"""Regrid ERA5 data (0.25°, 721×1440, or any regular lat/lon grid) to a coarser grid, as zarr.

The default target is the WeatherBench 5.625° grid: 32×64 cell centres, latitude
-87.1875 .. 87.1875 (ascending, south-to-north), longitude 0 .. 354.375. ``--resolution R`` gives
the analogous ``180/R × 360/R`` grid (2.8125 -> 64×128, 1.40625 -> 128×256); ``--target-grid
PATH`` copies the grid of another dataset.

Interpolation is **bilinear** in (latitude, longitude), **periodic in longitude**:

* ``--backend xesmf``: xESMF/ESMF bilinear (``periodic=True``), used by ``auto`` when xESMF
  imports;
* ``--backend scipy``: xarray's ``interp`` (scipy, linear along latitude then longitude) on the
  source grid padded by one wrapped column on each side. Target latitudes beyond the outermost
  source rows take the value of that row (constant extrapolation).

On a smooth field both agree to within interpolation error; tests check the scipy path against
the analytic field. ``--method nearest`` is also offered.

Input is anything :func:`megatron_dchag.data.era5.store.open_era5` reads (any naming convention, zarr or
netCDF, one file or many); output uses the canonical names (WeatherBench 2 long names,
``time/level/latitude/longitude``). The data is streamed one variable and ``--time-chunk`` time steps at a time, and
the store is written to a temporary directory next to ``--output`` and renamed into place only
when complete.

Usage::

    python tools/regrid_era5.py --input era5_0p25/ --output era5_5.625deg.zarr --resolution 5.625 \\
        [--method bilinear] [--backend auto|xesmf|scipy] [--time-chunk 8] [--overwrite]

(installed as the console script ``dchag-regrid-era5`` with the same flags).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import xarray as xr

from megatron_dchag.data.era5.naming import LAT_DIM, LON_DIM, TIME_DIM, regular_latlon_grid
from megatron_dchag.data.era5.store import open_era5

HAS_XESMF = importlib.util.find_spec("xesmf") is not None
METHODS = ("bilinear", "nearest")


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "xesmf" if HAS_XESMF else "scipy"
    if backend == "xesmf" and not HAS_XESMF:
        raise ImportError("--backend xesmf: xESMF is not installed (use --backend scipy or auto)")
    if backend not in ("xesmf", "scipy"):
        raise ValueError(f"backend must be auto|xesmf|scipy, got {backend!r}")
    return backend


def _pad_longitude(ds: xr.Dataset) -> xr.Dataset:
    """Add one wrapped column on each side so interpolation is periodic in longitude."""
    lon = ds[LON_DIM].values
    left = ds.isel({LON_DIM: [-1]}).assign_coords({LON_DIM: [lon[-1] - 360.0]})
    right = ds.isel({LON_DIM: [0]}).assign_coords({LON_DIM: [lon[0] + 360.0]})
    return xr.concat([left, ds, right], dim=LON_DIM, data_vars="all", coords="minimal", compat="override", join="override")


class Regridder:
    """Bilinear (or nearest) regridding of canonical ERA5 datasets onto ``(lat_out, lon_out)``."""

    def __init__(self, lat_in: np.ndarray, lon_in: np.ndarray, lat_out: np.ndarray, lon_out: np.ndarray,
                 method: str = "bilinear", backend: str = "auto"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.backend = method, resolve_backend(backend)
        self.lat_in, self.lon_in = np.asarray(lat_in, float), np.asarray(lon_in, float)
        self.lat_out, self.lon_out = np.asarray(lat_out, float), np.mod(np.asarray(lon_out, float), 360.0)
        self._xesmf: Any = None
        if self.backend == "xesmf":
            import xesmf as xe

            grid_in = xr.Dataset(coords={"lat": ("lat", self.lat_in), "lon": ("lon", self.lon_in)})
            grid_out = xr.Dataset(coords={"lat": ("lat", self.lat_out), "lon": ("lon", self.lon_out)})
            xe_method = "bilinear" if method == "bilinear" else "nearest_s2d"
            self._xesmf = xe.Regridder(grid_in, grid_out, xe_method, periodic=True)

    def __call__(self, ds: xr.Dataset) -> xr.Dataset:
        """Regrid every variable with latitude/longitude dims of an in-memory canonical dataset."""
        horizontal = [n for n, v in ds.data_vars.items() if LAT_DIM in v.dims and LON_DIM in v.dims]
        ds = ds[horizontal]
        if self.backend == "xesmf":
            moved = xr.Dataset(
                {n: ds[n].transpose(*[d for d in ds[n].dims if d not in (LAT_DIM, LON_DIM)], LAT_DIM, LON_DIM) for n in horizontal}
            ).rename({LAT_DIM: "lat", LON_DIM: "lon"})
            out = self._xesmf(moved, keep_attrs=True).rename({"lat": LAT_DIM, "lon": LON_DIM})
        else:
            padded = _pad_longitude(ds)
            lat_q = np.clip(self.lat_out, self.lat_in.min(), self.lat_in.max())
            method = "linear" if self.method == "bilinear" else "nearest"
            out = padded.interp({LAT_DIM: lat_q, LON_DIM: self.lon_out}, method=method, assume_sorted=True)
            out = out.assign_coords({LAT_DIM: self.lat_out})
        out = out.assign_coords({LAT_DIM: (LAT_DIM, self.lat_out, {"units": "degrees_north"}),
                                 LON_DIM: (LON_DIM, self.lon_out, {"units": "degrees_east"})})
        for name in horizontal:
            out[name] = out[name].astype(ds[name].dtype).assign_attrs(ds[name].attrs)
        return out


def target_grid(resolution: Optional[float], target_grid_path: Optional[str]) -> Tuple[np.ndarray, np.ndarray]:
    if target_grid_path:
        ref = open_era5(target_grid_path)
        return ref[LAT_DIM].values, ref[LON_DIM].values
    return regular_latlon_grid(5.625 if resolution is None else resolution)


def regrid_era5(
    input_paths: Sequence[str],
    output: str,
    resolution: Optional[float] = 5.625,
    method: str = "bilinear",
    backend: str = "auto",
    time_chunk: int = 8,
    overwrite: bool = False,
    target_grid_path: Optional[str] = None,
    log: Any = print,
) -> Path:
    """Regrid ``input_paths`` into the zarr store ``output`` (atomic). Returns the output path."""
    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ds = open_era5(list(input_paths) if not isinstance(input_paths, str) else input_paths)
    lat_out, lon_out = target_grid(resolution, target_grid_path)
    regridder = Regridder(ds[LAT_DIM].values, ds[LON_DIM].values, lat_out, lon_out, method, backend)
    log(
        f"regridding {len(ds.data_vars)} variables {ds.sizes[LAT_DIM]}x{ds.sizes[LON_DIM]} -> "
        f"{len(lat_out)}x{len(lon_out)} ({method}, backend {regridder.backend})"
    )
    timed = [n for n, v in ds.data_vars.items() if TIME_DIM in v.dims]
    static = [n for n in ds.data_vars if n not in timed]
    n_time = ds.sizes.get(TIME_DIM, 0) if timed else 0

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    store = tmp_dir / "store.zarr"
    try:
        first = True
        starts = range(0, n_time, max(1, time_chunk)) if timed else [None]
        t0 = time.perf_counter()
        for start in starts:
            # One variable at a time: memory holds one variable's chunk at the source resolution.
            names = (timed + (static if first else [])) if start is not None else static
            parts = []
            for name in names:
                piece = ds[[name]]
                if TIME_DIM in piece[name].dims:
                    piece = piece.isel({TIME_DIM: slice(start, start + time_chunk)})
                parts.append(regridder(piece.load()))
            result = xr.merge(parts, compat="override", join="exact")
            if first:
                encoding = {
                    n: {"chunks": tuple(1 if d == TIME_DIM else s for d, s in zip(result[n].dims, result[n].shape))}
                    for n in result.data_vars
                }
                result.attrs = {"regridded_from": f"{ds.sizes[LAT_DIM]}x{ds.sizes[LON_DIM]}", "regrid_method": method,
                                "regrid_backend": regridder.backend}
                result.to_zarr(store, mode="w", encoding=encoding, zarr_format=2, consolidated=True)
                first = False
            else:
                result.to_zarr(store, append_dim=TIME_DIM, zarr_format=2, consolidated=True)
            if start is not None:
                done = min(start + time_chunk, n_time)
                log(f"  {done}/{n_time} time steps ({time.perf_counter() - t0:.1f}s)")
        backup = None
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, backup)
        os.replace(store, out)
        if backup is not None:
            shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log(f"wrote {out}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, nargs="+", help="zarr store(s), netCDF file(s), directories or globs")
    parser.add_argument("--output", required=True, help="output zarr store (e.g. OUT.zarr)")
    parser.add_argument("--resolution", type=float, default=5.625, help="target grid spacing in degrees (default 5.625)")
    parser.add_argument("--target-grid", default=None, help="take the target latitude/longitude from this dataset instead")
    parser.add_argument("--method", choices=METHODS, default="bilinear")
    parser.add_argument("--backend", choices=("auto", "xesmf", "scipy"), default="auto")
    parser.add_argument("--time-chunk", type=int, default=8,
                        help="time steps per streamed chunk (memory: one variable x chunk at the source resolution)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            regrid_era5(args.input, args.output, args.resolution, args.method, args.backend, args.time_chunk,
                        args.overwrite, args.target_grid)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"regrid_era5: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

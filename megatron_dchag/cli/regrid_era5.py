"""Regrid ERA5 data (0.25°, 721×1440, or any regular lat/lon grid) to a coarser grid, as zarr.

The default target is the WeatherBench 5.625° grid: 32×64 cell centres, latitude
-87.1875 .. 87.1875 (ascending, south-to-north), longitude 0 .. 354.375. ``--resolution R`` gives
the analogous ``180/R × 360/R`` grid (2.8125 -> 64×128, 1.40625 -> 128×256); ``--target-grid
PATH`` copies the grid of another dataset. ``--region LAT0 LAT1 LON0 LON1`` keeps only the target
points inside that box (degrees; a negative or wrapped ``LON0`` crosses the prime meridian, and
the output longitudes then run contiguously from the western edge, e.g. -11.5 .. 19.5).

**Regional sources.** A source grid that does not cover the globe (a CDS download of Europe,
35–60°N, 12°W–20°E) is refused unless every target point lies inside it: values outside would be
extrapolated, not interpolated. Ask for a regional target inside it with ``--region``. A global
source may miss the last half cell at the poles (a cell-centre grid); target latitudes there
take the value of the outermost row.

Interpolation is **bilinear** in (latitude, longitude), **periodic in longitude** for a global
source:

* ``--backend xesmf``: xESMF/ESMF bilinear, used by ``auto`` when xESMF imports;
* ``--backend scipy``: xarray's ``interp`` (scipy, linear along latitude then longitude) on the
  source grid padded by one wrapped column on each side when it is global.

On a smooth field both agree to within interpolation error; tests check the scipy path against
the analytic field. ``--method nearest`` is also offered.

Input is anything :func:`megatron_dchag.data.era5.store.open_era5` reads (any naming convention,
zarr format 2 or 3 or netCDF, one file or many, ``--ensemble-member`` for ensembles). The tool
prints one line for every variable of the input: what it is kept as and how it was recognised,
or why it is dropped. Output uses the canonical names (WeatherBench 2 long names,
``time/level/latitude/longitude``), in zarr format ``--zarr-format`` (2, the default, or 3; 3
needs zarr-python >= 3), with only the chunk layout as encoding (nothing of the input's encoding
is copied). Provenance attributes (``regrid_*``) are written with every time chunk. The data is
streamed one variable and ``--time-chunk`` time steps at a time, and the store is written to a
temporary directory next to ``--output`` and renamed into place only when complete.

Usage::

    python tools/regrid_era5.py --input era5_0p25/ --output era5_5.625deg.zarr --resolution 5.625 \\
        [--region 35 60 -12 20] [--method bilinear] [--backend auto|xesmf|scipy] [--time-chunk 8] \\
        [--zarr-format 2|3] [--ensemble-member 0|mean] [--overwrite]

(installed as the console script ``dchag-regrid-era5`` with the same flags).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import xarray as xr

from megatron_dchag.data.era5.naming import LAT_DIM, LON_DIM, TIME_DIM, regular_latlon_grid
from megatron_dchag.data.era5.store import open_era5
from megatron_dchag.data.era5.zarr_io import ZARR_FORMATS, check_zarr_format, clean_encoding

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


# ----------------------------------------------------------------------------------------------
# Grids: what a source covers, and targets inside it
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridExtent:
    """What a regular lat/lon grid covers. Longitudes are contiguous and ascending (a grid across
    0° starts at its western edge, as the canonical view keeps it)."""

    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float
    periodic: bool
    """The longitudes go all the way round (one more step closes the circle)."""
    reaches_poles: bool
    """The outermost rows lie within half a grid step (plus rounding) of both poles."""

    @property
    def is_global(self) -> bool:
        return self.periodic and self.reaches_poles

    def describe(self) -> str:
        return (f"latitude {self.lat_min:g}..{self.lat_max:g}, longitude {self.lon_min:g}..{self.lon_max:g}"
                + (" (global)" if self.is_global else ""))


def grid_extent(lat: np.ndarray, lon: np.ndarray) -> GridExtent:
    lat, lon = np.asarray(lat, float), np.asarray(lon, float)
    dlat = float(np.median(np.abs(np.diff(lat)))) if lat.size > 1 else 180.0
    dlon = float(np.median(np.diff(lon))) if lon.size > 1 else 360.0
    tol = 1e-6 + 1e-3 * dlat
    periodic = lon.size > 1 and abs((lon[-1] - lon[0]) + dlon - 360.0) <= 1e-3 * dlon + 1e-6
    reaches = lat.min() - dlat / 2 <= -90.0 + tol and lat.max() + dlat / 2 >= 90.0 - tol
    return GridExtent(float(lat.min()), float(lat.max()), float(lon[0]), float(lon[-1]), periodic, reaches)


def region_of_grid(lat: np.ndarray, lon: np.ndarray, region: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """The points of the grid ``(lat, lon)`` inside ``region = (LAT0, LAT1, LON0, LON1)``;
    longitudes returned contiguously from ``LON0`` (``LON0 + east offset``)."""
    lat0, lat1, lon0, lon1 = (float(x) for x in region)
    if not -90.0 <= lat0 < lat1 <= 90.0:
        raise ValueError(f"--region latitudes must satisfy -90 <= LAT0 < LAT1 <= 90, got {lat0:g} {lat1:g}")
    width = np.mod(lon1 - lon0, 360.0) or 360.0
    east = np.mod(np.asarray(lon, float) - lon0, 360.0)
    keep = np.sort(east[east <= width + 1e-9])
    lat = np.asarray(lat, float)
    lat_in = lat[(lat >= lat0 - 1e-9) & (lat <= lat1 + 1e-9)]
    if lat_in.size < 1 or keep.size < 1:
        raise ValueError(f"--region {lat0:g} {lat1:g} {lon0:g} {lon1:g} holds no point of the target grid")
    return lat_in, lon0 + keep


def _east_of(lon: np.ndarray, west: float, eps: float = 1e-6) -> np.ndarray:
    """Degrees east of ``west`` in ``[0, 360)`` (a point a rounding error west of it counts as 0)."""
    return np.mod(np.asarray(lon, float) - west + eps, 360.0) - eps


def check_target_inside(source: GridExtent, lat_out: np.ndarray, lon_out: np.ndarray, what: str) -> None:
    """Refuse (one ValueError line) a target that reaches outside a regional source."""
    lat_out, lon_out = np.asarray(lat_out, float), np.asarray(lon_out, float)
    eps = 1e-6
    lat_ok = source.reaches_poles or (lat_out.min() >= source.lat_min - eps and lat_out.max() <= source.lat_max + eps)
    lon_ok = source.periodic or bool(np.all(_east_of(lon_out, source.lon_min) <= source.lon_max - source.lon_min + eps))
    if lat_ok and lon_ok:
        return
    target = grid_extent(lat_out, lon_out) if lon_out.size > 1 else None
    reach = target.describe() if target is not None else f"{lat_out.size}x{lon_out.size} points"
    raise ValueError(
        f"the source grid is regional ({source.describe()}) and the target grid ({what}: {reach}) reaches outside it, "
        "where values would be extrapolated; ask for a target inside the source with --region LAT0 LAT1 LON0 LON1 "
        f"(e.g. --region {source.lat_min:g} {source.lat_max:g} {source.lon_min:g} {source.lon_max:g})"
    )


# ----------------------------------------------------------------------------------------------
# Interpolation
# ----------------------------------------------------------------------------------------------


def _pad_longitude(ds: xr.Dataset) -> xr.Dataset:
    """Add one wrapped column on each side so interpolation is periodic in longitude."""
    lon = ds[LON_DIM].values
    left = ds.isel({LON_DIM: [-1]}).assign_coords({LON_DIM: [lon[-1] - 360.0]})
    right = ds.isel({LON_DIM: [0]}).assign_coords({LON_DIM: [lon[0] + 360.0]})
    return xr.concat([left, ds, right], dim=LON_DIM, data_vars="all", coords="minimal", compat="override", join="override")


class Regridder:
    """Bilinear (or nearest) regridding of canonical ERA5 datasets onto ``(lat_out, lon_out)``.

    ``periodic`` (default: whether the source longitudes go all the way round) wraps the
    longitude axis; a regional source is interpolated inside its own box only."""

    def __init__(self, lat_in: np.ndarray, lon_in: np.ndarray, lat_out: np.ndarray, lon_out: np.ndarray,
                 method: str = "bilinear", backend: str = "auto", periodic: Optional[bool] = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.backend = method, resolve_backend(backend)
        self.lat_in, self.lon_in = np.asarray(lat_in, float), np.asarray(lon_in, float)
        self.periodic = grid_extent(self.lat_in, self.lon_in).periodic if periodic is None else periodic
        self.lat_out = np.asarray(lat_out, float)
        lon_out = np.asarray(lon_out, float)
        # output longitudes: in [0, 360) where that keeps them ascending, else as given (a region
        # across 0°, contiguous from its western edge)
        wrapped = np.mod(lon_out, 360.0)
        self.lon_out = wrapped if np.all(np.diff(wrapped) > 0) else lon_out
        # query longitudes in the source's own frame
        self._lon_query = wrapped if self.periodic else self.lon_in[0] + _east_of(lon_out, self.lon_in[0])
        self._xesmf: Any = None
        if self.backend == "xesmf":
            import xesmf as xe

            grid_in = xr.Dataset(coords={"lat": ("lat", self.lat_in), "lon": ("lon", self.lon_in)})
            grid_out = xr.Dataset(coords={"lat": ("lat", self.lat_out), "lon": ("lon", self._lon_query)})
            xe_method = "bilinear" if method == "bilinear" else "nearest_s2d"
            self._xesmf = xe.Regridder(grid_in, grid_out, xe_method, periodic=self.periodic)

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
            source = _pad_longitude(ds) if self.periodic else ds
            lat_q = np.clip(self.lat_out, self.lat_in.min(), self.lat_in.max())
            method = "linear" if self.method == "bilinear" else "nearest"
            out = source.interp({LAT_DIM: lat_q, LON_DIM: self._lon_query}, method=method, assume_sorted=True)
        out = out.assign_coords({LAT_DIM: (LAT_DIM, self.lat_out, {"units": "degrees_north"}),
                                 LON_DIM: (LON_DIM, self.lon_out, {"units": "degrees_east"})})
        for name in horizontal:
            out[name] = out[name].astype(ds[name].dtype).assign_attrs(ds[name].attrs)
        return out


def target_grid(resolution: Optional[float], target_grid_path: Optional[str],
                region: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    if target_grid_path:
        ref = open_era5(target_grid_path)
        lat, lon = ref[LAT_DIM].values, ref[LON_DIM].values
    else:
        lat, lon = regular_latlon_grid(5.625 if resolution is None else resolution)
    return region_of_grid(lat, lon, region) if region is not None else (lat, lon)


# ----------------------------------------------------------------------------------------------
# The tool
# ----------------------------------------------------------------------------------------------


def variable_report(ds: xr.Dataset) -> List[str]:
    """One line for each variable of the input: ``keep NAME -> canonical (how)`` or ``drop NAME: why``."""
    lines = []
    for match in dict.fromkeys(ds.encoding.get("era5_variables") or []):
        if match.canonical is None:
            lines.append(f"  drop {match.name}: {match.how}")
        else:
            lines.append(f"  keep {match.name} -> {match.canonical} ({match.how})")
    return lines


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
    region: Optional[Sequence[float]] = None,
    zarr_format: int = 2,
    ensemble_member: Any = None,
) -> Path:
    """Regrid ``input_paths`` into the zarr store ``output`` (atomic). Returns the output path."""
    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    check_zarr_format(zarr_format)
    sources = [input_paths] if isinstance(input_paths, (str, os.PathLike)) else list(input_paths)
    ds = open_era5(sources[0] if len(sources) == 1 else sources, ensemble_member=ensemble_member)
    lat_out, lon_out = target_grid(resolution, target_grid_path, region)
    extent = grid_extent(ds[LAT_DIM].values, ds[LON_DIM].values)
    what = (f"--target-grid {target_grid_path}" if target_grid_path else f"--resolution {resolution:g}") + (
        f" --region {' '.join(f'{x:g}' for x in region)}" if region is not None else "")
    check_target_inside(extent, lat_out, lon_out, what)
    regridder = Regridder(ds[LAT_DIM].values, ds[LON_DIM].values, lat_out, lon_out, method, backend, extent.periodic)
    for line in variable_report(ds):
        log(line)
    log(
        f"regridding {len(ds.data_vars)} variables {ds.sizes[LAT_DIM]}x{ds.sizes[LON_DIM]} ({extent.describe()}) -> "
        f"{len(lat_out)}x{len(lon_out)} ({method}, backend {regridder.backend}, zarr format {zarr_format})"
    )
    provenance: Dict[str, Any] = {
        "regrid_sources": ", ".join(str(s) for s in sources),
        "regrid_source_grid": f"{ds.sizes[LAT_DIM]}x{ds.sizes[LON_DIM]} ({extent.describe()})",
        "regrid_target": what,
        "regrid_method": method,
        "regrid_backend": regridder.backend,
        "history": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ} regridded by megatron_dchag "
                   f"regrid_era5 ({what}, {method})",
    }
    if ensemble_member is not None:
        provenance["regrid_ensemble_member"] = str(ensemble_member)
    if "era5_dropped_levels" in ds.attrs:
        provenance["era5_dropped_levels"] = str(ds.attrs["era5_dropped_levels"])
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
                parts.append(regridder(clean_encoding(piece.load())))
            result = clean_encoding(xr.merge(parts, compat="override", join="exact"))
            result.attrs = dict(provenance)  # on every write: an append replaces the store's attributes
            try:
                if first:
                    encoding = {
                        n: {"chunks": tuple(1 if d == TIME_DIM else s for d, s in zip(result[n].dims, result[n].shape))}
                        for n in result.data_vars
                    }
                    result.to_zarr(store, mode="w", encoding=encoding, zarr_format=zarr_format,
                                   consolidated=zarr_format == 2)
                    first = False
                else:
                    result.to_zarr(store, append_dim=TIME_DIM, zarr_format=zarr_format, consolidated=zarr_format == 2)
            except (TypeError, ValueError, OSError) as exc:
                text = str(exc).strip().splitlines()
                raise ValueError(f"writing {out} (zarr format {zarr_format}) from {provenance['regrid_sources']} failed: "
                                 f"{type(exc).__name__}: {text[0] if text else ''}") from exc
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
    parser.add_argument("--region", type=float, nargs=4, default=None, metavar=("LAT0", "LAT1", "LON0", "LON1"),
                        help="keep only the target points in this box (degrees); needed for a regional source")
    parser.add_argument("--method", choices=METHODS, default="bilinear")
    parser.add_argument("--backend", choices=("auto", "xesmf", "scipy"), default="auto")
    parser.add_argument("--time-chunk", type=int, default=8,
                        help="time steps per streamed chunk (memory: one variable x chunk at the source resolution)")
    parser.add_argument("--zarr-format", type=int, choices=ZARR_FORMATS, default=2,
                        help="zarr format of the output (3 needs zarr-python >= 3)")
    parser.add_argument("--ensemble-member", default=None, help="for ensemble data: a member index or 'mean'")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            regrid_era5(args.input, args.output, args.resolution, args.method, args.backend, args.time_chunk,
                        args.overwrite, args.target_grid, region=args.region, zarr_format=args.zarr_format,
                        ensemble_member=args.ensemble_member)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"regrid_era5: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regridding (megatron_dchag.cli.regrid_era5) of a smooth analytic field onto the 5.625° grid.

Field: f(lat, lon) = cos(lat)·sin(2·lon) + 0.5·sin(lat)² + 0.2·cos(lat)²·cos(3·lon) (+ a constant
offset per level / time). Bilinear interpolation from a 1° grid has error ≤ h²/8 · max|f''| with
h = 1° = 0.0175 rad and |f''| ≲ 4, i.e. ≈ 2e-4 (measured 2.7e-4); the tests allow **1e-3 absolute** (the field has
amplitude ~1). The source grids are offset half a cell in longitude (0.5° .. 359.5°), so target
longitude 0° lies between the last and the first source column and checks periodicity.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from megatron_dchag.cli import regrid_era5 as regrid
from megatron_dchag.data.era5.naming import regular_latlon_grid
from megatron_dchag.data.era5.store import open_era5

# Bilinear interpolation of smooth analytic fields of O(1..300) against the analytic values at the
# target points: the interpolation error itself, not rounding, sets this bound.
TOLERANCE = 1e-3


def analytic(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    lat = np.deg2rad(lat_deg)[:, None]
    lon = np.deg2rad(lon_deg)[None, :]
    return np.cos(lat) * np.sin(2 * lon) + 0.5 * np.sin(lat) ** 2 + 0.2 * np.cos(lat) ** 2 * np.cos(3 * lon)


def _source(lat: np.ndarray, lon: np.ndarray, n_time: int = 3) -> xr.Dataset:
    f = analytic(lat, lon)
    times = pd.date_range("2020-01-01", periods=n_time, freq="6h")
    levels = [500, 850]
    t = np.stack([np.stack([f + 10.0 * k + j for j in range(len(levels))]) for k in range(n_time)]).astype(np.float64)
    return xr.Dataset(
        {
            "temperature": (("time", "level", "latitude", "longitude"), t),
            "2m_temperature": (("time", "latitude", "longitude"), t[:, 0]),
            "land_sea_mask": (("latitude", "longitude"), f),
        },
        coords={"time": times, "level": levels, "latitude": lat, "longitude": lon},
    )


def test_scipy_bilinear_matches_analytic_field():
    lat_in = np.arange(-89.5, 90.0, 1.0)
    lon_in = np.arange(0.5, 360.0, 1.0)
    lat_out, lon_out = regular_latlon_grid(5.625)
    src = _source(lat_in, lon_in, n_time=2)
    out = regrid.Regridder(lat_in, lon_in, lat_out, lon_out, "bilinear", "scipy")(src)
    expected = analytic(lat_out, lon_out)
    assert out["temperature"].shape == (2, 2, 32, 64)
    np.testing.assert_allclose(out["land_sea_mask"].values, expected, atol=TOLERANCE)
    np.testing.assert_allclose(out["temperature"].values[1, 1], expected + 11.0, atol=TOLERANCE)
    np.testing.assert_allclose(out["latitude"].values, lat_out)
    assert out["latitude"].values[0] == -87.1875 and out["longitude"].values[-1] == 354.375


def test_cli_on_era5_style_netcdf(tmp_path):
    """An ERA5-style 2° file (north-to-south, poles included, short names) -> 5.625° zarr."""
    lat_in = np.arange(90.0, -90.1, -2.0)  # 91 rows incl. both poles, descending like ERA5
    lon_in = np.arange(0.0, 360.0, 2.0)
    src = _source(lat_in, lon_in).rename({"temperature": "t", "2m_temperature": "t2m", "land_sea_mask": "lsm"})
    src = src.rename({"latitude": "lat", "longitude": "lon", "level": "pressure_level", "time": "valid_time"})
    src.to_netcdf(tmp_path / "era5.nc")
    out = tmp_path / "era5_5.625.zarr"
    args = ["--input", str(tmp_path / "era5.nc"), "--output", str(out), "--resolution", "5.625", "--backend", "scipy", "--time-chunk", "2"]
    assert regrid.main(args) == 0
    assert regrid.main(args) == 2  # exists: refuses without --overwrite
    assert regrid.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["era5.nc", "era5_5.625.zarr"]  # no temp dirs left
    ds = open_era5(out)
    lat_out, lon_out = regular_latlon_grid(5.625)
    np.testing.assert_allclose(ds["latitude"].values, lat_out)
    np.testing.assert_allclose(ds["longitude"].values, lon_out)
    assert ds.sizes["time"] == 3 and list(ds["level"].values) == [500, 850]
    expected = analytic(lat_out, lon_out)
    # 2° source: error ≈ 4x the 1° case (measured 1.1e-3); allow 4e-3.
    np.testing.assert_allclose(ds["temperature"].values[2, 0], expected + 20.0, atol=4e-3)
    np.testing.assert_allclose(ds["2m_temperature"].values[1], expected + 10.0, atol=4e-3)
    np.testing.assert_allclose(ds["land_sea_mask"].values, expected, atol=4e-3)


@pytest.mark.skipif(not regrid.HAS_XESMF, reason="xESMF is not installed")
def test_xesmf_agrees_with_scipy():
    lat_in = np.arange(-89.5, 90.0, 1.0)
    lon_in = np.arange(0.5, 360.0, 1.0)
    lat_out, lon_out = regular_latlon_grid(5.625)
    src = _source(lat_in, lon_in, n_time=1)
    a = regrid.Regridder(lat_in, lon_in, lat_out, lon_out, "bilinear", "scipy")(src)
    b = regrid.Regridder(lat_in, lon_in, lat_out, lon_out, "bilinear", "xesmf")(src)
    np.testing.assert_allclose(b["land_sea_mask"].values, a["land_sea_mask"].values, atol=TOLERANCE)


def test_backend_selection():
    assert regrid.resolve_backend("scipy") == "scipy"
    assert regrid.resolve_backend("auto") == ("xesmf" if regrid.HAS_XESMF else "scipy")
    if not regrid.HAS_XESMF:
        with pytest.raises(ImportError, match="xESMF is not installed"):
            regrid.resolve_backend("xesmf")

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


# ----------------------------------------------------------------------------------------------
# Files as users have them: CF names, regional grids, zarr formats, chunked writes
# ----------------------------------------------------------------------------------------------


def _cf_source(lat: np.ndarray, lon: np.ndarray, n_time: int = 3) -> xr.Dataset:
    """The analytic source in CF naming (CDS axes, numeric time), with two fields no ERA5 channel
    comes from: a sea-surface temperature and time bounds."""
    src = _source(lat, lon, n_time).rename({"temperature": "air_temperature", "2m_temperature": "tas_like",
                                           "land_sea_mask": "land_binary_mask", "time": "valid_time",
                                           "level": "pressure_level"})
    src["tas_like"].attrs.update(standard_name="air_temperature", long_name="2 metre temperature")
    src["sst"] = src["tas_like"].assign_attrs(standard_name="sea_surface_temperature", long_name="Sea surface temperature")
    src["time_bnds"] = xr.DataArray(np.zeros((n_time, 2)), dims=("valid_time", "bnds"))
    return src


def test_cf_names_are_kept_and_every_variable_is_reported(tmp_path):
    src = _cf_source(np.arange(-89.5, 90.0, 1.0), np.arange(0.5, 360.0, 1.0))
    src.to_netcdf(tmp_path / "cf.nc")
    lines = []
    regrid.regrid_era5([str(tmp_path / "cf.nc")], str(tmp_path / "out.zarr"), backend="scipy", log=lines.append)
    assert "  keep air_temperature -> temperature (CF standard name; has a level axis)" in lines
    assert "  keep tas_like -> 2m_temperature (standard_name attribute 'air_temperature'; no level axis)" in lines
    assert "  keep land_binary_mask -> land_sea_mask (CF standard name)" in lines
    assert any(line.startswith("  drop sst: not an ERA5 variable") for line in lines)
    assert any(line.startswith("  drop time_bnds: no latitude/longitude axes") for line in lines)
    assert any(line.startswith("regridding 3 variables 180x360") for line in lines)
    ds = open_era5(tmp_path / "out.zarr")
    lat_out, lon_out = regular_latlon_grid(5.625)
    np.testing.assert_allclose(ds["2m_temperature"].values[1], analytic(lat_out, lon_out) + 10.0, atol=TOLERANCE)


def _regional_source(tmp_path) -> str:
    """A CDS-style regional download: 35-60N, 12W-20E at 0.25 deg, latitude north-to-south,
    longitudes -12..20."""
    lat = np.arange(60.0, 34.99, -0.25)
    lon = np.arange(-12.0, 20.01, 0.25)
    _source(lat, lon, n_time=2).rename({"temperature": "t", "2m_temperature": "t2m", "land_sea_mask": "lsm"}).to_netcdf(
        tmp_path / "europe.nc")
    return str(tmp_path / "europe.nc")


def test_regional_source_is_refused_for_a_global_target(tmp_path, capsys):
    source = _regional_source(tmp_path)
    rc = regrid.main(["--input", source, "--output", str(tmp_path / "out.zarr"), "--backend", "scipy"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("regrid_era5: error: the source grid is regional (latitude 35..60, longitude -12..20)")
    assert "--region LAT0 LAT1 LON0 LON1 (e.g. --region 35 60 -12 20)" in err[0]
    assert not (tmp_path / "out.zarr").exists()
    with pytest.raises(ValueError, match="reaches outside it"):  # a region that leaves the source
        regrid.regrid_era5([source], str(tmp_path / "out.zarr"), 1.0, backend="scipy", region=(30, 50, 0, 10),
                           log=lambda *_: None)


def test_regional_target_inside_a_regional_source(tmp_path):
    source = _regional_source(tmp_path)
    out = tmp_path / "europe_1deg.zarr"
    regrid.regrid_era5([source], str(out), 1.0, backend="scipy", region=(35, 60, -12, 20), log=lambda *_: None)
    ds = open_era5(out)
    lat, lon = ds["latitude"].values, ds["longitude"].values
    np.testing.assert_allclose(lat, np.arange(35.5, 60.0, 1.0))
    np.testing.assert_allclose(lon, np.arange(-12.0, 20.01, 1.0))  # contiguous across 0 deg, west to east
    # 0.25 deg source: interpolation error ~1/16 of the 1 deg case.
    np.testing.assert_allclose(ds["temperature"].values[1, 0], analytic(lat, lon) + 10.0, atol=TOLERANCE)
    np.testing.assert_allclose(ds["land_sea_mask"].values, analytic(lat, lon), atol=TOLERANCE)
    # The same region cut from a global source: the same contiguous longitudes.
    _source(np.arange(-89.5, 90.0, 1.0), np.arange(0.5, 360.0, 1.0)).to_netcdf(tmp_path / "globe.nc")
    regrid.regrid_era5([str(tmp_path / "globe.nc")], str(tmp_path / "cut.zarr"), 1.0, backend="scipy",
                       region=(35, 60, -12, 20), log=lambda *_: None)
    cut = xr.open_zarr(tmp_path / "cut.zarr", consolidated=False)
    np.testing.assert_allclose(cut["longitude"].values, lon)  # as stored, not only as read back
    np.testing.assert_allclose(cut["temperature"].values[1, 0], analytic(lat, lon) + 10.0, atol=TOLERANCE)


@pytest.mark.parametrize("input_format, output_format", [(3, None), (2, None), (2, 3), (3, 3)])
def test_zarr_formats_in_and_out_keep_provenance_over_chunks(tmp_path, input_format, output_format):
    """A zarr input of either format regrids to either format (None: the default, 2; only the chunk
    layout is written as encoding, nothing of the input's); the provenance attributes survive a
    write in several time chunks."""
    src = _source(np.arange(-88.0, 89.0, 4.0), np.arange(0.0, 360.0, 4.0), n_time=5)
    src.to_zarr(tmp_path / "in.zarr", zarr_format=input_format, consolidated=False)
    out = tmp_path / "out.zarr"
    args = ["--input", str(tmp_path / "in.zarr"), "--output", str(out), "--backend", "scipy", "--time-chunk", "2"]
    assert regrid.main(args + ([] if output_format is None else ["--zarr-format", str(output_format)])) == 0
    from megatron_dchag.data.era5.zarr_io import zarr_format_of

    assert zarr_format_of(out) == (output_format or 2)
    opened = xr.open_zarr(out, consolidated=False)
    assert opened.sizes["time"] == 5
    assert opened.attrs["regrid_method"] == "bilinear" and opened.attrs["regrid_target"] == "--resolution 5.625"
    assert str(tmp_path / "in.zarr") in opened.attrs["regrid_sources"] and "regridded by" in opened.attrs["history"]
    assert opened["temperature"].encoding["chunks"][0] == 1
    np.testing.assert_allclose(open_era5(out)["temperature"].values[4, 1], _regridded_expected(41.0), atol=2e-2)


def _regridded_expected(offset: float) -> np.ndarray:
    """The analytic field on the 5.625 deg grid (a 4 deg source: error ~16x the 1 deg case)."""
    lat_out, lon_out = regular_latlon_grid(5.625)
    return analytic(lat_out, lon_out) + offset

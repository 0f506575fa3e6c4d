"""ERA5 files in the shapes users have them: CF names and attributes, ECMWF short names, time axes
under other names or stored as numbers, ensembles, regional grids, zarr format 3.

Every fixture is the same small synthetic dataset (``make_synthetic_era5``) written in one of
those shapes by the test itself; each must load to exactly the tensors of the canonical store,
and what cannot be loaded must be refused with one line that says what the file has.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from megatron_dchag.cli import make_synthetic_era5 as synth
from megatron_dchag.data.era5.canonical import canonicalize_dataset
from megatron_dchag.data.era5.dataset import ERA5Dataset
from megatron_dchag.data.era5.store import ChannelReader, open_era5

CHANNELS = ["z_500", "z_850", "t_500", "t_850", "u_500", "v_850", "q_850", "t2m", "u10", "v10", "lsm", "orography"]
ALL_BUT_OROGRAPHY = slice(0, len(CHANNELS) - 1)


@pytest.fixture(scope="module")
def canonical() -> xr.Dataset:
    return synth.generate_synthetic_era5(start="2018-12-31", days=2, hours=6, resolution=22.5, levels=[500, 850], seed=3)


@pytest.fixture(scope="module")
def reference(canonical, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    synth.write_era5(canonical, path, "zarr")
    return path


def _samples(path, **kwargs):
    ds = ERA5Dataset(path, CHANNELS, lead_times_hours=[6, 12], cache=False, **kwargs)
    return [ds[i] for i in range(len(ds))]


def _assert_same_samples(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for key in ("time", "target_time", "lead_time_hours"):
            assert torch.equal(a[key], b[key]), key
        for key in ("input", "target"):
            # Every channel bit-exact but orography, which a CF file stores in metres
            # (surface_altitude, x g on reading: float32 values up to ~5e4, 1e-6 relative + 1e-3 absolute).
            assert torch.equal(a[key][ALL_BUT_OROGRAPHY], b[key][ALL_BUT_OROGRAPHY]), key
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-3)


SHAPES = {
    # CF standard names as variable names (air_temperature, eastward_wind, land_binary_mask,
    # surface_altitude in metres), 2 m / 10 m fields found by their standard_name attribute;
    # CDS axis names, latitude north-to-south, time as integer "hours since 1900-01-01".
    "cf-netcdf-valid_time-numeric": dict(naming="cf", coords="cds", order="descending", fmt="netcdf", numeric=True),
    "cf-zarr3": dict(naming="cf", coords="default", order="descending", fmt="zarr", zarr_format=3),
    "short-zarr3-valid_time": dict(naming="short", coords="cds", order="descending", fmt="zarr", zarr_format=3),
    "short-netcdf-numeric-time": dict(naming="short", coords="short", order="ascending", fmt="netcdf", numeric=True),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_real_file_shapes_load_identically(name, canonical, reference, tmp_path):
    shape = SHAPES[name]
    ds = synth.apply_convention(canonical, shape["naming"], shape["coords"], shape["order"])
    if shape.get("numeric"):
        ds = synth.numeric_time_axis(ds, synth.COORD_CONVENTIONS[shape["coords"]]["time"])
    path = tmp_path / ("data.zarr" if shape["fmt"] == "zarr" else "data.nc")
    synth.write_era5(ds, path, shape["fmt"], zarr_format=shape.get("zarr_format", 2))
    opened = open_era5(path)
    assert set(opened.data_vars) == {"geopotential", "temperature", "u_component_of_wind", "v_component_of_wind",
                                     "specific_humidity", "2m_temperature", "10m_u_component_of_wind",
                                     "10m_v_component_of_wind", "land_sea_mask", "geopotential_at_surface"}
    _assert_same_samples(_samples(path), _samples(reference))


def test_cf_names_say_how_they_were_recognised(canonical, tmp_path):
    ds = synth.apply_convention(canonical, "cf", "default")
    ds["sst"] = ds["air_temperature_2m"].assign_attrs(standard_name="sea_surface_temperature", long_name="Sea surface temperature")
    ds["time_bnds"] = xr.DataArray(np.zeros((ds.sizes["time"], 2)), dims=("time", "bnds"))
    ds["var167"] = ds["air_temperature_2m"].copy().assign_attrs(standard_name="", long_name="2 metre temperature")
    ds = ds.drop_vars("air_temperature_2m")
    ds.to_netcdf(tmp_path / "cf.nc")
    opened = open_era5(tmp_path / "cf.nc")
    how = {m.name: (m.canonical, m.how) for m in opened.encoding["era5_variables"]}
    assert how["air_temperature"] == ("temperature", "CF standard name; has a level axis")
    assert how["eastward_wind_10m"][0] == "10m_u_component_of_wind" and "standard_name attribute 'eastward_wind'" in how[
        "eastward_wind_10m"][1]
    assert how["var167"] == ("2m_temperature", "long_name attribute '2 metre temperature'")
    assert how["surface_altitude"][0] == "geopotential_at_surface"
    assert how["sst"][0] is None and "sea_surface_temperature" in how["sst"][1]
    assert how["time_bnds"][0] is None and "no latitude/longitude axes" in how["time_bnds"][1]
    # A missing variable: the error lists every variable of the file, recognised or not, and how.
    with pytest.raises(KeyError) as err:
        ChannelReader(opened, ["z_500", "msl"], "cf.nc")
    message = str(err.value)
    assert "mean_sea_level_pressure (for channels ['msl'])" in message
    assert "air_temperature -> temperature (CF standard name; has a level axis)" in message
    assert "var167 -> 2m_temperature (long_name attribute '2 metre temperature')" in message
    assert "sst: left out (not an ERA5 variable" in message and "time_bnds: left out" in message


def test_ecmwf_short_names_and_surface_geopotential(canonical, reference, tmp_path):
    """ECMWF parameter short names as the MARS/CDS GRIB-to-netCDF tools write them: 2t, 10u, 10v,
    and the surface geopotential as a level-less z in its own file."""
    pressure = synth.apply_convention(canonical, "short", "default")[["z", "t", "u", "v", "q"]]
    surface = synth.apply_convention(canonical, "short", "default")[["t2m", "u10", "v10"]].rename(
        {"t2m": "2t", "u10": "10u", "v10": "10v"})
    constants = xr.Dataset({"lsm": canonical["land_sea_mask"], "z": canonical["geopotential_at_surface"]})
    for name, part in (("pl.nc", pressure), ("sfc.nc", surface), ("const.nc", constants)):
        part.to_netcdf(tmp_path / name)
    _assert_same_samples(_samples(sorted(tmp_path.glob("*.nc"))), _samples(reference))


def test_time_axes_under_other_names_and_undecoded(canonical, tmp_path):
    """An undecoded numeric time axis (opened with decode_times=False, or by a tool that does not
    decode) is decoded; an axis under an unknown name is found by its CF attributes."""
    ds = synth.numeric_time_axis(synth.apply_convention(canonical, "long", "cds"), "valid_time")
    ds.to_netcdf(tmp_path / "t.nc")
    raw = xr.open_dataset(tmp_path / "t.nc", decode_times=False)
    assert np.issubdtype(raw["valid_time"].dtype, np.integer)
    view = canonicalize_dataset(raw, source="t.nc")
    np.testing.assert_array_equal(view["time"].values, canonical["time"].values)
    renamed = raw.rename({"valid_time": "forecast_valid"})  # not a known name: standard_name=time says it
    np.testing.assert_array_equal(canonicalize_dataset(renamed)["time"].values, canonical["time"].values)
    bad = raw.assign_coords(valid_time=raw["valid_time"].assign_attrs(units="steps", standard_name="time"))
    with pytest.raises(ValueError, match="numeric .* without CF units"):
        canonicalize_dataset(bad, source="t.nc")


def test_ensemble_member_index_or_mean(canonical, tmp_path):
    ens = synth.add_ensemble(canonical, 3, seed=1)
    synth.write_era5(ens, tmp_path / "ens.zarr", zarr_format=3)
    with pytest.raises(ValueError) as err:
        open_era5(tmp_path / "ens.zarr")
    assert "ensemble dimension 'number' with 3 members" in str(err.value)
    assert "data.ensemble_member=<index 0..2>" in str(err.value) and "data.ensemble_member=mean" in str(err.value)
    with pytest.raises(ValueError, match="ensemble member 5 does not exist"):
        open_era5(tmp_path / "ens.zarr", ensemble_member=5)
    member = ERA5Dataset(tmp_path / "ens.zarr", ["t_850", "t2m", "lsm"], lead_times_hours=[6], ensemble_member="1")
    expected = ens["temperature"].sel(level=850).isel(number=1, time=2).values
    np.testing.assert_array_equal(member[2]["input"][0].numpy(), expected)  # a member is read exactly
    mean = open_era5(tmp_path / "ens.zarr", ensemble_member="mean")
    assert not isinstance(mean["temperature"].variable._data, np.ndarray)  # still lazy
    got = ChannelReader(mean, ["t_850", "t2m"]).read(2)
    want = np.stack([ens["temperature"].sel(level=850).isel(time=2).values.astype(np.float64).mean(axis=0),
                     ens["2m_temperature"].isel(time=2).values.astype(np.float64).mean(axis=0)]).astype(np.float32)
    # The lazy mean in float64 against numpy's float64 mean, both rounded to float32 once.
    np.testing.assert_array_equal(got, want)
    synth.write_era5(canonical, tmp_path / "plain.zarr")
    with pytest.raises(ValueError, match="has no ensemble dimension"):
        open_era5(tmp_path / "plain.zarr", ensemble_member=0)


def test_regional_grid_across_the_prime_meridian_stays_contiguous(tmp_path):
    """A CDS regional download (35-60N, 12W-20E, longitudes -12..20, latitude north-to-south): the
    canonical view keeps the longitudes contiguous from the western edge, so the image has no seam."""
    ds = synth.generate_synthetic_era5(days=0.5, resolution=2.8125, levels=[500])
    region = synth.apply_convention(synth.select_region(ds, 35, 60, -12, 20), "short", "cds", "descending")
    region.to_netcdf(tmp_path / "eu.nc")
    view = open_era5(tmp_path / "eu.nc")
    lon = view["longitude"].values
    assert lon[0] < 0 < lon[-1] and np.all(np.diff(lon) > 0) and np.allclose(np.diff(lon), 2.8125)
    assert view["latitude"].values[0] < view["latitude"].values[-1]
    west = ds.sel(longitude=360.0 + lon[0], latitude=view["latitude"].values[0])["temperature"].isel(time=0).values
    assert np.array_equal(view["temperature"].isel(time=0, longitude=0, latitude=0).values, west)


def test_irregular_time_axis_is_named_in_the_lead_error(canonical, tmp_path):
    """Steps of 7 and 8 hours: the lead error says the axis is irregular, gives its smallest and
    largest step and the leads that do have targets; leads match exactly (a target 23 h after its
    initial time is no 24 h forecast)."""
    times = canonical["time"].values[0] + np.cumsum([0] + [7, 8] * 3).astype("timedelta64[h]")
    ds = canonical.isel(time=slice(0, len(times))).assign_coords(time=times)
    synth.write_era5(ds, tmp_path / "irregular.zarr")
    with pytest.raises(ValueError) as err:
        ERA5Dataset(tmp_path / "irregular.zarr", CHANNELS, lead_times_hours=[6])
    message = str(err.value)
    assert "an irregular time axis: steps from 7 h to 8 h" in message and "leads with targets in this window: 7, 8, 15" in message
    assert len(ERA5Dataset(tmp_path / "irregular.zarr", CHANNELS, lead_times_hours=[15])) == 5


def test_synthetic_tool_writes_real_file_shapes(tmp_path, capsys):
    out = tmp_path / "eu.zarr"
    args = ["--out", str(out), "--days", "1", "--resolution", "2.8125", "--levels", "500", "--naming", "cf",
            "--coords", "cds", "--time-name", "valid_time", "--numeric-time", "--ensemble", "2",
            "--region", "35", "60", "-12", "20", "--zarr-format", "3", "--latitude-order", "descending"]
    assert synth.main(args) == 0
    raw = xr.open_zarr(out, consolidated=False, decode_times=False)
    assert raw["valid_time"].attrs["units"] == "hours since 1900-01-01 00:00:00.0" and raw.sizes["number"] == 2
    assert "air_temperature" in raw and raw["longitude"].values.min() < 0
    view = open_era5(out, ensemble_member=0)
    assert view.sizes["time"] == 4 and view["longitude"].values[0] < 0 < view["longitude"].values[-1]
    assert synth.main(args) == 2 and "exists" in capsys.readouterr().err

"""ERA5 naming, loading, rank slicing, lead-time sampling and the statistics tool.

The same synthetic data is written under many conventions (long/short names, lat/lon vs
latitude/longitude, ascending/descending latitude, level/pressure_level/isobaricInhPa,
time/valid_time, zarr/netCDF, one file / one file per variable / one file per year) and must load
to identical tensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from megatron_dchag.cli import compute_era5_stats as stats_tool
from megatron_dchag.cli import make_synthetic_era5 as synth
from megatron_dchag.data.era5.dataset import ERA5Dataset
from megatron_dchag.data.era5.leads import sample_lead_hours
from megatron_dchag.data.era5.naming import (
    DEFAULT_ERA5_CHANNELS,
    DEFAULT_PRESSURE_LEVELS,
    parse_channel,
    regular_latlon_grid,
)
from megatron_dchag.data.era5.statistics import load_era5_stats
from megatron_dchag.data.era5.store import ChannelReader, open_era5
from megatron_dchag.data.sampler import ERA5EvalBatchSampler, ERA5TrainBatchSampler
from tests.tolerances import FLOAT32_REL, assert_close_scaled

CHANNELS = ["z_500", "z_850", "t_500", "t_850", "u_500", "v_850", "q_850", "t2m", "u10", "v10", "lsm", "orography"]


@pytest.fixture(scope="module")
def canonical() -> xr.Dataset:
    # Crosses a year boundary so the one-file-per-year layout has two files.
    return synth.generate_synthetic_era5(start="2018-12-31", days=2, hours=6, resolution=22.5, levels=[500, 850], seed=3)


@pytest.fixture(scope="module")
def reference(canonical, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    synth.write_era5(canonical, path, "zarr")
    return path


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def test_default_channels_and_parsing():
    assert len(DEFAULT_ERA5_CHANNELS) == 80 and len(DEFAULT_PRESSURE_LEVELS) == 15
    assert DEFAULT_ERA5_CHANNELS[:2] == ("z_50", "z_70") and DEFAULT_ERA5_CHANNELS[-5:] == ("t2m", "u10", "v10", "lsm", "orography")
    assert {"z_500", "t_850", "q_1000", "u_925", "v_250"} <= set(DEFAULT_ERA5_CHANNELS)
    spec = parse_channel("z_500")
    assert (spec.name, spec.variable, spec.level) == ("z_500", "geopotential", 500)
    assert parse_channel("geopotential_500") == spec
    assert parse_channel("2m_temperature").name == "t2m" and parse_channel("t2m").level is None
    assert parse_channel("geopotential_at_surface").name == "orography"
    assert parse_channel("lsm").is_constant
    with pytest.raises(ValueError, match="without a level"):
        parse_channel("temperature")
    with pytest.raises(ValueError, match="unknown ERA5 channel 'zz_500'"):
        parse_channel("zz_500")


# ----------------------------------------------------------------------------------------------
# Conventions load to identical tensors
# ----------------------------------------------------------------------------------------------

CONVENTIONS = {
    "long-zarr": dict(naming="long", coords="default", latitude_order="ascending", fmt="zarr", split="none"),
    "short-latlon-desc-netcdf": dict(naming="short", coords="short", latitude_order="descending", fmt="netcdf", split="none"),
    "cds-valid_time-pressure_level-per-variable": dict(naming="short", coords="cds", latitude_order="descending", fmt="netcdf", split="variable"),
    "grib-isobaricInhPa-per-year": dict(naming="long", coords="grib", latitude_order="ascending", fmt="netcdf", split="year"),
    "cds-zarr": dict(naming="short", coords="cds", latitude_order="descending", fmt="zarr", split="none"),
}


def _samples(path, cache=False, **kwargs):
    ds = ERA5Dataset(path, CHANNELS, lead_times_hours=[6, 12], cache=cache, **kwargs)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_conventions_load_identically(name, canonical, reference, tmp_path):
    conv = CONVENTIONS[name]
    ds = synth.apply_convention(canonical, conv["naming"], conv["coords"], conv["latitude_order"])
    suffix = ".zarr" if conv["fmt"] == "zarr" else ("" if conv["split"] != "none" else ".nc")
    written = synth.write_era5(ds, tmp_path / f"data{suffix}", conv["fmt"], conv["split"])
    if conv["split"] != "none":
        assert len(written) > 1
    # Open by directory, by glob and by explicit list where there are several files.
    paths = [tmp_path / f"data{suffix}"]
    if conv["split"] != "none":
        paths += [str(tmp_path / "data" / "*.nc"), written]
    expected = _samples(reference)
    for path, cache in [(p, False) for p in paths] + [(paths[-1], True)]:  # lazy reads and the in-memory cache
        got = _samples(path, cache=cache)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            for key in ("input", "target", "lead_time_hours", "time", "target_time"):
                assert torch.equal(a[key], b[key]), (name, key)


def test_cds_style_constants_and_longitudes(canonical, reference, tmp_path):
    """CDS downloads: lsm with a time axis, surface geopotential as a level-less 'z', longitudes -180..180;
    WeatherBench 1: orography in metres."""
    ds = canonical.rename({"geopotential": "z", "land_sea_mask": "lsm"})
    lon = ds["longitude"].values
    ds = ds.assign_coords(longitude=np.where(lon >= 180, lon - 360, lon)).sortby("longitude")
    orog = ds["geopotential_at_surface"]
    pressure = ds.drop_vars(["lsm", "geopotential_at_surface"])
    constants_a = xr.Dataset({"lsm": ds["lsm"].expand_dims(time=ds["time"].values[:1]),
                              "z": orog.expand_dims(time=ds["time"].values[:1])})
    wb1 = xr.Dataset({"orography": (orog / 9.80665).assign_attrs(units="m")})
    pressure.to_netcdf(tmp_path / "pressure.nc")
    constants_a.to_netcdf(tmp_path / "constants_a.nc")
    wb1.to_netcdf(tmp_path / "wb1.nc")
    ref = _samples(reference)
    for paths in ([tmp_path / "pressure.nc", tmp_path / "constants_a.nc"],
                  [tmp_path / "pressure.nc", tmp_path / "wb1.nc", tmp_path / "constants_a.nc"]):
        got = _samples(paths)
        for a, b in zip(got, ref):
            # Only orography differs: converted from metres (x g) in float32, values up to ~5e4, so
            # 1e-6 relative (8 eps) plus 1e-3 absolute; every other channel is compared bit-exactly below.
            torch.testing.assert_close(a["input"], b["input"], rtol=1e-6, atol=1e-3)


def test_weatherbench1_one_file_per_level(canonical, reference, tmp_path):
    """WeatherBench 1 layout: one file per (variable, level) with a scalar level coordinate, lat/lon,
    short names, orography in metres."""
    folder = tmp_path / "wb1"
    folder.mkdir()
    short = synth.apply_convention(canonical, "short", "short")
    for name in ("z", "t", "u", "v", "q"):
        for level in (500, 850):
            short[[name]].sel(level=level).to_netcdf(folder / f"{name}_{level}.nc")  # keeps level as a scalar
    short[["t2m", "u10", "v10"]].to_netcdf(folder / "surface.nc")
    constants = short[["lsm"]].assign(orography=(short["orography"] / 9.80665).assign_attrs(units="m"))
    constants.to_netcdf(folder / "constants.nc")
    ds = open_era5(folder)
    assert list(ds["geopotential"]["level"].values) == [500, 850]
    assert not isinstance(ds["geopotential"].variable._data, np.ndarray)  # still lazy
    for a, b in zip(_samples(folder), _samples(reference)):
        # Orography from metres (x g, float32, values up to ~5e4): 1e-6 relative + 1e-3 absolute.
        torch.testing.assert_close(a["input"], b["input"], rtol=1e-6, atol=1e-3)
        assert torch.equal(a["input"][:-1], b["input"][:-1])  # all but orography bit-identical


def test_open_is_lazy_and_canonical(reference):
    ds = open_era5(reference)
    assert list(ds["latitude"].values) == sorted(ds["latitude"].values)  # south-to-north
    assert set(ds.data_vars) >= {"geopotential", "2m_temperature", "land_sea_mask", "geopotential_at_surface"}
    assert "time" not in ds["land_sea_mask"].dims
    assert not isinstance(ds["temperature"].variable._data, np.ndarray)  # not loaded


# ----------------------------------------------------------------------------------------------
# Rank slicing and errors
# ----------------------------------------------------------------------------------------------


def test_channel_range_slices_exactly(reference):
    full = ERA5Dataset(reference, CHANNELS, lead_times_hours=[6])
    part = ERA5Dataset(reference, CHANNELS, channel_range=(2, 7), lead_times_hours=[6])
    assert part.input_channel_names == CHANNELS[2:7] == part.output_channel_names
    a, b = full[3], part[3]
    assert torch.equal(b["input"], a["input"][2:7]) and torch.equal(b["target"], a["target"][2:7])
    # Outputs owned separately from inputs.
    outs = ["z_500", "t_850", "t2m", "u10"]
    own = ERA5Dataset(reference, CHANNELS, channel_range=(0, 3), output_channels=outs, output_channel_range=(1, 3), lead_times_hours=[6])
    s = own[3]
    assert s["input"].shape[0] == 3 and own.output_channel_names == ["t_850", "t2m"]
    assert torch.equal(s["target"], a["target"][[CHANNELS.index("t_850"), CHANNELS.index("t2m")]])
    assert torch.equal(part.output_is_constant, torch.tensor([False] * 5))
    with pytest.raises(ValueError, match="channel_range"):
        ERA5Dataset(reference, CHANNELS, channel_range=(5, 99))


def test_clear_errors_name_what_the_data_has(reference):
    with pytest.raises(KeyError) as err:
        ERA5Dataset(reference, CHANNELS + ["msl"])
    msg = str(err.value)
    assert "mean_sea_level_pressure" in msg and "['msl']" in msg and "geopotential (z)" in msg
    with pytest.raises(KeyError) as err:
        ERA5Dataset(reference, ["z_500", "z_700", "t_1000"])
    msg = str(err.value)
    assert "geopotential has levels [500, 850] hPa but channels ['z_700']" in msg and "t_1000" in msg
    with pytest.raises(ValueError) as err:
        ERA5Dataset(reference, CHANNELS, time_range=("2017-01-01", "2017-02-01"))
    assert "2018-12-31T00:00" in str(err.value) and "2019-01-01T18:00" in str(err.value)
    with pytest.raises(ValueError, match="lead time 240 h"):
        ERA5Dataset(reference, CHANNELS, lead_times_hours=[240])
    with pytest.raises(KeyError, match="statistics for channels"):
        from megatron_dchag.data.era5.statistics import ERA5Stats

        stats = ERA5Stats(channels=["z_500"], mean=np.zeros(1), std=np.ones(1))
        ERA5Dataset(reference, CHANNELS, lead_times_hours=[6], stats_file=stats)


# ----------------------------------------------------------------------------------------------
# Leads, samplers, splits, pickling
# ----------------------------------------------------------------------------------------------


def test_train_sampler_one_lead_per_batch_and_exact_resume(reference):
    ds = ERA5Dataset(reference, CHANNELS, max_lead_hours=12, lead_step_hours=6)
    assert ds.active_leads == [6, 12]
    sampler = ERA5TrainBatchSampler(ds, 2, seed=7, num_steps=6)
    batches = list(sampler)
    assert len(batches) == 6
    for step, batch in enumerate(batches):
        assert {lead for _, lead in batch} == {sample_lead_hours(7, step, 12, 6)}
    assert {lead for b in batches for _, lead in b} <= {6, 12}
    resumed = list(ERA5TrainBatchSampler(ds, 2, seed=7, start_step=3, num_steps=3))
    assert resumed == batches[3:]
    # Data-parallel ranks take disjoint samples with the same lead.
    r0 = ERA5TrainBatchSampler(ds, 1, seed=7, data_parallel_rank=0, data_parallel_size=2, num_steps=2)
    r1 = ERA5TrainBatchSampler(ds, 1, seed=7, data_parallel_rank=1, data_parallel_size=2, num_steps=2)
    for a, b in zip(r0, r1):
        assert a[0][1] == b[0][1] and a[0][0] != b[0][0]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ERA5TrainBatchSampler(ds, 2, seed=7, num_steps=2))
    batch = next(iter(loader))
    assert batch["input"].shape == (2, len(CHANNELS), 8, 16) and torch.all(batch["lead_time_hours"] == batch["lead_time_hours"][0])
    assert torch.all(batch["target_time"] - batch["time"] == 3600 * batch["lead_time_hours"].long())


def test_eval_sampler_and_split(reference):
    ds = ERA5Dataset(reference, CHANNELS, lead_times_hours=[6, 12], split="val", val_fraction=0.5)
    assert ds.window == (4, 8)
    sampler = ERA5EvalBatchSampler(ds, 1)
    batches = list(sampler)
    assert [b[0][1] for b in batches] == [6, 6, 12, 12]
    assert [b[0][0] for b in batches[:2]] == [b[0][0] for b in batches[2:]]  # same initial times per lead
    for b in batches:
        sample = ds[b[0]]
        assert 4 <= ds.target_index(b[0][0], b[0][1]) < 8 and sample["time_index"].item() == b[0][0]
    train = ERA5Dataset(reference, CHANNELS, max_lead_hours=6, split="train", val_fraction=0.5)
    assert train.window == (0, 4) and list(train.valid_start_indices) == [0, 1, 2]


def test_normalization_climatology_and_pickle(reference, tmp_path):
    stats = stats_tool.compute_era5_stats(str(reference), CHANNELS, log=lambda *_: None)
    from megatron_dchag.data.era5.statistics import save_era5_stats

    save_era5_stats(tmp_path / "stats.npz", stats)
    raw = ERA5Dataset(reference, CHANNELS, lead_times_hours=[6])
    norm = ERA5Dataset(reference, CHANNELS, lead_times_hours=[6], stats_file=tmp_path / "stats.npz", return_climatology=True)
    a, b = raw[2], norm[2]
    mean = torch.tensor(stats.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(stats.std, dtype=torch.float32)[:, None, None]
    # The dataset normalizes in its own code path: relative to the largest normalized value.
    assert_close_scaled(b["input"], (a["input"] - mean) / std, FLOAT32_REL, "normalized input")
    # Round trip through float32 normalization of fields up to ~5e4 (geopotential).
    torch.testing.assert_close(norm.denormalize_output(b["target"]), a["target"], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(b["climatology"], torch.tensor(stats.climatology))
    clone = pickle.loads(pickle.dumps(ERA5Dataset(reference, CHANNELS, lead_times_hours=[6], cache=False)))
    assert torch.equal(clone[2]["input"], a["input"])


# ----------------------------------------------------------------------------------------------
# Statistics tool
# ----------------------------------------------------------------------------------------------


def test_stats_tool_matches_numpy(tmp_path):
    data = synth.generate_synthetic_era5(start="2018-03-01", days=400, hours=24, resolution=45.0, levels=[500], seed=1)
    synth.write_era5(data, tmp_path / "d.nc", "netcdf")
    out = tmp_path / "stats.nc"
    rc = stats_tool.main(["--data-path", str(tmp_path / "d.nc"), "--out", str(out), "--channels", "z_500", "t2m", "lsm",
                          "--time-chunk", "7", "--all-times"])
    assert rc == 0
    stats = load_era5_stats(out)
    assert stats.channels == ["z_500", "t2m", "lsm"]
    z = data["geopotential"].sel(level=500).values.astype(np.float64)
    t2m = data["2m_temperature"].values.astype(np.float64)
    lsm = np.broadcast_to(data["land_sea_mask"].values, t2m.shape).astype(np.float64)
    for i, arr in enumerate((z, t2m, lsm)):
        # float64 streaming moments vs numpy's two-pass float64 result.
        assert stats.mean[i] == pytest.approx(arr.mean(), rel=1e-10)
        assert stats.std[i] == pytest.approx(arr.std(), rel=1e-8)  # float64 moments; std loses digits to cancellation
        np.testing.assert_allclose(stats.climatology[i], arr.mean(axis=0), rtol=1e-6)  # stored as float32 (8 eps)
    # Spans more than a year -> day-of-year climatology.
    assert stats.climatology_doy is not None and stats.climatology_doy.shape == (366, 3, 4, 8)
    doy = data["time"].dt.dayofyear.values - 1
    for day in (0, 59, 120, 364):
        np.testing.assert_allclose(stats.climatology_doy[day, 1], t2m[doy == day].mean(axis=0), rtol=1e-6)  # float32 store
    np.testing.assert_array_equal(stats.climatology_at(data["time"].values[:2]), stats.climatology_doy[doy[:2]])


def test_synthetic_cli_and_grid(tmp_path):
    lat, lon = regular_latlon_grid(5.625)
    assert lat.size == 32 and lon.size == 64 and lat[0] == -87.1875 and lat[-1] == 87.1875 and lon[-1] == 354.375
    out = tmp_path / "s.zarr"
    assert synth.main(["--out", str(out), "--days", "1", "--resolution", "22.5", "--levels", "500,850"]) == 0
    assert synth.main(["--out", str(out), "--days", "1"]) == 2  # exists, no --overwrite
    ds = open_era5(out)
    assert ds.sizes["time"] == 4 and ds.sizes["latitude"] == 8 and list(ds["level"].values) == [500, 850]
    reader = ChannelReader(ds, ["z_500", "t_850", "u_500", "q_850", "t2m", "lsm"])
    x = reader.read(0)
    assert x.shape == (6, 8, 16) and np.isfinite(x).all()
    assert 4.5e4 < x[0].mean() < 6e4 and 240 < x[1].mean() < 300 and 0 <= x[5].min() and x[5].max() <= 1

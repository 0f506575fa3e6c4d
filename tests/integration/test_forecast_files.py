"""tools/forecast_era5.py end to end: WeatherBench 2 forecast files from a 6 h model, with rollouts.

A 6 h forecaster is trained for 3 steps at TP=2. The tool then writes direct (6 h) and rolled-out
(12 h, 72 h = 12 x 6 h) forecasts for three initial times:
- at TP=2 (the two ranks hold different channel groups, rank 0 gathers) to zarr, and at TP=1
  with two data-parallel ranks splitting the initial times to netCDF: the two files agree;
- the file opens with xarray in exactly the WeatherBench 2 layout, with CF attributes and the
  direct/rollout leads in its attributes;
- the project's latitude-weighted RMSE of the file against the store (metrics.py) equals
  xskillscore's weighted RMSE (an independent implementation) to 1e-5;
bad requests give one ``error:`` line, exit status 2 and no file.
"""

import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from tests.integration.conftest import run_script
from tests.integration.test_pretrain_era5 import SMALL, era5_data  # noqa: F401  (era5_data: a fixture)
from tests.tolerances import FLOAT32_REL, max_relative_error

INIT_TIMES = ["2018-01-20T00", "2018-01-21T06", "2018-01-22T12"]
LEADS = ["6", "12", "72"]
PRESSURE = ["geopotential", "temperature", "u_component_of_wind", "v_component_of_wind", "specific_humidity"]
SURFACE = ["2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind"]


@pytest.fixture(scope="module")
def six_hour_model(era5_data, tmp_path_factory):  # noqa: F811
    save = tmp_path_factory.mktemp("forecast_files") / "run"
    res = run_script("pretrain_era5.py", [
        "--config", "configs/era5/tiny.yaml", "--data-path", era5_data["data"], f"data.stats_file={era5_data['stats']}",
        *SMALL, "model.channel_groups=null", "forecast.max_lead_hours=6", "forecast.eval_lead_hours=[6]",
        "--micro-batch-size", "2", "--log-interval", "1", "--eval-interval", "0", "--train-iters", "3",
        "--eval-iters", "1", "--save", str(save)], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    return save


@pytest.fixture(scope="module")
def forecast_files(six_hour_model, era5_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("forecasts")
    files = {}
    for name, tp in (("tp2.zarr", "2"), ("dp2.nc", "1")):
        res = run_script("tools/forecast_era5.py", [
            "--load", str(six_hour_model), "--out", str(out / name), "--init-times", *INIT_TIMES, "--leads", *LEADS,
            "--tensor-model-parallel-size", tp, "--batch-size", "2", "--score"], nproc=2)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"wrote {out / name}: 3 initial times x 3 leads (6h direct; 12h rollout 2 x 6h; 72h rollout 12 x 6h)" \
            in res.stdout, res.stdout[-2000:]
        files[name] = out / name
    assert sorted(p.name for p in out.iterdir()) == ["dp2.nc", "tp2.zarr"]  # no temporary left
    return files


def test_the_file_has_the_weatherbench2_layout(forecast_files):
    from megatron_dchag.cli.forecast_era5 import open_forecast

    ds = open_forecast(forecast_files["tp2.zarr"])
    assert sorted(ds.data_vars) == sorted(PRESSURE + SURFACE)  # long names; no land-sea mask or orography
    for name in PRESSURE:
        assert ds[name].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude"), name
    for name in SURFACE:
        assert ds[name].dims == ("time", "prediction_timedelta", "latitude", "longitude"), name
    assert dict(ds.sizes) == dict(time=3, prediction_timedelta=3, level=2, latitude=16, longitude=32)
    assert ds["time"].values.tolist() == np.array(INIT_TIMES, dtype="datetime64[ns]").tolist()
    assert ds["prediction_timedelta"].dtype.kind == "m"
    assert (ds["prediction_timedelta"].values / np.timedelta64(1, "h")).tolist() == [6, 12, 72]
    assert ds["level"].values.tolist() == [500, 850] and ds["level"].attrs["units"] == "hPa"
    assert ds["latitude"].attrs["units"] == "degrees_north" and ds["longitude"].attrs["units"] == "degrees_east"
    assert ds["latitude"].attrs["standard_name"] == "latitude" and ds["longitude"].attrs["standard_name"] == "longitude"
    t2m = ds["2m_temperature"].attrs
    assert (t2m["units"], t2m["long_name"], t2m["standard_name"]) == ("K", "2 metre temperature", "air_temperature")
    assert ds["geopotential"].attrs["units"] == "m**2 s**-2"
    assert ds.attrs["direct_lead_hours"] == "6" and ds.attrs["rollout_lead_hours"] == "12, 72"
    assert ds.attrs["lead_method"] == "6h direct; 12h rollout 2 x 6h; 72h rollout 12 x 6h"
    # physical units, not normalized ones
    assert 200 < float(ds["2m_temperature"].mean()) < 320 and float(ds["geopotential"].sel(level=500).mean()) > 4e4


def test_tp2_and_data_parallel_files_agree(forecast_files):
    from megatron_dchag.cli.forecast_era5 import open_forecast

    a, b = open_forecast(forecast_files["tp2.zarr"]), open_forecast(forecast_files["dp2.nc"])
    assert sorted(a.data_vars) == sorted(b.data_vars)
    for name in a.data_vars:
        assert a[name].dims == b[name].dims
        err = max_relative_error(torch.from_numpy(b[name].values), torch.from_numpy(a[name].values))
        assert err <= FLOAT32_REL, (name, err)


def test_project_rmse_equals_xskillscore_and_the_rollout_is_scored(forecast_files, era5_data):  # noqa: F811
    import xarray as xr
    import xskillscore as xs

    from megatron_dchag.cli.forecast_era5 import open_forecast, score_forecast_file
    from megatron_dchag.data.era5.store import open_era5

    path = forecast_files["tp2.zarr"]
    ours = score_forecast_file(path, era5_data["data"])
    fc, store = open_forecast(path), open_era5(era5_data["data"])
    lat = fc["latitude"]
    weights = np.cos(np.deg2rad(lat)) / np.cos(np.deg2rad(lat)).mean()  # cos(latitude), mean 1, as metrics.py
    weights = weights.broadcast_like(fc["longitude"]).transpose("latitude", "longitude")
    compared = 0
    for name in fc.data_vars:
        for j, lead in enumerate(fc["prediction_timedelta"].values):
            valid = fc["time"].values + lead
            truth = store[name].sel(time=valid).assign_coords(time=fc["time"].values)
            forecast = fc[name].isel(prediction_timedelta=j).drop_vars("prediction_timedelta")
            if "level" in forecast.dims:
                truth = truth.sel(level=fc["level"].values)
            truth, forecast = xr.align(truth.astype("float64"), forecast.astype("float64"), join="exact")
            rmse = xs.rmse(forecast, truth, dim=["latitude", "longitude"], weights=weights).mean("time")
            hours = int(lead / np.timedelta64(1, "h"))
            levels = fc["level"].values.tolist() if "level" in forecast.dims else [None]
            for level in levels:
                theirs = float(rmse.sel(level=level)) if level is not None else float(rmse)
                channel = _channel(name, level)
                mine = ours[(channel, hours)]
                assert mine["num_forecasts"] == 3
                assert math.isfinite(mine["rmse"]) and mine["rmse"] > 0
                assert abs(mine["rmse"] - theirs) <= FLOAT32_REL * theirs, (channel, hours, mine["rmse"], theirs)
                compared += 1
    assert compared == 3 * (len(PRESSURE) * 2 + len(SURFACE))
    # the 72 h rollout is scored, and its error has grown from the 6 h one, as persistence's has
    for channel in ("z_500", "t_850", "t2m"):
        assert ours[(channel, 72)]["rmse"] > ours[(channel, 6)]["rmse"]
        assert ours[(channel, 72)]["persistence_rmse"] > ours[(channel, 6)]["persistence_rmse"]


def _channel(variable, level):
    from megatron_dchag.data.era5.naming import channel_name

    return channel_name(variable, level)


def _subset_checkpoint(six_hour_model, tmp_path):
    """A copy of the run's config only, predicting a subset of its inputs (the checks before
    loading read nothing else)."""
    fake = tmp_path / "subset_run"
    (fake / "iter_0000003").mkdir(parents=True)
    shutil.copy(six_hour_model / "latest_checkpointed_iteration.txt", fake)
    cfg = yaml.safe_load((six_hour_model / "iter_0000003" / "config.yaml").read_text())
    cfg["forecast"]["output_channels"] = ["z_500", "t_850"]
    cfg["forecast"]["metric_variables"] = ["z_500", "t_850"]
    (fake / "iter_0000003" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return fake


def _assert_one_error_line(stderr, message):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr[-3000:]


def test_an_impossible_lead_is_one_line_and_exit_status_2(six_hour_model, tmp_path):
    out = tmp_path / "forecast.nc"
    res = run_script("tools/forecast_era5.py", ["--load", str(six_hour_model), "--out", str(out),
                                                "--init-times", INIT_TIMES[0], "--leads", "6", "9"])
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    _assert_one_error_line(res.stderr, "--leads: lead 9 h is neither a lead the model was trained for (6 h) nor a multiple")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case, extra, message", [
    ("exists", [], "exists; pass --overwrite to replace it"),
    ("suffix", [], "--out"),
    ("init", ["--init-times", "2018-01-20T03"], "initial times ['2018-01-20T03:00'] are not times of"),
    ("range", ["--init-start", "2018-01-21T00", "--init-end", "2018-01-20T00"], "--init-end 2018-01-20T00 is before"),
    ("subset", ["--leads", "6", "72"], "--leads 72: a rollout feeds the model's output back as its input, but this "
                                       "model does not predict its inputs ['z_850', 't_500',"),
])
def test_bad_requests_are_refused_before_any_compute(six_hour_model, tmp_path, capsys, case, extra, message):
    # in this process: every check runs before the distributed start-up
    from megatron_dchag.cli.forecast_era5 import main

    out = tmp_path / ("forecast.txt" if case == "suffix" else "forecast.nc")
    if case == "exists":
        out.write_text("keep me")
    load = _subset_checkpoint(six_hour_model, tmp_path) if case == "subset" else six_hour_model
    init = [] if "--init" in " ".join(extra) else ["--init-times", INIT_TIMES[0]]
    leads = [] if "--leads" in extra else ["--leads", "6"]
    assert main(["--load", str(load), "--out", str(out), *init, *leads, *extra]) == 2
    _assert_one_error_line(capsys.readouterr().err, message)
    assert [p.name for p in tmp_path.iterdir() if p.name != "subset_run"] == (["forecast.nc"] if case == "exists" else [])
    if case == "exists":
        assert out.read_text() == "keep me"

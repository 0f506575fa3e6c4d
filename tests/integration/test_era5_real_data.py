"""A new user's ERA5 path, end to end, on a file in the shape the CDS delivers.

The test writes a global ERA5 netCDF with CF standard names (``air_temperature``, ``eastward_wind``,
``land_binary_mask``, ``surface_altitude``; 2 m and 10 m fields found by their ``standard_name``),
a ``valid_time`` axis stored as integer hours since 1900, latitude north-to-south, on a 2.8125°
grid, and then runs what the README tells a user to run:

1. ``regrid_era5`` to 5.625° (a real bilinear step, 64x128 -> 32x64);
2. ``compute_era5_stats --config configs/era5/tiny.yaml data.channels=[...]`` (the train split of
   the run's ``data.val_fraction``);
3. ``pretrain_era5.py --config configs/era5/tiny.yaml`` at TP=2 (torchrun, 2 gloo ranks), with no
   other override than ``data.channels``, the data path and the statistics file;
4. ``pretrain_era5.py --skip-train --load RUN`` (the run's saved config) at TP=1.
"""

import math

import pytest
import yaml

from tests.integration.conftest import read_metrics, run_script

LEVELS = [250, 500, 850]
CHANNELS = [f"{v}_{lvl}" for v in ("z", "t", "u", "v", "q") for lvl in LEVELS] + ["t2m", "u10", "v10", "lsm", "orography"]
CHANNEL_LIST = f"data.channels=[{','.join(CHANNELS)}]"
TINY = "configs/era5/tiny.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """20 days, 6-hourly (80 steps: with tiny.yaml's val_fraction 0.2, 16 validation steps, enough for
    its 72 h evaluation lead), regridded, with statistics."""
    from megatron_dchag.cli import compute_era5_stats as stats_tool
    from megatron_dchag.cli import make_synthetic_era5 as synth
    from megatron_dchag.cli import regrid_era5 as regrid

    root = tmp_path_factory.mktemp("era5_cf")
    raw = root / "era5_cf_2.8125deg.nc"
    ds = synth.generate_synthetic_era5(days=20, hours=6, resolution=2.8125, levels=LEVELS, seed=5)
    ds = synth.numeric_time_axis(synth.apply_convention(ds, "cf", "cds", "descending"), "valid_time")
    synth.write_era5(ds, raw, "netcdf")
    lines = []
    data = root / "era5_5.625deg.zarr"
    regrid.regrid_era5([str(raw)], str(data), 5.625, backend="scipy", time_chunk=40, log=lines.append)
    stats = root / "stats.npz"
    assert stats_tool.main(["--config", TINY, CHANNEL_LIST, "--data-path", str(data), "--out", str(stats)]) == 0
    return dict(data=str(data), stats=str(stats), regrid_log=lines)


def test_cf_netcdf_regrid_stats_train_and_evaluate(prepared, tmp_path):
    from megatron_dchag.data.era5.statistics import load_era5_stats

    # 1. Regrid: every CF variable kept and said how; nothing dropped.
    log = prepared["regrid_log"]
    assert sum(line.startswith("  keep ") for line in log) == 10 and not any(line.startswith("  drop") for line in log)
    assert "  keep air_temperature_2m -> 2m_temperature (standard_name attribute 'air_temperature'; no level axis)" in log
    assert any(line.startswith("regridding 10 variables 64x128") for line in log)
    # 2. Statistics: the train split of tiny.yaml's val_fraction 0.2 (the first 64 of 80 steps).
    stats = load_era5_stats(prepared["stats"])
    assert stats.attrs["num_times"] == 64 and stats.attrs["time_end"] == "2018-01-16T18:00:00"
    assert stats.channels == CHANNELS

    # 3. TP=2 training, tiny.yaml plus data.channels, data path and statistics file only.
    run, eval_dir = tmp_path / "run", tmp_path / "eval"
    args = ["--config", TINY, CHANNEL_LIST, "--data-path", prepared["data"], f"data.stats_file={prepared['stats']}"]
    res = run_script("pretrain_era5.py", [*args, "--train-iters", "2", "--save", str(run)], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning" not in res.stderr  # statistics over the train split: nothing to warn about
    saved = (run / "config.yaml").read_text()
    resolved = yaml.safe_load(saved)
    assert resolved["data"]["channels"] == CHANNELS  # whole
    assert (resolved["model"]["num_channels"], resolved["model"]["channel_groups"]) == (20, 8)
    # The console shows the 20-channel list shortened; config.yaml holds it whole.
    assert "channels: [z_250, z_500, z_850, t_250, ..., u10, v10, lsm, orography] (20 values)" in res.stdout
    tp2 = [r for r in read_metrics(run) if r["kind"] == "eval"][-1]
    for var in ("z_500", "t_850", "u10", "t2m"):  # tiny.yaml's metric variables, all in the list
        assert math.isfinite(tp2[f"rmse/{var}/72h"]) and math.isfinite(tp2[f"acc/{var}/6h"])
    # 12 evaluation steps of 4 asked for; 4 initial times in the validation window are valid at 72 h.
    assert {tp2[f"forecasts/{lead}h"] for lead in (6, 24, 72)} == {4}

    # 4. --skip-train --load RUN: the run's saved config; the checkpoint reshards to TP=1.
    records_before = len(read_metrics(run))
    res = run_script("pretrain_era5.py", ["--skip-train", "--load", str(run), "--tensor-model-parallel-size", "1",
                                          "--log-dir", str(eval_dir)], nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    tp1 = [r for r in read_metrics(eval_dir) if r["kind"] == "eval"][-1]
    keys = ["loss", *[k for k in tp2 if "/" in k]]
    assert sorted(k for k in tp1 if "/" in k) == sorted(keys[1:])
    for key in keys:  # another layout of the same model: float32 sums in another order
        assert math.isclose(tp1[key], tp2[key], rel_tol=1e-5, abs_tol=1e-9), (key, tp1[key], tp2[key])
    table = (eval_dir / "forecast_metrics.md").read_text()
    assert "4 forecasts per lead time (distinct initial times, the same at every lead)" in table
    # The evaluation wrote only where its flags said: the run's own log and config are untouched.
    assert len(read_metrics(run)) == records_before and (run / "config.yaml").read_text() == saved

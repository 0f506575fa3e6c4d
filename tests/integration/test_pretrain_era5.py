"""End-to-end ERA5 forecasting through pretrain_era5.py on a small synthetic set.

- TP=2 training (torchrun, 2 gloo ranks) logs per-variable, per-lead RMSE/MSE/ACC and the
  persistence/climatology references in metrics.jsonl and writes forecast_metrics.md;
- the TP=2 checkpoint evaluated at TP=1 (``--skip-train --load``) gives the same eval loss and the
  same metrics (≤1e-5 relative);
- the training stream resumes exactly from its state; bad input gives one clear line.
"""

import math
from types import SimpleNamespace

import pytest

from tests.integration.conftest import read_metrics, run_script

CHANNELS = "[z_500,z_850,t_500,t_850,u_500,u_850,v_500,v_850,q_500,q_850,t2m,u10,v10,lsm,orography]"


@pytest.fixture(scope="module")
def era5_data(tmp_path_factory):
    """30 days, 6-hourly, 15 channels on an 11.25° grid (16x32), and its statistics (the same as
    ``make_synthetic_era5.py --days 30 --resolution 11.25 --levels 500,850`` + ``compute_era5_stats.py``)."""
    from megatron_dchag.cli import compute_era5_stats as stats_tool
    from megatron_dchag.cli import make_synthetic_era5 as synth

    root = tmp_path_factory.mktemp("era5")
    data, stats = root / "synth.zarr", root / "stats.npz"
    synth.write_era5(synth.generate_synthetic_era5(days=30, resolution=11.25, levels=[500, 850]), data)
    # over the train split of tiny.yaml's data.val_fraction, as compute_era5_stats --config tiny.yaml computes it
    stats_tool.save_era5_stats(stats, stats_tool.compute_era5_stats(str(data), log=lambda *a: None, val_fraction=0.2))
    return dict(data=str(data), stats=str(stats))


SMALL = [
    f"data.channels={CHANNELS}", "model.num_channels=15", "model.image_size=[16,32]", "model.patch_size=4",
    "model.hidden_size=32", "model.num_layers=1", "model.num_attention_heads=4", "model.channel_groups=4",
    "forecast.max_lead_hours=24", "forecast.eval_lead_hours=[6,24]", "forecast.metric_variables=[z_500,t_850,t2m]",
    "training.lr_warmup_iters=1",
]


def _args(data, *extra):
    return [
        "--config", "configs/era5/tiny.yaml", "--data-path", data["data"], f"data.stats_file={data['stats']}", *SMALL,
        "--micro-batch-size", "2", "--log-interval", "1", "--eval-iters", "4", "--eval-interval", "0", *extra,
    ]


def test_train_tp2_then_evaluate_at_tp1(era5_data, tmp_path):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval_tp1"
    res = run_script("pretrain_era5.py", _args(era5_data, "--train-iters", "4", "--save", str(run_dir)), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["tflops"] > 0
    tp2 = [r for r in records if r["kind"] == "eval"][-1]
    for var in ("z_500", "t_850", "t2m"):
        for lead in (6, 24):
            for metric in ("rmse", "mse", "acc", "persistence_rmse", "climatology_rmse"):
                assert math.isfinite(tp2[f"{metric}/{var}/{lead}h"]), (metric, var, lead)
            assert tp2[f"rmse/{var}/{lead}h"] ** 2 <= tp2[f"mse/{var}/{lead}h"] * (1 + 1e-9)  # mean of sqrt <= sqrt of mean
            assert -1.0 <= tp2[f"acc/{var}/{lead}h"] <= 1.0
    assert not any(k.startswith("rmse/u10/") for k in tp2)  # only forecast.metric_variables
    table = (run_dir / "forecast_metrics.md").read_text()
    assert "| z_500 | m**2 s**-2 | 6h |" in table and "persistence RMSE" in table

    res = run_script("pretrain_era5.py", _args(era5_data, "--skip-train", "--load", str(run_dir),
                                               "--tensor-model-parallel-size", "1", "--log-dir", str(eval_dir)), nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    tp1 = [r for r in read_metrics(eval_dir) if r["kind"] == "eval"][-1]
    metric_keys = [k for k in tp2 if "/" in k]
    assert sorted(k for k in tp1 if "/" in k) == sorted(metric_keys)
    for key in ["loss", *metric_keys]:
        assert math.isclose(tp1[key], tp2[key], rel_tol=1e-5, abs_tol=1e-9), (key, tp1[key], tp2[key])
    assert (eval_dir / "forecast_metrics.md").exists()


def test_train_stream_resumes_exactly(era5_data):
    from megatron_dchag.config import load_config
    from megatron_dchag.tasks.forecasting import ERA5ForecastTask

    cfg = load_config("configs/era5/tiny.yaml", [*SMALL, f"data.data_path={era5_data['data']}",
                                                 f"data.stats_file={era5_data['stats']}", "training.micro_batch_size=2"])
    task = ERA5ForecastTask(cfg)
    task.prepare()
    rank1 = SimpleNamespace(input_channel_range=(8, 15), output_channel_range=(8, 15))  # TP rank 1 of G=4 groups
    stream = task.train_stream(rank1, dp_rank=0, dp_size=1)
    batches = [next(stream) for _ in range(5)]
    assert batches[0]["input"].shape == (2, 7, 16, 32) and batches[0]["target"].shape == (2, 7, 16, 32)
    for b in batches:  # one lead per batch
        assert len(set(b["lead_time_hours"].tolist())) == 1
    resumed = task.train_stream(rank1, dp_rank=0, dp_size=1)
    fresh = task.train_stream(rank1, dp_rank=0, dp_size=1)
    next(fresh), next(fresh)
    resumed.load_state_dict(fresh.state_dict())
    for expected in batches[2:]:
        got = next(resumed)
        for key in ("input", "target", "lead_time_hours", "time"):
            assert (got[key] == expected[key]).all(), key
    # A rank that predicts none of a subset of outputs still reads its inputs.
    cfg.forecast.output_channels, cfg.forecast.metric_variables = ["z_500"], ["z_500"]
    subset = ERA5ForecastTask(cfg)
    subset.prepare()
    batch = next(subset.train_stream(SimpleNamespace(input_channel_range=(8, 15), output_channel_range=(1, 1)), 0, 1))
    assert batch["input"].shape == (2, 7, 16, 32) and batch["target"].shape == (2, 0, 16, 32)


def test_bad_input_gives_one_clear_line(era5_data, tmp_path):
    res = run_script("pretrain_era5.py", _args(era5_data, "--train-iters", "1", "--tensor-model-parallel-size", "1",
                                               "--log-dir", str(tmp_path / "x"), "forecast.metric_variables=[z_300]"),
                     nproc=1)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert lines and "forecast.metric_variables ['z_300'] are not predicted" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("forecast.eval_lead_hours=[6,240]", "lead time 240 h: no initial time"),
        ("forecast.output_channels=[z_500,z_300]", "forecast.output_channels ['z_300'] are not input channels"),
        ("model.image_size=[32,64]", "does not match the data grid 16x32"),
        ("model.num_channels=16", "model.num_channels=16 does not match the 15 channels"),
    ],
)
def test_prepare_rejects_data_mismatches(era5_data, override, message):
    from megatron_dchag.config import ConfigError, load_config
    from megatron_dchag.tasks.forecasting import ERA5ForecastTask

    cfg = load_config("configs/era5/tiny.yaml", [*SMALL, f"data.data_path={era5_data['data']}",
                                                 f"data.stats_file={era5_data['stats']}", override])
    with pytest.raises(ConfigError) as info:
        ERA5ForecastTask(cfg).prepare()
    assert message in str(info.value), str(info.value)


def _damaged_copy(era5_data, root, kind):
    """A copy of the data with one damage: a zarr store whose first chunk of temperature is cut
    inside its compression header (cut later, blosc may decode garbage without an error) or is
    missing (zarr reads a missing chunk as its fill value, NaN), or a netCDF file cut in half."""
    import shutil

    import xarray as xr

    if kind.startswith("zarr"):
        bad = root / "damaged.zarr"
        shutil.copytree(era5_data["data"], bad)
        chunk = sorted(p for p in (bad / "temperature").iterdir() if not p.name.startswith("."))[0]
        if kind == "zarr_missing_chunk":
            chunk.unlink()
        else:
            chunk.write_bytes(chunk.read_bytes()[:8])
        return bad, "'" + str(bad) + "'"
    bad = root / "damaged.nc"
    with xr.open_zarr(era5_data["data"]) as ds:
        ds.to_netcdf(bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return bad, "'" + str(bad) + "'"


@pytest.mark.parametrize("kind, message", [("zarr_chunk", "truncated or corrupt"),
                                           ("zarr_missing_chunk", "non-finite values"),
                                           ("netcdf_truncated", "truncated or corrupt")])
def test_damaged_data_names_the_file(era5_data, tmp_path, kind, message):
    bad, name = _damaged_copy(era5_data, tmp_path, kind)
    out = tmp_path / "run"
    data = dict(era5_data, data=str(bad))
    res = run_script("pretrain_era5.py", _args(data, "--train-iters", "1", "--tensor-model-parallel-size", "1",
                                               "--save", str(out)), nproc=1)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and name in lines[0] and message in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
    assert not out.exists()

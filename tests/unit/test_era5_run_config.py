"""An ERA5 run as a new user sets it up: statistics over the train split, a channel list that sets
the fields following from it, ``--skip-train --load RUN`` with the run's saved config, honest
evaluation counts, and a console config that stays short.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from megatron_dchag.cli import compute_era5_stats as stats_tool
from megatron_dchag.cli import make_synthetic_era5 as synth
from megatron_dchag.config import ConfigError, dump_config, load_config, summarize_config
from megatron_dchag.data.era5.statistics import load_era5_stats, save_era5_stats

TINY = "configs/era5/tiny.yaml"
CHANNELS = ["z_500", "z_850", "t_500", "t_850", "u_500", "u_850", "v_500", "v_850", "q_500", "q_850", "t2m", "u10",
            "v10", "lsm", "orography"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 days, 6-hourly (12 steps), 8x16; statistics over the train split of val_fraction 0.5."""
    root = tmp_path_factory.mktemp("era5_run")
    path, stats = root / "synth.zarr", root / "stats.npz"
    synth.write_era5(synth.generate_synthetic_era5(days=3, resolution=22.5, levels=[500, 850]), path)
    save_era5_stats(stats, stats_tool.compute_era5_stats(str(path), log=lambda *_: None, val_fraction=0.5))
    return dict(path=str(path), stats=str(stats), root=root)


# ----------------------------------------------------------------------------------------------
# Statistics: the train split by default, the time range recorded, a warning otherwise
# ----------------------------------------------------------------------------------------------


def test_statistics_cover_the_train_split_of_the_runs_config(data, tmp_path, capsys):
    out = tmp_path / "stats.npz"
    rc = stats_tool.main(["--config", TINY, "data.val_fraction=0.25", "--data-path", data["path"], "--out", str(out)])
    assert rc == 0
    stats = load_era5_stats(out)
    # 12 steps, val_fraction 0.25: the train split is the first 9 (2018-01-01T00 .. 2018-01-03T00).
    assert stats.attrs["num_times"] == 9 and stats.attrs["time_selection"] == "train"
    assert stats.attrs["time_start"] == "2018-01-01T00:00:00" and stats.attrs["time_end"] == "2018-01-03T00:00:00"
    assert float(stats.attrs["val_fraction"]) == 0.25
    assert "warning" not in capsys.readouterr().err
    assert stats_tool.main(["--data-path", data["path"], "--out", str(out), "--val-fraction", "0.5"]) == 0
    assert load_era5_stats(out).attrs["num_times"] == 6
    assert stats_tool.main(["--data-path", data["path"], "--out", str(out)]) == 0  # data.val_fraction's default, 0.1
    assert load_era5_stats(out).attrs["num_times"] == 11


def test_statistics_over_validation_times_warn_once(data, tmp_path, capsys):
    out = tmp_path / "all.npz"
    assert stats_tool.main(["--data-path", data["path"], "--out", str(out), "--all-times", "--val-fraction", "0.5"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "includes 6 of the 6 validation times" in warnings[0], warnings
    assert load_era5_stats(out).attrs["time_selection"] == "all"
    # The run warns too (one line, before any compute) when given such a file.
    from megatron_dchag.tasks.forecasting import ERA5ForecastTask

    cfg = load_config(TINY, _small(data, f"data.stats_file={out}"))
    ERA5ForecastTask(cfg).prepare()
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: data.stats_file '{out}': the statistics and climatology "
                                                   "cover 2018-01-01T00:00:00 .. 2018-01-03T18:00:00"), lines


def test_statistics_tool_errors_are_one_line(tmp_path, capsys):
    assert stats_tool.main(["--out", str(tmp_path / "s.npz")]) == 2
    assert stats_tool.main(["--out", str(tmp_path / "s.npz"), "--config", TINY, "data.val_fraction=2"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0] == "compute_era5_stats: error: --data-path is not given (and --config sets no data.data_path)"
    assert errors[1].startswith("compute_era5_stats: error: data.val_fraction=2.0 must be in [0, 1)")
    assert not (tmp_path / "s.npz").exists()


# ----------------------------------------------------------------------------------------------
# data.channels alone
# ----------------------------------------------------------------------------------------------


def _small(data, *extra):
    return [f"data.data_path={data['path']}", f"data.stats_file={data['stats']}", f"data.channels=[{','.join(CHANNELS)}]",
            "model.image_size=[8,16]", "forecast.max_lead_hours=12", "forecast.eval_lead_hours=[6,12]",
            "data.val_fraction=0.5", "training.micro_batch_size=2", "model.num_channels=15", *extra]


@pytest.mark.parametrize("channels, num_channels, groups, metrics", [
    (CHANNELS, 15, 8, ["z_500", "t_850", "u10", "t2m"]),  # tiny.yaml's G=8 fits 15 channels at TP=2: kept
    (["z_500", "t_850", "t2m", "lsm", "orography", "q_850"], 6, 6, ["z_500", "t_850", "t2m"]),  # G=8 cannot: 6
    (["z_500", "geopotential_850", "t2m"], 3, 2, ["z_500", "t2m"]),  # long names count as their channel
])
def test_channel_list_sets_the_fields_that_follow_from_it(channels, num_channels, groups, metrics):
    cfg = load_config(TINY, [f"data.channels=[{','.join(channels)}]"], world_size=2, workload_sections=("forecast",))
    assert (cfg.model.num_channels, cfg.model.channel_groups, cfg.forecast.metric_variables) == (
        num_channels, groups, metrics)


def test_channel_list_keeps_fields_given_beside_it():
    """A value given on the command line next to data.channels is the user's: checked, not replaced."""
    cfg = load_config(TINY, ["data.channels=[z_500,t_850,t2m]", "forecast.metric_variables=[z_500]",
                             "model.channel_groups=2"], world_size=2, workload_sections=("forecast",))
    assert cfg.forecast.metric_variables == ["z_500"] and cfg.model.channel_groups == 2
    cfg = load_config(TINY, ["data.channels=[z_500,t_850,t2m]", "model.num_channels=4"], world_size=2,
                      workload_sections=("forecast",))
    from megatron_dchag.config import resolve_config
    from megatron_dchag.models.forecast import forecast_channels

    with pytest.raises(ConfigError, match="model.num_channels=4 does not match the 3 channels of data.channels"):
        forecast_channels(resolve_config(cfg))
    # The YAML's own values stand when data.channels is not given (the 80 default channels).
    cfg = load_config(TINY, [], world_size=2, workload_sections=("forecast",))
    assert (cfg.model.num_channels, cfg.model.channel_groups) == (80, 8)


def test_channel_groups_follow_the_aggregation_tree():
    """G is lowered until the tree's chunks fit a group (8 channels, tree [2]: groups need >= 3)."""
    cfg = load_config(TINY, ["data.channels=[z_50,z_100,z_500,z_850,t_500,t_850,t2m,u10]", "model.aggregation_tree=[2]"],
                      world_size=2, workload_sections=("forecast",))
    assert cfg.model.num_channels == 8 and cfg.model.channel_groups == 2


# ----------------------------------------------------------------------------------------------
# --skip-train --load RUN uses the run's saved config
# ----------------------------------------------------------------------------------------------


def _saved_run(root, data):
    """A run directory as the trainer leaves it: a checkpoint whose config.yaml was trained with overrides."""
    run = root / "run"
    ckpt = run / "iter_0000004"
    ckpt.mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("4")
    (ckpt / "metadata.json").write_text("{}")
    saved = load_config(TINY, _small(data, "model.hidden_size=32", f"training.save={run}", "training.log_dir=elsewhere"))
    (ckpt / "config.yaml").write_text(dump_config(saved))
    return run


def test_skip_train_load_uses_the_saved_config(data, tmp_path):
    from megatron_dchag.training.arguments import parse_run_arguments

    run = _saved_run(tmp_path, data)
    args = parse_run_arguments(["--skip-train", "--load", str(run), "--tensor-model-parallel-size", "1"], "t",
                               world_size=1, workload_sections=("forecast",))
    cfg = args.config
    assert cfg.model.hidden_size == 32 and cfg.model.num_channels == 15 and cfg.data.channels == CHANNELS
    assert cfg.parallel.tensor_model_parallel_size == 1 and cfg.training.skip_train and cfg.training.load == str(run)
    assert cfg.training.save is None and cfg.training.log_dir is None  # the run's outputs are not reused
    assert args.config_path == str(run / "iter_0000004" / "config.yaml")
    # --config still wins (and then the overrides are needed again).
    cfg = parse_run_arguments(["--config", TINY, "--skip-train", "--load", str(run)], "t", world_size=2,
                              workload_sections=("forecast",)).config
    assert cfg.model.hidden_size == 128
    with pytest.raises(ConfigError, match=r"world size 1 is not divisible .* \(with the config saved by the run"):
        parse_run_arguments(["--skip-train", "--load", str(run)], "t", world_size=1, workload_sections=("forecast",))


# ----------------------------------------------------------------------------------------------
# Evaluation counts and the console
# ----------------------------------------------------------------------------------------------


def test_eval_counts_distinct_initial_times(data):
    """6 evaluation batches of 2 asked for, but the validation window has only 4 initial times
    valid for both leads: 2 batches per lead, so the stream cycles. Each forecast counts once."""
    from megatron_dchag.tasks.forecasting import ERA5ForecastTask

    cfg = load_config(TINY, _small(data, "training.eval_iters=6"))
    task = ERA5ForecastTask(cfg)
    task.prepare()
    c = len(CHANNELS)
    model = SimpleNamespace(input_channel_range=(0, c), output_channel_range=(0, c), output_channel_names=list(CHANNELS),
                            output_input_index=torch.arange(c))
    stream = task.eval_stream(model, 0, 1)
    seen = []
    for _ in range(6):
        batch = next(stream)
        seen += list(zip(batch["lead_time_hours"].tolist(), batch["time_index"].tolist()))
        task._update_metrics(batch["target"], batch)
    stream.close()
    assert len(seen) == 12 and len(set(seen)) == 8  # the stream repeated 4 forecasts
    counts = {lead: max(e["num_samples"] for e in per.values()) for lead, per in task._metrics.compute().items()}
    assert counts == {6: 4, 12: 4}
    assert "4 forecasts per lead time (distinct initial times, the same at every lead)" in task.markdown_table({}, 0, counts)
    assert "forecasts (distinct initial times) per lead time: 4 at 6h, 2 at 12h" in task.markdown_table({}, 0, {6: 4, 12: 2})


def test_console_config_summarises_long_lists():
    wavelengths = [round(400.0 + 0.136 * i, 3) for i in range(3681)]
    cfg = load_config("configs/hyperspectral/tiny.yaml", ["model.num_channels=3681", "model.channel_groups=2",
                                                          f"model.wavelengths={wavelengths}"])
    full, short = dump_config(cfg), summarize_config(cfg)
    assert len(full.splitlines()) > 300 and len(short.splitlines()) < 60
    assert "wavelengths: [400.0, 400.136, 400.272, 400.408, ..., 900.072, 900.208, 900.344, 900.48] (3681 values)" in short
    assert yaml.safe_load(full)["model"]["wavelengths"] == wavelengths  # config.yaml keeps the list whole

"""Plot forecasts from a checkpoint: truth, prediction and error maps per variable and lead time.

Runs as one process at TP=1 whatever TP the checkpoint was trained with (it reshards on load):

    python tools/plot_forecast.py --load RUN_DIR --out forecast.png \\
        [--variables z_500 t_850] [--leads 6 24 72] [--index 0] [--split val] [--data-path DATA] [--stats-file STATS]

The model config is read from the checkpoint's ``config.yaml``; ``--data-path`` / ``--stats-file``
override where the data is. All leads start from the same initial time: the ``--index``-th
initial time of the split that has a target at every lead. Rows are (variable, lead); columns are
the truth at ``t + Δ``, the prediction, prediction − truth and persistence − truth (the last two on
the same colour scale). Values are in physical units; RMSEs in the titles are latitude-weighted.
Installed as the console script ``dchag-plot-forecast`` with the same flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np


def forecast(args) -> dict:
    import torch

    from megatron_dchag.data.era5.dataset import ERA5Dataset
    from megatron_dchag.data.era5.naming import parse_channels
    from megatron_dchag.distributed import destroy_distributed, initialize_distributed
    from megatron_dchag.metrics import latitude_weights, weighted_rmse
    from megatron_dchag.models.forecast import forecast_channels
    from megatron_dchag.tasks.forecasting import ERA5ForecastTask
    from megatron_dchag.training.builder import build_single_model
    from megatron_dchag.training.checkpoint_conversion import config_for_layout, saved_checkpoint_config
    from megatron_dchag.training.checkpointing import (
        load_checkpoint)

    ckpt, saved = saved_checkpoint_config(args.load)
    cfg = config_for_layout(saved, 1, 1, task="era5_forecast")  # TP = PP = 1, the saved channel groups kept
    cfg.training.bf16 = False
    data_path = args.data_path or cfg.data.data_path
    stats_file = args.stats_file or cfg.data.stats_file
    fc = cfg.forecast
    channels = forecast_channels(cfg)
    variables = [s.name for s in parse_channels(args.variables or fc.metric_variables)]
    missing = [v for v in variables if v not in channels.outputs]
    if missing:
        raise ValueError(f"--variables: {missing} are not outputs of this model ({list(channels.outputs)[:8]}...)")
    leads = [int(x) for x in (args.leads or fc.eval_lead_hours)]
    initialize_distributed(1, 1, seed=cfg.training.seed)
    try:
        dataset = ERA5Dataset(
            data_path, channels=list(channels.inputs), output_channels=list(channels.outputs), lead_times_hours=leads,
            stats_file=stats_file, split=args.split, val_fraction=cfg.data.val_fraction, cache=False,
        )
        task = ERA5ForecastTask(cfg)
        task.latitudes = dataset.latitudes  # what prepare() reads from the data (the tool skips its checks)
        model = build_single_model(cfg, task)  # the model of the saved config, as trained
        load_checkpoint(args.load, [model], load_rng=False)
        model.eval()
        starts = dataset.valid_start_indices
        time_index = int(starts[args.index % len(starts)])
        out_idx = [channels.outputs.index(v) for v in variables]
        in_idx = [channels.output_input_index[k] for k in out_idx]
        weights = latitude_weights(dataset.latitudes, fc.latitude_weighting)
        mean, std = dataset.output_mean.double(), dataset.output_std.double()
        in_mean, in_std = dataset.input_mean.double(), dataset.input_std.double()
        panels = []
        for lead in leads:
            item = dataset[(time_index, lead)]
            with torch.no_grad():
                out = model(item["input"].unsqueeze(0), lead_time_hours=item["lead_time_hours"].reshape(1),
                            input_time_s=item["time"].reshape(1))  # read only with forecast.time_features
            pred = out[1][0].double()
            for v, k, j in zip(variables, out_idx, in_idx):
                truth = (item["target"][k].double() * std[k] + mean[k]).numpy()
                prediction = (pred[k] * std[k] + mean[k]).numpy()
                persistence = (item["input"][j].double() * in_std[j] + in_mean[j]).numpy()
                panels.append(dict(
                    variable=v, lead=lead, truth=truth, prediction=prediction, persistence=persistence,
                    rmse=float(weighted_rmse(prediction[None], truth[None], weights)),
                    persistence_rmse=float(weighted_rmse(persistence[None], truth[None], weights)),
                ))
        init_time = np.datetime64(int(dataset._times_s[time_index]), "s")
    finally:
        destroy_distributed()
    return dict(panels=panels, latitudes=dataset.latitudes, longitudes=dataset.longitudes, init_time=init_time,
                checkpoint=ckpt)


def plot(result: dict, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from megatron_dchag.data.era5.naming import parse_channel

    panels = result["panels"]
    lat, lon = result["latitudes"], result["longitudes"]
    order = np.argsort(lat)
    extent = (float(lon[0]), float(lon[-1]), float(lat[order][0]), float(lat[order][-1]))
    fig, axes = plt.subplots(len(panels), 4, figsize=(17, 2.6 * len(panels) + 0.6), squeeze=False)
    for row, p in enumerate(panels):
        units = parse_channel(p["variable"]).info.units
        lo, hi = np.percentile(p["truth"], 1), np.percentile(p["truth"], 99)
        err, perr = p["prediction"] - p["truth"], p["persistence"] - p["truth"]
        emax = float(np.percentile(np.abs(np.concatenate([err.ravel(), perr.ravel()])), 99)) or 1.0
        cells = (
            (p["truth"], f"{p['variable']} truth, +{p['lead']}h", "viridis", lo, hi),
            (p["prediction"], f"prediction (RMSE {p['rmse']:.3g})", "viridis", lo, hi),
            (err, "prediction − truth", "RdBu_r", -emax, emax),
            (perr, f"persistence − truth (RMSE {p['persistence_rmse']:.3g})", "RdBu_r", -emax, emax),
        )
        for col, (field, title, cmap, vmin, vmax) in enumerate(cells):
            ax = axes[row, col]
            im = ax.imshow(field[order], origin="lower", extent=extent, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([0, 90, 180, 270])
            ax.set_yticks([-60, 0, 60])
            ax.tick_params(labelsize=7)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(units, fontsize=8)
    fig.suptitle(f"D-CHAG forecast from {str(result['init_time'])[:16]} UTC ({os.path.basename(result['checkpoint'])})")
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint (save directory or iter_* directory)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--variables", nargs="+", default=None, help="output channels (default: forecast.metric_variables)")
    parser.add_argument("--leads", nargs="+", type=int, default=None, help="lead times in hours (default: forecast.eval_lead_hours)")
    parser.add_argument("--index", type=int, default=0, help="which initial time of the split")
    parser.add_argument("--split", default="val", choices=("train", "val", "all"))
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--stats-file", default=None)
    args = parser.parse_args(argv)
    from megatron_dchag.training.entry_point import report_user_error, user_errors

    try:
        result = forecast(args)
    except (ValueError, KeyError, *user_errors()) as exc:
        return report_user_error(exc)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    plot(result, args.out)
    lines = [f"{p['variable']} +{p['lead']}h: RMSE {p['rmse']:.4g} (persistence {p['persistence_rmse']:.4g})"
             for p in result["panels"]]
    print(f"wrote {args.out}\n  " + "\n  ".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

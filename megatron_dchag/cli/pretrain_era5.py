"""Weather forecasting with a D-CHAG ViT on ERA5 (or ERA5-shaped) data: the entry point's ``main``.

    python pretrain_era5.py --config configs/era5/tiny.yaml --data-path DATA.zarr data.stats_file=STATS.npz [overrides]
    dchag-pretrain-era5 --config configs/era5/tiny.yaml --data-path DATA.zarr data.stats_file=STATS.npz [overrides]
    torchrun --nproc-per-node 2 pretrain_era5.py --config ... --tensor-model-parallel-size 2
    srun -n 16 python pretrain_era5.py --config configs/era5/paper.yaml ...
    python pretrain_era5.py --config ... --skip-train --load RUN_DIR --log-dir EVAL_DIR   # evaluate a checkpoint

The root ``pretrain_era5.py`` is a thin wrapper around :func:`main`. See README.md (section "Weather
forecasting (ERA5)") for the data preparation, flags and outputs. The task is named, not imported,
so ``--help`` and config errors answer before torch is imported.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_dchag.training.entry_point import TaskRef, run_entry_point

TASK = TaskRef("megatron_dchag.tasks.forecasting", "ERA5ForecastTask", config_sections=("forecast",))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_entry_point(argv, TASK, "D-CHAG weather forecasting on ERA5")

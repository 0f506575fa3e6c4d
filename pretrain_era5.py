#!/usr/bin/env python
"""Weather forecasting with a D-CHAG ViT on ERA5 (or ERA5-shaped) data.

    python pretrain_era5.py --config configs/era5/tiny.yaml --data-path DATA.zarr data.stats_file=STATS.npz [overrides]
    torchrun --nproc-per-node 2 pretrain_era5.py --config ... --tensor-model-parallel-size 2
    srun -n 16 python pretrain_era5.py --config configs/era5/paper.yaml ...
    python pretrain_era5.py --config ... --skip-train --load RUN_DIR --log-dir EVAL_DIR   # evaluate a checkpoint

See README.md (section "Weather forecasting (ERA5)") for the data preparation, flags and outputs.
"""

import sys

from megatron_dchag.tasks.forecasting import ERA5ForecastTask
from megatron_dchag.training.entry_point import run_entry_point


def main(argv=None) -> int:
    return run_entry_point(argv, ERA5ForecastTask, "D-CHAG weather forecasting on ERA5")


if __name__ == "__main__":  # guard required: checkpoint saving spawns helper processes
    sys.exit(main())

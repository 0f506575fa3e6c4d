#!/usr/bin/env python
"""Weather forecasting with a D-CHAG ViT on ERA5 (or ERA5-shaped) data.

    python pretrain_era5.py --config configs/era5/tiny.yaml --data-path DATA.zarr data.stats_file=STATS.npz [overrides]
    torchrun --nproc-per-node 2 pretrain_era5.py --config ... --tensor-model-parallel-size 2
    srun -n 16 python pretrain_era5.py --config configs/era5/paper.yaml ...
    python pretrain_era5.py --config ... --skip-train --load RUN_DIR --log-dir EVAL_DIR   # evaluate a checkpoint

A thin wrapper: the entry point is :mod:`megatron_dchag.cli.pretrain_era5` (also installed as the
console script ``dchag-pretrain-era5``). See README.md (section "Weather forecasting (ERA5)") for the
data preparation, flags and outputs.
"""

import sys

from megatron_dchag.cli.pretrain_era5 import main

if __name__ == "__main__":
    sys.exit(main())

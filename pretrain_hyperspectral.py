#!/usr/bin/env python
"""Masked-autoencoder pretraining of a D-CHAG ViT on hyperspectral cubes.

    python pretrain_hyperspectral.py --config configs/hyperspectral/tiny.yaml --data-path DIR [overrides]
    torchrun --nproc-per-node 2 pretrain_hyperspectral.py --config ... --tensor-model-parallel-size 2
    srun -n 16 python pretrain_hyperspectral.py --config configs/hyperspectral/paper.yaml ...

See README.md for the flags, overrides and outputs.
"""

import sys

from megatron_dchag.tasks.mae_pretraining import HyperspectralMAETask
from megatron_dchag.training.entry_point import run_entry_point


def main(argv=None) -> int:
    return run_entry_point(argv, HyperspectralMAETask, "D-CHAG masked-autoencoder pretraining on hyperspectral cubes")


if __name__ == "__main__":  # guard required: checkpoint saving spawns helper processes
    sys.exit(main())

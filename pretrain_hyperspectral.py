#!/usr/bin/env python
"""Masked-autoencoder pretraining of a D-CHAG ViT on hyperspectral cubes.

    python pretrain_hyperspectral.py --config configs/hyperspectral/tiny.yaml --data-path DIR [overrides]
    torchrun --nproc-per-node 2 pretrain_hyperspectral.py --config ... --tensor-model-parallel-size 2
    srun -n 16 python pretrain_hyperspectral.py --config configs/hyperspectral/paper.yaml ...

A thin wrapper: the entry point is :mod:`megatron_dchag.cli.pretrain_hyperspectral` (also installed
as the console script ``dchag-pretrain-hyperspectral``). See README.md for the flags, overrides and
outputs.
"""

import sys

from megatron_dchag.cli.pretrain_hyperspectral import main

if __name__ == "__main__":
    sys.exit(main())

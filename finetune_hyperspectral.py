#!/usr/bin/env python
"""Segmentation fine-tuning of a D-CHAG ViT on labelled hyperspectral cubes, from a pretrained MAE or from scratch.

    python finetune_hyperspectral.py --config configs/hyperspectral/segmentation_tiny.yaml --data-path DIR \
        --pretrained MAE_RUN [segmentation.mode=linear_probe] [overrides]
    torchrun --nproc-per-node 2 finetune_hyperspectral.py --config ... --tensor-model-parallel-size 2 ...

A thin wrapper: the entry point is :mod:`megatron_dchag.cli.finetune_hyperspectral` (also installed
as the console script ``dchag-finetune-hyperspectral``). See docs/downstream.md.
"""

import sys

from megatron_dchag.cli.finetune_hyperspectral import main

if __name__ == "__main__":  # guard required: checkpoint saving spawns helper processes that re-import __main__
    sys.exit(main())

"""Masked-autoencoder pretraining of a D-CHAG ViT on hyperspectral cubes: the entry point's ``main``.

    python pretrain_hyperspectral.py --config configs/hyperspectral/tiny.yaml --data-path DIR [overrides]
    dchag-pretrain-hyperspectral --config configs/hyperspectral/tiny.yaml --data-path DIR [overrides]
    torchrun --nproc-per-node 2 pretrain_hyperspectral.py --config ... --tensor-model-parallel-size 2
    srun -n 16 python pretrain_hyperspectral.py --config configs/hyperspectral/paper.yaml ...

The root ``pretrain_hyperspectral.py`` is a thin wrapper around :func:`main`. See README.md for the
flags, overrides and outputs. The task is named, not imported, so ``--help`` and config errors
answer before torch is imported.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_dchag.training.entry_point import TaskRef, run_entry_point

TASK = TaskRef("megatron_dchag.tasks.mae_pretraining", "HyperspectralMAETask", config_sections=("mae",))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_entry_point(argv, TASK, "D-CHAG masked-autoencoder pretraining on hyperspectral cubes")

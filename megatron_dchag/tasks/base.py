"""The contract between the training layer and a workload (MAE pretraining, forecasting).

A :class:`Task` checks its data, builds its model (one pipeline chunk at a time) and data streams
for the current rank, runs one micro-batch forward for megatron-core's schedules, and may add
evaluation metrics. The training layer owns everything else: building chunks, bf16, DDP,
optimizer and scheduler (:mod:`megatron_dchag.training.builder`), the loop, checkpoints, logging
and signals (:mod:`megatron_dchag.training.trainer`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megatron_dchag.config import ExperimentConfig
from megatron_dchag.data.loader import MicroBatchStream


class Task:
    name: str = "task"
    # Workload sections of the config this task uses (validated; the others are ignored). None: all.
    config_sections: Optional[Tuple[str, ...]] = None

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    # -- set-up (called after parallel state exists) -------------------------------------------
    def prepare(self) -> None:
        """Validate data against the config before any model is built (clear errors early)."""

    def build_model(self, pre_process: bool = True, post_process: bool = True) -> torch.nn.Module:
        raise NotImplementedError

    def train_stream(self, model: torch.nn.Module, dp_rank: int, dp_size: int) -> MicroBatchStream:
        raise NotImplementedError

    def eval_stream(self, model: torch.nn.Module, dp_rank: int, dp_size: int) -> MicroBatchStream:
        raise NotImplementedError

    # -- step -----------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model) -> Tuple[torch.Tensor, Callable]:
        """megatron-core schedule contract: returns ``(output, loss_func)`` where
        ``loss_func(output) -> (loss, {"loss": detached value})``."""
        raise NotImplementedError

    def learning_rate_multipliers(self) -> Dict[str, float]:
        """Parameter-name pattern (``fnmatch``, matched against the names inside the wrapped model
        chunks, so patterns start with ``*``) -> factor on ``training.lr`` and ``training.min_lr``
        for the parameters it matches, e.g. a pretrained encoder fine-tuned more gently. ``{}``
        (the default): one learning rate for every parameter."""
        return {}

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) of one sample, for TFLOP/s."""
        return 0.0

    def checkpoint_differences(self, saved_config: Dict[str, Any]) -> List[str]:
        """Workload-specific reasons a checkpoint (its saved config) does not fit this run, e.g.
        another channel list of the same length; one readable line each."""
        return []

    def pipeline_tensor_shape(self) -> Optional[Tuple[int, int]]:
        """``(seq_length, hidden)`` communicated between pipeline stages, if PP is supported."""
        return None

    def data_warnings(self) -> List[str]:
        """Problems with the data that :meth:`prepare` found but that do not stop the run (e.g.
        statistics computed over validation data), one line each; rank 0 prints them."""
        return []

    def take_step_inputs(self) -> List[Tuple[float, str, str]]:
        """What the training micro-batches forwarded on this rank since the last call held, as
        ``(score, key, description)`` (e.g. a cube file and its largest input value), and forget
        them. The trainer calls it after every step and names the highest-scoring ``key``s when
        the step is not finite."""
        return []

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_extra(self, model: torch.nn.Module, step: int) -> Dict[str, Any]:
        """Task-specific metrics added to the eval record (rank 0's values are logged)."""
        return {}

    def on_train_end(self, model: torch.nn.Module, log_dir: Optional[str]) -> None:
        """Artifacts after training (plots, tables)."""

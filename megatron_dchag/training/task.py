"""The contract between the shared trainer and a workload (MAE pretraining, forecasting).

A :class:`Task` builds its model and data for the current rank, runs one micro-batch forward for
megatron-core's schedules, and may add evaluation metrics. The trainer owns everything else
(parallel set-up, DDP, optimizer, schedule, checkpoints, logging, signals).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from megatron_dchag.config import ExperimentConfig


def compute_device() -> torch.device:
    """Where this rank's model and micro-batches live: its GPU (CUDA or ROCm), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def batch_to_device(batch: Dict[str, Any], device: Optional[torch.device] = None) -> Dict[str, Any]:
    """A shallow copy of ``batch`` with its tensors on ``device`` (default :func:`compute_device`);
    the streams build batches on the CPU (and in worker processes), as megatron's ``get_batch``."""
    device = device or compute_device()
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class MicroBatchStream:
    """An endless, resumable iterator of micro-batches for one data-parallel rank.

    ``state_dict()`` is the state after the last micro-batch returned by ``next`` (what a
    checkpoint saves); :class:`~megatron_dchag.data.loader.MicroBatchLoader`
    implements it with optional background worker processes (``data.num_workers``).
    """

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release background resources (worker processes); the stream stays usable."""


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

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_extra(self, model: torch.nn.Module, step: int) -> Dict[str, Any]:
        """Task-specific metrics added to the eval record (rank 0's values are logged)."""
        return {}

    def on_train_end(self, model: torch.nn.Module, log_dir: Optional[str]) -> None:
        """Artifacts after training (plots, tables)."""

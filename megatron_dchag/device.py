"""Where a rank computes: its accelerator (CUDA or ROCm) if there is one, else the CPU.

The builder moves model chunks there and the tasks move each micro-batch there; the data streams
build batches on the CPU (and in worker processes), as megatron's ``get_batch`` does.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def compute_device() -> torch.device:
    """Where this rank's model and micro-batches live: its GPU (CUDA or ROCm), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def batch_to_device(batch: Dict[str, Any], device: Optional[torch.device] = None) -> Dict[str, Any]:
    """A shallow copy of ``batch`` with its tensors on ``device`` (default :func:`compute_device`);
    on the CPU the batch itself."""
    device = device or compute_device()
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

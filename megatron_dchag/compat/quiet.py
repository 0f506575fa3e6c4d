"""Warnings and log lines of torch and megatron-core that a user of this project cannot act on.

Each is silenced here, with the reason it cannot be acted on; everything else stays visible.
:func:`silence_unactionable_warnings` runs in the entry points before torch is imported.
"""

from __future__ import annotations

import logging
import warnings

# (message start, category, why a user cannot act on it)
_WARNINGS = (
    ("Apex is not installed", UserWarning,
     "megatron-core then uses torch's LayerNorm, which the local path is built for"),
    ("Transformer Engine and Apex are not installed", UserWarning,
     "optional accelerators; the resolved config names the transformer implementation in use"),
    ("full scope is deprecated", UserWarning,
     "megatron-core's own TransformerConfig default for cuda_graph_scope (CUDA graphs are not used)"),
    ("When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
     UserWarning, "a GPU-only tuning hint, raised on CPU too"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning,
     "raised inside megatron-core's own collectives"),
    ("MimoModelConfig is experimental", UserWarning,
     "megatron-core 0.19 raises it at import for a model this project does not use"),
)

# (logger, message start): log records dropped.
_LOG_LINES = (
    # torch.utils.cpp_extension, imported by megatron-core, on a CUDA build of torch without a GPU.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class _DropMessages(logging.Filter):
    def __init__(self, starts):
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_installed = False


def silence_unactionable_warnings() -> None:
    """Install the filters (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    for message, category, _why in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, start in _LOG_LINES:
        logging.getLogger(name).addFilter(_DropMessages([start]))

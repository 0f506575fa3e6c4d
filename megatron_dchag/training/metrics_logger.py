"""Rank-0 logging of training and evaluation: readable lines, ``metrics.jsonl``, TensorBoard, progress bar.

Every record is one JSON object per line in ``<log_dir>/metrics.jsonl`` with a ``kind``
(``train``, ``eval``, ``skip``, ``event``) and a ``step``. The file is opened in append mode and
flushed after every record, so a resumed run continues the same file. Non-rank-0 processes log
nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, log_dir: Optional[str], enabled: bool, total_steps: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.log_dir = log_dir
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._progress = enabled and sys.stdout.isatty()
        self._start = time.time()
        self._tensorboard = tensorboard
        self._opened = False

    def _open(self) -> None:
        """Create the files on the first record, so a run that fails its checks writes nothing."""
        self._opened = True
        if not self.enabled or not self.log_dir:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        self._jsonl = open(os.path.join(self.log_dir, "metrics.jsonl"), "a", buffering=1)
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=os.path.join(self.log_dir, "tensorboard"))
            except Exception:  # tensorboard missing or broken: jsonl is the record of truth
                self._tb = None

    def info(self, message: str) -> None:
        if self.enabled:
            if self._progress:
                sys.stdout.write("\r\033[K")
            print(message, flush=True)

    def record(self, kind: str, step: int, **values: Any) -> Dict[str, Any]:
        rec = {"kind": kind, "step": int(step)}
        rec.update({k: _jsonable(v) for k, v in values.items()})
        if not self.enabled:
            return rec
        if not self._opened:
            self._open()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for key, value in rec.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        return rec

    def progress(self, step: int, loss: float) -> None:
        if not self._progress or not self.total_steps:
            return
        frac = min(1.0, step / self.total_steps)
        bar = "#" * int(30 * frac)
        elapsed = time.time() - self._start
        sys.stdout.write(f"\r[{bar:<30}] {step}/{self.total_steps} loss {loss:.4g} {elapsed:.0f}s")
        sys.stdout.flush()

    def close(self) -> None:
        if self._progress:
            sys.stdout.write("\n")
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def format_train_line(rec: Dict[str, Any]) -> str:
    parts = [f"step {rec['step']:>6}"]
    for key, fmt in (("loss", ".5f"), ("lr", ".3e"), ("grad_norm", ".3f"), ("samples_per_s", ".2f"),
                     ("tflops", ".4f"), ("peak_mem_bytes", None)):
        if key in rec and rec[key] is not None:
            value = rec[key]
            if key == "peak_mem_bytes":
                parts.append(f"peak_mem {value / 2**20:.0f} MiB")
            elif isinstance(value, (int, float)):
                parts.append(f"{key} {value:{fmt}}")
    return " | ".join(parts)

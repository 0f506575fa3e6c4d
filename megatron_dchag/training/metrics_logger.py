"""Rank-0 logging of training and evaluation: readable lines, ``metrics.jsonl``, TensorBoard,
Weights & Biases (optional), a progress bar on a terminal.

Every record is one JSON object per line in ``<log_dir>/metrics.jsonl`` with a ``kind``
(``train``, ``eval``, ``skip``, ``event``) and a ``step``. The file is opened in append mode and
flushed after every record, so a resumed run continues the same file. Non-rank-0 processes log
nothing.

The train line follows Megatron-LM's: iteration, consumed samples, time per iteration, learning
rate, loss, gradient norm, then throughput (samples/s, model TFLOP/s per device and, when a peak is
known, the model-FLOPs utilisation), peak memory and the estimated time left. ``metrics.jsonl``
holds the same values under the keys of :data:`TRAIN_RECORD_KEYS`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, TextIO, Tuple

# The keys a train record of metrics.jsonl has (values may be null: no FLOP count, no known peak).
TRAIN_RECORD_KEYS = (
    "loss", "lr", "grad_norm", "samples_per_s", "tflops", "peak_mem_bytes",  # the original keys
    "train_iters", "consumed_samples", "iteration_time_ms", "mfu", "peak_tflops", "eta_s",
)

# Dense (no sparsity) peak matrix TFLOP/s of one device as its vendor's spec sheet states it:
# (a substring of torch.cuda.get_device_name(), lower case) -> (bf16, fp32). An MI250X package is
# two GCDs and each GCD is one device. fp32 is the plain (non-TF32) matrix rate, since torch does
# not enable TF32 matmuls by default. The first match wins: keep the longer names first.
DEVICE_PEAK_TFLOPS: Sequence[Tuple[str, str, float, float]] = (
    # (match, name shown, bf16, fp32)
    ("mi250x", "AMD MI250X GCD", 191.5, 47.9),
    ("mi250", "AMD MI250X GCD", 191.5, 47.9),
    ("h200", "NVIDIA H200", 989.0, 67.0),
    ("h100", "NVIDIA H100", 989.0, 67.0),
    ("a100", "NVIDIA A100", 312.0, 19.5),
)


@dataclass(frozen=True)
class PeakThroughput:
    """The peak TFLOP/s per device that MFU is stated against, and where the figure came from."""

    tflops: float
    source: str


def device_peak_tflops(device_name: Optional[str], bf16: bool) -> Optional[PeakThroughput]:
    """The dense peak of the device named ``device_name`` (``torch.cuda.get_device_name()``) at the
    run's precision, from :data:`DEVICE_PEAK_TFLOPS`; None for the CPU (``device_name`` None) or a
    device not in the table."""
    if not device_name:
        return None
    name = device_name.lower()
    for match, shown, bf16_peak, fp32_peak in DEVICE_PEAK_TFLOPS:
        if match in name:
            precision = "bf16" if bf16 else "fp32"
            return PeakThroughput(bf16_peak if bf16 else fp32_peak, f"{shown} {precision} dense peak")
    return None


def resolve_peak_tflops(configured: Optional[float], device_name: Optional[str], bf16: bool) -> Optional[PeakThroughput]:
    """``training.peak_tflops`` when set, else the device's peak (None: MFU is not reported)."""
    if configured is not None:
        return PeakThroughput(float(configured), "training.peak_tflops")
    return device_peak_tflops(device_name, bf16)


def format_duration(seconds: Optional[float]) -> str:
    """``hh:mm:ss`` (hours may exceed 24); ``--:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--:--"
    total = int(round(seconds))
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Rank 0's log: lines on stdout, records in ``<log_dir>/metrics.jsonl``, TensorBoard under
    ``<log_dir>/tensorboard`` and, when ``wandb_project`` is given and the package imports, a
    Weights & Biases run (``wandb_exp_name``, files under ``wandb_save_dir``, default
    ``<log_dir>/wandb``). Nothing is created before the first record. ``stream`` (default
    ``sys.stdout``) is where lines and the progress bar go; the bar is drawn only on a terminal."""

    def __init__(self, log_dir: Optional[str], enabled: bool, total_steps: int = 0, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, wandb_exp_name: Optional[str] = None,
                 wandb_save_dir: Optional[str] = None, wandb_config: Optional[Dict[str, Any]] = None,
                 stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.log_dir = log_dir
        self.total_steps = total_steps
        self._stream = stream if stream is not None else sys.stdout
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._wandb_args = dict(project=wandb_project, name=wandb_exp_name, dir=wandb_save_dir, config=wandb_config)
        self._progress = enabled and self._stream.isatty()
        self._progress_drawn = False
        self._start = time.time()
        self._progress_origin: Optional[Tuple[int, float]] = None  # (step, time) the rate counts from
        self._tensorboard = tensorboard
        self._opened = False

    def _open(self) -> None:
        """Create the files on the first record, so a run that fails its checks writes nothing."""
        self._opened = True
        if not self.enabled:
            return
        if self._wandb_args["project"]:
            self._open_wandb()
        if not self.log_dir:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        self._jsonl = open(os.path.join(self.log_dir, "metrics.jsonl"), "a", buffering=1)
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=os.path.join(self.log_dir, "tensorboard"))
            except Exception:  # tensorboard missing or broken: jsonl is the record of truth
                self._tb = None

    def _open_wandb(self) -> None:
        try:
            import wandb
        except ImportError:
            self.warning(f"training.wandb_project={self._wandb_args['project']!r} is set but the wandb package is "
                         "not installed (pip install wandb); logging to metrics.jsonl and TensorBoard only")
            return
        save_dir = self._wandb_args["dir"] or (os.path.join(self.log_dir, "wandb") if self.log_dir else None)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        self._wandb = wandb.init(project=self._wandb_args["project"], name=self._wandb_args["name"], dir=save_dir,
                                 config=self._wandb_args["config"])

    def _clear_progress(self) -> None:
        if self._progress_drawn:
            self._stream.write("\r\033[K")
            self._progress_drawn = False

    def info(self, message: str) -> None:
        if self.enabled:
            self._clear_progress()
            print(message, file=self._stream, flush=True)

    def warning(self, message: str) -> None:
        """One ``warning:`` line on stderr (rank 0)."""
        if self.enabled:
            self._clear_progress()
            self._stream.flush()
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def record(self, kind: str, step: int, **values: Any) -> Dict[str, Any]:
        rec = {"kind": kind, "step": int(step)}
        rec.update({k: _jsonable(v) for k, v in values.items()})
        if not self.enabled:
            return rec
        if not self._opened:
            self._open()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(rec) + "\n")
        numbers = {f"{kind}/{key}": value for key, value in rec.items()
                   if isinstance(value, (int, float)) and key != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None and numbers:
            self._wandb.log(numbers, step=int(step))
        return rec

    def progress(self, step: int, loss: float) -> None:
        """Redraw the one-line bar: steps done, loss, rate, elapsed time and ETA. The line is
        cleared to its end first, so a shorter line leaves nothing of the previous one behind."""
        if not self._progress or not self.total_steps:
            return
        now = time.time()
        if self._progress_origin is None:  # a resumed run: the rate counts from its first step
            self._progress_origin = (step - 1, self._start)
        done = step - self._progress_origin[0]
        rate = done / max(now - self._progress_origin[1], 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else None
        frac = min(1.0, step / self.total_steps)
        bar = "#" * int(30 * frac)
        speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it" if rate > 0 else "- it/s"
        self._stream.write(f"\r\033[K[{bar:<30}] {step}/{self.total_steps} | loss {loss:.4g} | {speed} | "
                           f"elapsed {format_duration(now - self._start)} | ETA {format_duration(eta)}")
        self._stream.flush()
        self._progress_drawn = True

    def close(self) -> None:
        if self._progress_drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._progress_drawn = False
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def format_train_line(rec: Dict[str, Any]) -> str:
    """The Megatron-LM style train line of a train record; a value that is null (no FLOP count, no
    known peak) is left out rather than shown as zero."""
    total = rec.get("train_iters")
    width = max(len(str(total)) if total else 0, 6)
    parts = [f" iteration {rec['step']:>{width}}/{total:>{width}}" if total else f" iteration {rec['step']:>{width}}"]
    if rec.get("consumed_samples") is not None:
        parts.append(f"consumed samples: {rec['consumed_samples']:>10}")
    if rec.get("iteration_time_ms") is not None:
        parts.append(f"elapsed time per iteration (ms): {rec['iteration_time_ms']:.1f}")
    parts.append(f"learning rate: {_number(rec.get('lr'), '.6E')}")
    parts.append(f"loss: {_number(rec.get('loss'), '.6E')}")
    if rec.get("grad_norm") is not None:
        parts.append(f"grad norm: {_number(rec.get('grad_norm'), '.3f')}")
    if rec.get("samples_per_s") is not None:
        parts.append(f"samples/s: {rec['samples_per_s']:.2f}")
    if rec.get("tflops") is not None:
        parts.append(f"TFLOP/s per GPU: {rec['tflops']:.4g}")
    if rec.get("mfu") is not None and rec.get("peak_tflops"):
        parts.append(f"MFU: {100 * rec['mfu']:.2f}% of {rec['peak_tflops']:g} TFLOP/s")
    if rec.get("peak_mem_bytes") is not None:
        parts.append(f"peak memory (MiB): {rec['peak_mem_bytes'] / 2**20:.0f}")
    if "eta_s" in rec:
        parts.append(f"ETA {format_duration(rec['eta_s'])}")
    return " | ".join(parts)

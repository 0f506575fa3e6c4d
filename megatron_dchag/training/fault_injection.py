"""Deterministic crash injection for reliability tests (never active unless asked for).

Set ``MEGATRON_DCHAG_FAULT`` to one of:

- ``exit_after_iteration:N`` — the process dies (``os._exit(137)``, like ``kill -9``) right after
  iteration N's step (and after any checkpoint saved at N);
- ``kill_in_save:N:STAGE`` — the process dies inside the checkpoint save of iteration N at STAGE
  (``before_write``, ``after_write``: between the shard writes and publishing, ``before_publish``).

- ``nonfinite_at:N[:K]`` — the loss of iterations N..N+K-1 (default K=1) is multiplied by NaN, so
  loss and gradients are non-finite (exercises skipping and the consecutive-failure stop).

``MEGATRON_DCHAG_FAULT_RANK`` (default: every rank) limits the crash to one global rank.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

ENV_VAR = "MEGATRON_DCHAG_FAULT"
RANK_VAR = "MEGATRON_DCHAG_FAULT_RANK"


def _die(reason: str) -> None:
    """Die like a process tree killed by the scheduler: helper processes first, then this one."""
    import multiprocessing

    print(f"[fault injection] {reason}: exiting abruptly", file=sys.stderr, flush=True)
    for child in multiprocessing.active_children():  # e.g. dist_checkpointing's writer manager
        child.kill()
    os._exit(137)


def _applies_to(rank: int) -> bool:
    only = os.environ.get(RANK_VAR)
    return only is None or int(only) == rank


def exit_after_iteration(rank: int) -> Optional[int]:
    spec = os.environ.get(ENV_VAR, "")
    if spec.startswith("exit_after_iteration:") and _applies_to(rank):
        return int(spec.split(":")[1])
    return None


def maybe_exit_after(iteration: int, rank: int) -> None:
    target = exit_after_iteration(rank)
    if target is not None and iteration == target:
        _die(f"exit_after_iteration:{iteration}")


def save_fault_hook(iteration: int, rank: int) -> Optional[Callable[[str], None]]:
    spec = os.environ.get(ENV_VAR, "")
    if not spec.startswith("kill_in_save:") or not _applies_to(rank):
        return None
    _, it, stage = spec.split(":")
    if int(it) != iteration:
        return None

    def hook(current_stage: str) -> None:
        if current_stage == stage:
            _die(f"kill_in_save:{iteration}:{stage}")

    return hook


def nonfinite_at(iteration: int) -> bool:
    spec = os.environ.get(ENV_VAR, "")
    if not spec.startswith("nonfinite_at:"):
        return False
    parts = spec.split(":")
    start, count = int(parts[1]), int(parts[2]) if len(parts) > 2 else 1
    return start <= iteration < start + count


def poison_forward_step(forward_step: Callable) -> Callable:
    """Wrap a task's forward step so its output (the loss) becomes NaN."""

    def poisoned(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)
        output = output * float("nan")

        def poisoned_loss_func(output_tensor):
            loss, reported = loss_func(output_tensor)
            return loss, {k: v * float("nan") if k == "loss" else v for k, v in reported.items()}

        return output, poisoned_loss_func

    return poisoned

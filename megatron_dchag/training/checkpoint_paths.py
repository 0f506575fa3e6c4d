"""Where checkpoints lie in a save directory, and whether a directory holds one (no torch).

Layout of a save directory (see :mod:`megatron_dchag.training.checkpointing` for how it is
written)::

    <save>/latest_checkpointed_iteration.txt   # the tracker: "<iteration>" (written last, atomically)
    <save>/iter_0000100/                       # one dist_checkpointing directory per save
    <save>/iter_0000200.partial-<run>-<nonce>/ # a save in progress (or of a run that died)
    <save>/.dchag-run.lock                     # the running job's lock (megatron_dchag.training.run_lock)
    <save>/config.yaml, metrics.jsonl, ...     # the run's logs when --log-dir is not given

Kept apart from the checkpoint I/O so that the command line can check ``--load`` (and read a saved
run's config) before torch or megatron-core is imported.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from typing import Optional

import yaml

TRACKER_FILE = "latest_checkpointed_iteration.txt"
ITER_RE = re.compile(r"^iter_(\d{7})$")
PARTIAL_MARK = ".partial-"
# Names this process's unfinished saves and its lock (rank 0's value is the one used).
PROCESS_TAG = uuid.uuid4().hex[:8]
LOCK_FILE = ".dchag-run.lock"

# What a run writes into its save directory besides checkpoints: a directory holding only these
# (or nothing) holds no checkpoint yet.
RUN_OUTPUTS = (LOCK_FILE, "config.yaml", ".config.yaml.tmp", "metrics.jsonl", "tensorboard", "forecast_metrics.md",
               "wandb")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def partial_dir(final: str) -> str:
    """Where a save of ``final`` is written until it is published: tagged with this process."""
    return f"{final}{PARTIAL_MARK}{PROCESS_TAG}-{uuid.uuid4().hex[:8]}"


def remove_unfinished_saves(save_dir: str, only_this_process: bool) -> None:
    """Remove ``*.partial-*`` directories and ``*.tmp-*`` files in ``save_dir``: this process's
    (``only_this_process``), or every one, which only the holder of the directory's lock may do
    (another run cannot be writing them)."""
    if not os.path.isdir(save_dir):
        return
    for name in os.listdir(save_dir):
        unfinished = PARTIAL_MARK in name or ".tmp-" in name
        if unfinished and (not only_this_process or f"{PARTIAL_MARK}{PROCESS_TAG}-" in name):
            path = os.path.join(save_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass


def read_tracker(load_dir: str) -> Optional[int]:
    """The iteration of the latest complete checkpoint in ``load_dir`` (None if there is none)."""
    path = os.path.join(load_dir, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        text = fh.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"tracker file '{path}' should hold an iteration number, found '{text[:40]}'")
    return int(text)


def resolve_checkpoint_dir(load: str) -> str:
    """``load`` may be a save directory (with a tracker) or one ``iter_*`` directory."""
    if not os.path.exists(load):
        raise CheckpointError(f"checkpoint directory '{load}' does not exist")
    if not os.path.isdir(load):
        raise CheckpointError(f"checkpoint directory '{load}' is a file, not a directory")
    if os.path.isfile(os.path.join(load, "metadata.json")):
        return load
    iteration = read_tracker(load)
    if iteration is None:
        raise CheckpointError(
            f"'{load}' holds no complete checkpoint (no {TRACKER_FILE} and no metadata.json)"
        )
    path = iteration_dir(load, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"tracker in '{load}' points to iteration {iteration} but '{path}' is missing")
    return path


def holds_no_checkpoint_yet(load: str) -> bool:
    """True when ``load`` is missing, or is a directory holding nothing but what a run writes
    before its first checkpoint (its lock, logs, unfinished saves): a first launch with
    ``--load X --save X``. Anything else (a checkpoint, or files that are not ours) is False."""
    if not os.path.exists(load):
        return True
    if not os.path.isdir(load):
        return False
    return all(name in RUN_OUTPUTS or name.startswith(LOCK_FILE) or PARTIAL_MARK in name for name in os.listdir(load))


def read_checkpoint_config(checkpoint_dir: str) -> Optional[dict]:
    path = os.path.join(checkpoint_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return yaml.safe_load(fh)

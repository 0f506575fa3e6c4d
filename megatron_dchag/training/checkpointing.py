"""Checkpoints with megatron-core ``dist_checkpointing``: atomic, reshardable, exactly resumable.

Layout of a save directory::

    <save>/latest_checkpointed_iteration.txt   # the tracker: "<iteration>" (written last, atomically)
    <save>/iter_0000100/                       # one dist_checkpointing directory per save
        config.yaml                            # the resolved experiment config
        ... dist_checkpointing shards and metadata (model, optimizer, scheduler, RNG, data position)

A save writes into ``iter_XXXXXXX.partial-<nonce>/``; only after every rank has finished (barrier)
does rank 0 rename it to its final name and then replace the tracker. A crash or ``kill -9`` at
any point leaves the previous checkpoint and tracker untouched; stale ``*.partial-*`` directories
are ignored by loads and removed by the next save.

Model weights are sharded tensors (megatron's TP layers along their TP axis, D-CHAG channel-group
parameters one tensor per group, see :mod:`megatron_dchag.layers.sharded_state`), so a checkpoint
loads under any TP size dividing G and any PP/DP layout.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megatron_dchag.layers.embeddings import interpolate_pos_embedding

TRACKER_FILE = "latest_checkpointed_iteration.txt"
ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def read_tracker(load_dir: str) -> Optional[int]:
    """The iteration of the latest complete checkpoint in ``load_dir`` (None if there is none)."""
    path = os.path.join(load_dir, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"tracker file '{path}' should hold an iteration number, found '{text[:40]}'")
    return int(text)


def resolve_checkpoint_dir(load: str) -> str:
    """``load`` may be a save directory (with a tracker) or one ``iter_*`` directory."""
    if not os.path.exists(load):
        raise CheckpointError(f"checkpoint directory '{load}' does not exist")
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


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def replace_dir_atomically(staging: str, target: str) -> None:
    """Put the finished directory ``staging`` at ``target`` by renames; an existing ``target`` is
    moved aside first and removed only once the new one is in place."""
    if os.path.exists(target):
        old = f"{target}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _broadcast_str(value: Optional[str]) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state() -> Dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state) -> ShardedObject:
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    return ShardedObject("rng_state", state, (pp_size, tp_size), (pp, tp), replica_id=dp)


@dataclass
class TrainingState:
    """Everything besides model/optimizer that a resume needs."""

    iteration: int = 0
    consumed_samples: int = 0
    data_state: Optional[dict] = None
    layout: Optional[dict] = None  # {"tp":, "pp":, "dp":} at save time
    task: Optional[str] = None  # which workload built the model (tools rebuild it from the checkpoint)
    has_optimizer: bool = True  # False for weights-only checkpoints (e.g. imported from a portable file)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def build_sharded_state_dict(
    models: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    state: Optional[TrainingState] = None,
    config_dict: Optional[dict] = None,
    is_loading: bool = False,
    include_rng: bool = True,
) -> Dict[str, Any]:
    sd: Dict[str, Any] = {}
    for i, m in enumerate(models):
        key = "model" if len(models) == 1 else f"model{i}"
        sd[key] = _unwrap(m).sharded_state_dict()
    if optimizer is not None:
        # Nested per chunk: interleaved-pipeline chunks have equal local names ("layers.0....")
        # that a flat merge would let overwrite each other.
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
        )
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if state is not None:
        sd["training_state"] = dict(
            iteration=state.iteration, consumed_samples=state.consumed_samples,
            data_state=state.data_state, layout=state.layout, task=state.task,
            has_optimizer=optimizer is not None,
        )
    if config_dict is not None:
        sd["config"] = config_dict
    if include_rng:
        sd["rng_state"] = _rng_sharded_object(rng_state())
    return sd


def save_checkpoint(
    save_dir: str,
    iteration: int,
    models: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    state: Optional[TrainingState] = None,
    config_dict: Optional[dict] = None,
    keep_last: Optional[int] = None,
    fault_hook: Optional[Callable[[str], None]] = None,
) -> str:
    """Save atomically; returns the final checkpoint directory. Collective over all ranks.

    ``fault_hook(stage)`` is called at stages ``"before_write"``, ``"after_write"`` and
    ``"before_publish"`` (tests inject crashes there).
    """
    rank = dist.get_rank()
    final = iteration_dir(save_dir, iteration)
    staging = _broadcast_str(f"{final}.partial-{uuid.uuid4().hex[:8]}" if rank == 0 else None)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        for name in os.listdir(save_dir):  # leftovers of crashed saves
            if ".partial-" in name or ".tmp-" in name:
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    sd = build_sharded_state_dict(models, optimizer, scheduler, state, config_dict)
    if fault_hook:
        fault_hook("before_write")
    dist_checkpointing.save(sd, staging, validate_access_integrity=True)
    if fault_hook:
        fault_hook("after_write")
    dist.barrier()
    if rank == 0:
        if config_dict is not None:
            _atomic_write_text(os.path.join(staging, "config.yaml"),
                              yaml.safe_dump(config_dict, sort_keys=False, default_flow_style=None, width=120))
        if fault_hook:
            fault_hook("before_publish")
        replace_dir_atomically(staging, final)  # re-saving the same iteration replaces it
        _fsync_dir(save_dir)
        _atomic_write_text(os.path.join(save_dir, TRACKER_FILE), str(iteration))
        if keep_last:
            _prune(save_dir, keep_last, iteration)
    dist.barrier()
    return final


def _prune(save_dir: str, keep_last: int, current: int) -> None:
    iters = sorted(int(m.group(1)) for m in (ITER_RE.match(n) for n in os.listdir(save_dir)) if m)
    for it in iters[:-keep_last]:
        if it != current:
            shutil.rmtree(iteration_dir(save_dir, it), ignore_errors=True)


def _prepare_shape_changes(sd: Dict[str, Any], ckpt: str, weights_only: bool, can_resize: bool) -> Dict[str, List[str]]:
    """Compare model tensor shapes with the checkpoint's; make position embeddings loadable at
    their saved shape (to be interpolated); reject anything else with a clear list."""
    metadata = dist_checkpointing.load_tensors_metadata(ckpt)
    resized: Dict[str, List[str]] = {}
    problems = []
    for model_key, entries in sd.items():
        if not model_key.startswith("model") or not isinstance(entries, dict):
            continue
        for name, entry in list(entries.items()):
            if not isinstance(entry, ShardedTensor) or entry.key not in metadata:
                continue
            saved_shape = tuple(metadata[entry.key].global_shape)
            if saved_shape == tuple(entry.global_shape):
                continue
            if name.endswith("pos_embedding") and weights_only and can_resize:
                entries[name] = ShardedTensor.from_rank_offsets(
                    entry.key, torch.empty(saved_shape, dtype=entry.dtype), replica_id=entry.replica_id
                )
                resized.setdefault(model_key, []).append(name)
            else:
                problems.append(f"{entry.key}: checkpoint {saved_shape} vs model {tuple(entry.global_shape)}")
    if problems:
        hint = " (a different image size loads with --finetune)" if any("pos_embedding" in p for p in problems) else ""
        raise CheckpointError(f"checkpoint '{ckpt}' does not fit the model{hint}: " + "; ".join(problems[:6]))
    return resized


def read_checkpoint_config(checkpoint_dir: str) -> Optional[dict]:
    path = os.path.join(checkpoint_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return yaml.safe_load(fh)


def load_checkpoint(
    load: str,
    models: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    load_rng: bool = True,
    strict: bool = True,
    saved_grid: Optional[Tuple[int, int]] = None,
    current_grid: Optional[Tuple[int, int]] = None,
) -> TrainingState:
    """Load into the given objects (weights only when ``optimizer``/``scheduler`` are None).

    A position embedding saved for another patch grid (``saved_grid`` -> ``current_grid``) is
    interpolated, when loading weights only; any other shape difference is a CheckpointError that
    lists the tensors."""
    ckpt = resolve_checkpoint_dir(load)
    try:
        common = dist_checkpointing.load_common_state_dict(ckpt)
    except Exception as exc:  # missing or corrupt common.pt / metadata
        raise CheckpointError(f"checkpoint '{ckpt}' cannot be read: {str(exc).splitlines()[0][:200]}") from None
    saved_layout = (common.get("training_state") or {}).get("layout")
    if optimizer is not None and not (common.get("training_state") or {}).get("has_optimizer", True):
        raise CheckpointError(
            f"checkpoint '{ckpt}' holds weights only (no optimizer state); load it with --finetune or --skip-train"
        )
    here = dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
    )
    same_layout = saved_layout == here
    use_rng = load_rng and same_layout  # RNG states are per rank: only meaningful in the same layout
    sd = build_sharded_state_dict(
        models, optimizer, scheduler, TrainingState(), None, is_loading=True, include_rng=use_rng
    )
    sd.pop("training_state", None)
    if scheduler is None:
        sd.pop("opt_param_scheduler", None)
    resized = _prepare_shape_changes(sd, ckpt, weights_only=optimizer is None,
                                     can_resize=saved_grid is not None and current_grid is not None)
    loaded = dist_checkpointing.load(sd, ckpt)
    for i, m in enumerate(models):
        key = "model" if len(models) == 1 else f"model{i}"
        for name in resized.get(key, ()):
            loaded[key][name] = interpolate_pos_embedding(loaded[key][name], saved_grid, current_grid)
        _unwrap(m).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if use_rng and "rng_state" in loaded:
        set_rng_state(loaded["rng_state"])
    ts = common.get("training_state") or {}
    return TrainingState(
        iteration=int(ts.get("iteration", 0)), consumed_samples=int(ts.get("consumed_samples", 0)),
        data_state=ts.get("data_state"), layout=saved_layout, task=ts.get("task"),
        has_optimizer=bool(ts.get("has_optimizer", True)),
    )

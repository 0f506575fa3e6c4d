"""Checkpoints with megatron-core ``dist_checkpointing``: atomic, reshardable, exactly resumable.

Layout of a save directory::

    <save>/latest_checkpointed_iteration.txt   # the tracker: "<iteration>" (written last, atomically)
    <save>/iter_0000100/                       # one dist_checkpointing directory per save
        config.yaml                            # the resolved experiment config
        normalization.json                     # the run's per-channel normalization statistics
        ... dist_checkpointing shards and metadata (model, optimizer, scheduler, RNG, data position)

A save writes into ``iter_XXXXXXX.partial-<process>-<nonce>/``; only after every rank has finished
(barrier) does rank 0 rename it to its final name and then replace the tracker. A crash or ``kill
-9`` at any point leaves the previous checkpoint and tracker untouched; unfinished ``*.partial-*``
directories are ignored by loads. A save removes only its own process's; those of a dead run go
when the next run takes the directory's lock (:mod:`megatron_dchag.training.run_lock`).

Shards are written synchronously in the training process
(:class:`~megatron_dchag.compat.checkpoint_save.InProcessTorchDistSaveStrategy`): no helper process
that a SIGTERM to the job could kill, and no process start at the first save.

Model weights are sharded tensors (megatron's TP layers along their TP axis, D-CHAG channel-group
parameters one tensor per group, see :mod:`megatron_dchag.layers.sharded_state`), so a checkpoint
loads under any TP size dividing G and any PP/DP layout. Under FSDP2 (``parallel.use_torch_fsdp2``)
the same global tensors are written, each DP rank its own rows
(:mod:`megatron_dchag.training.fsdp_state`), so checkpoints move freely between runs with and
without FSDP.
"""

from __future__ import annotations

import os
import pickle
import random
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

from megatron_dchag.compat.checkpoint_save import InProcessTorchDistSaveStrategy
from megatron_dchag.compat.megatron import local_tensor_identity
from megatron_dchag.layers.embeddings import interpolate_pos_embedding
from megatron_dchag.training.checkpoint_paths import (  # noqa: F401  (re-exported: the checkpoint API)
    ITER_RE,
    PARTIAL_MARK,
    TRACKER_FILE,
    CheckpointError,
    iteration_dir,
    partial_dir,
    read_checkpoint_config,
    read_tracker,
    remove_unfinished_saves,
    resolve_checkpoint_dir,
)
from megatron_dchag.training.fsdp_state import FsdpRestore, fsdp_dtensors, has_fsdp_parameters, model_sharded_state_dict

# The run's normalization (megatron_dchag.data.normalization), written with the checkpoint; older
# checkpoints have none.
NORMALIZATION_FILE = "normalization.json"


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
    return _build_sharded_state_dict(models, optimizer, scheduler, state, config_dict, is_loading, include_rng)[0]


def _build_sharded_state_dict(
    models: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    state: Optional[TrainingState] = None,
    config_dict: Optional[dict] = None,
    is_loading: bool = False,
    include_rng: bool = True,
) -> Tuple[Dict[str, Any], Optional[FsdpRestore]]:
    """The sharded state dict, and for FSDP models what turns the loaded tensors back into DTensors."""
    sd: Dict[str, Any] = {}
    fsdp = any(has_fsdp_parameters(m) for m in models)
    for i, m in enumerate(models):
        key = "model" if len(models) == 1 else f"model{i}"
        sd[key] = model_sharded_state_dict(_unwrap(m)) if fsdp else _unwrap(m).sharded_state_dict()
    dtensors = fsdp_dtensors(models, optimizer) if fsdp else []
    if optimizer is not None:
        # Nested per chunk: interleaved-pipeline chunks have equal local names ("layers.0....")
        # that a flat merge would let overwrite each other.
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        with local_tensor_identity(dtensors):
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
    return sd, (FsdpRestore.record(sd, fsdp_dtensors(models, optimizer)) if fsdp else None)


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
    normalization: Optional[str] = None,
) -> str:
    """Save atomically; returns the final checkpoint directory. Collective over all ranks.

    ``normalization`` (rank 0's counts): the JSON record of the run's normalization statistics,
    written as ``normalization.json`` inside the checkpoint before it is published.

    ``fault_hook(stage)`` is called at stages ``"before_write"``, ``"after_write"`` and
    ``"before_publish"`` (tests inject crashes there).
    """
    rank = dist.get_rank()
    final = iteration_dir(save_dir, iteration)
    staging = _broadcast_str(partial_dir(final) if rank == 0 else None)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        remove_unfinished_saves(save_dir, only_this_process=True)  # another run's may be in progress
        os.makedirs(staging)
    dist.barrier()
    sd = build_sharded_state_dict(models, optimizer, scheduler, state, config_dict)
    if fault_hook:
        fault_hook("before_write")
    # Written in this process: no helper process that the job's signals could kill (compat.checkpoint_save).
    dist_checkpointing.save(sd, staging, sharded_strategy=InProcessTorchDistSaveStrategy(),
                            validate_access_integrity=True)
    if fault_hook:
        fault_hook("after_write")
    dist.barrier()
    if rank == 0:
        if config_dict is not None:
            _atomic_write_text(os.path.join(staging, "config.yaml"),
                              yaml.safe_dump(config_dict, sort_keys=False, default_flow_style=None, width=120))
        if normalization is not None:
            _atomic_write_text(os.path.join(staging, NORMALIZATION_FILE), normalization)
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


def check_shard_files(ckpt: str) -> None:
    """Every shard file the checkpoint's ``.metadata`` refers to exists and is long enough; else a
    CheckpointError naming the checkpoint and the file (a copy cut short, a full disk)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isfile(os.path.join(ckpt, ".metadata")):
        return  # not torch_dist: megatron-core reports it
    try:
        storage = FileSystemReader(ckpt).read_metadata().storage_data or {}
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{ckpt}': its file .metadata cannot be read "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'damaged'})") from None
    needed: Dict[str, int] = {}
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if name is not None:
            needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    for name, size in sorted(needed.items()):
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint '{ckpt}': shard file {name} is missing")
        have = os.path.getsize(path)
        if have < size:
            raise CheckpointError(f"checkpoint '{ckpt}': shard file {name} is truncated ({have} of {size} bytes)")


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


def read_checkpoint_normalization(checkpoint_dir: str) -> Optional[str]:
    """The JSON normalization record saved in ``checkpoint_dir`` (None for older checkpoints)."""
    path = os.path.join(checkpoint_dir, NORMALIZATION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return fh.read()


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
    check_shard_files(ckpt)
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
    sd, fsdp_restore = _build_sharded_state_dict(
        models, optimizer, scheduler, TrainingState(), None, is_loading=True, include_rng=use_rng
    )
    sd.pop("training_state", None)
    if scheduler is None:
        sd.pop("opt_param_scheduler", None)
    resized = _prepare_shape_changes(sd, ckpt, weights_only=optimizer is None,
                                     can_resize=saved_grid is not None and current_grid is not None)
    try:
        loaded = dist_checkpointing.load(sd, ckpt)
    except (EOFError, OSError, pickle.UnpicklingError) as exc:  # damage the size check cannot see
        raise CheckpointError(f"checkpoint '{ckpt}' cannot be read: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else 'damaged shard data'}") from None
    for i, m in enumerate(models):
        key = "model" if len(models) == 1 else f"model{i}"
        for name in resized.get(key, ()):
            loaded[key][name] = interpolate_pos_embedding(loaded[key][name], saved_grid, current_grid)
    if fsdp_restore is not None:
        fsdp_restore.apply(loaded)
    for i, m in enumerate(models):
        key = "model" if len(models) == 1 else f"model{i}"
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

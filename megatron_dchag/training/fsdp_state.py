"""FSDP2-sharded parameters in checkpoints: the same global tensors as without FSDP, each rank
writing and reading only its own shard.

Under ``parallel.use_torch_fsdp2`` every parameter, its fp32 main copy (bf16) and its Adam moments
are ``DTensor`` s sharded along dim 0 over the data-parallel group (``Shard(0)`` with torch.chunk
rows: rank r of n holds rows ``[r·c, min((r+1)·c, rows))``, ``c = ceil(rows / n)``). A checkpoint
holds the same global tensors under the same keys as one saved without FSDP, so it loads at any
layout (with or without FSDP, any TP dividing G, any DP) and the other way round.

1. :func:`model_sharded_state_dict` asks the model for its ordinary ``sharded_state_dict()``
   while each ``DTensor`` parameter is replaced by a placeholder of its whole (TP-local) shape
   with the same attributes. So megatron-core's and :mod:`megatron_dchag.layers.sharded_state`'s
   rules (TP axes, one tensor per channel group, replica ids) apply unchanged (megatron-core's own
   ``DTensor`` branches, which assume even shards, are not reached). Each entry then gets this
   rank's rows:

   * a tensor entry keeps its key and global shape and is narrowed to this rank's rows of its
     local dim 0: a regular grid (``DP`` more fragments along that axis) when the rows divide
     evenly, else an uneven shard (``axis_fragmentations=None``, resolved by torch DCP); the
     data-parallel part of its replica id becomes 0 (every DP rank writes its own rows; an empty
     shard is marked as a replica and writes nothing);
   * a channel-group parameter (a ``ShardedTensorFactory`` of one tensor per group, groups
     stacked along dim 0) gives the pieces of those groups its rows overlap, each at its offset
     in its group's tensor.

   Every entry's data is the parameter's local tensor, which is what megatron-core's optimizer
   ``sharded_state_dict`` matches its parameters against (``to_local_if_dtensor``); it then
   builds the optimizer's entries from the model's with its own local state tensors.
2. :class:`FsdpRestore` records which entries stand for which ``DTensor`` and, after
   ``dist_checkpointing.load``, turns the loaded local tensors back into ``DTensor`` s like them
   (a whole TP-local tensor, e.g. a resized position table, gives its rows of this rank), so that
   the model's and the optimizer's ``load_state_dict`` work as without FSDP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Tuple

import torch
from torch.distributed.tensor import DTensor, Shard

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_dchag.layers.channel_plan import group_layout
from megatron_dchag.layers.sharded_state import group_key

__all__ = ["FsdpRestore", "fsdp_dtensors", "has_fsdp_parameters", "model_sharded_state_dict", "shard_rows"]

Path = Tuple[Any, ...]


def has_fsdp_parameters(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds FSDP2-sharded (``DTensor``) parameters."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_rows(dtensor: DTensor) -> Tuple[int, int]:
    """``[start, stop)``: the rows of dim 0 this rank holds of a ``Shard(0)`` DTensor on a 1-D mesh."""
    if dtensor.device_mesh.ndim != 1 or tuple(dtensor.placements) != (Shard(0),):
        raise ValueError(f"expected an FSDP2 tensor sharded as (Shard(0),) on a 1-D mesh, got "
                         f"{tuple(dtensor.placements)} on a {dtensor.device_mesh.ndim}-D mesh")
    rows, size = dtensor.shape[0], dtensor.device_mesh.size()
    chunk = math.ceil(rows / size)
    start = min(dtensor.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if dtensor._local_tensor.shape[0] != stop - start:
        raise ValueError(f"FSDP2 shard of {tuple(dtensor.shape)} holds {dtensor._local_tensor.shape[0]} rows, "
                         f"expected rows [{start}, {stop})")
    return start, stop


# ----------------------------------------------------------------------------------------------
# The model's entries
# ----------------------------------------------------------------------------------------------


def model_sharded_state_dict(module: torch.nn.Module) -> Dict[str, Any]:
    """``module.sharded_state_dict()`` as without FSDP, narrowed to this rank's rows (see the
    module docstring); each entry's data is a parameter's local tensor."""
    swapped = []
    originals: Dict[int, DTensor] = {}
    try:
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if isinstance(param, DTensor):
                    stand_in = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                  requires_grad=param.requires_grad)
                    stand_in.__dict__.update(vars(param))  # megatron's TP attributes, the channel-group layout
                    owner._parameters[name] = stand_in
                    swapped.append((owner, name, param))
                    originals[id(stand_in)] = param
        sd = module.sharded_state_dict()
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param
    for _, entry, parent, key in _entries(sd):
        ref = originals.get(id(getattr(entry, "data", None)))
        if ref is None:
            continue
        if isinstance(entry, ShardedTensor):
            parent[key] = _row_shard(entry, ref)
        elif isinstance(entry, ShardedTensorFactory) and group_layout(ref) is not None:
            parent[key] = _group_row_shards(entry, ref)
        else:
            raise ValueError(f"{getattr(entry, 'key', key)}: no FSDP checkpoint rule for a {type(entry).__name__}")
    return sd


def _row_shard(entry: ShardedTensor, ref: DTensor) -> ShardedTensor:
    """``entry`` (the whole TP-local tensor) narrowed to this rank's rows of its local dim 0."""
    start, stop = shard_rows(ref)
    size, axis = ref.device_mesh.size(), entry.prepend_axis_num
    replica_id = entry.replica_id
    if not (isinstance(replica_id, tuple) and len(replica_id) == 3):
        raise ValueError(f"{entry.key}: expected a (pipeline, tensor, data) replica id, got {replica_id!r}")
    global_offset = list(entry.global_offset)
    global_offset[axis] += start if stop > start else 0
    fragments = entry.axis_fragmentations
    if fragments is not None and ref.shape[0] % size == 0:
        fragments = fragments[:axis] + (fragments[axis] * size,) + fragments[axis + 1:]
    else:
        fragments = None  # uneven rows: torch DCP resolves them
    # An empty shard (fewer rows than DP ranks) is marked as a replica: it writes nothing.
    dp_replica = 0 if stop > start else ref.device_mesh.get_local_rank()
    return replace(entry, data=ref._local_tensor, local_shape=(stop - start,) + tuple(entry.local_shape[1:]),
                   global_offset=tuple(global_offset), axis_fragmentations=fragments,
                   replica_id=(replica_id[0], replica_id[1], dp_replica))


def _group_row_shards(entry: ShardedTensorFactory, ref: DTensor) -> ShardedTensorFactory:
    """The channel-group factory of ``ref`` for its FSDP shard: this rank's rows, cut into the
    pieces of the groups they overlap, each saved at its offset in that group's tensor."""
    layout = group_layout(ref)
    if layout.axis != 0:
        raise ValueError(f"{entry.key}: FSDP shards dim 0, the channel groups lie along dim {layout.axis}")
    start, stop = shard_rows(ref)
    tp_replica = parallel_state.get_tensor_model_parallel_rank() if layout.is_complete else 0
    rest = tuple(ref.shape[1:])
    pieces: List[Tuple[int, int, int, int]] = []  # group, first and last local row, offset in the group
    lo = 0
    for g in layout.owned:
        hi = lo + layout.block_sizes[g]
        a, b = max(lo, start), min(hi, stop)
        if a < b:
            pieces.append((g, a - start, b - start, a - lo))
        lo = hi

    @torch.no_grad()
    def build(key: str, data: torch.Tensor, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError("group-sharded parameters do not support flattened ranges")
        out = {}
        for g, first, last, offset in pieces:
            block = data.narrow(0, first, last - first)
            whole = (layout.block_sizes[g],) + rest
            out[group_key(key, g)] = ShardedTensor(
                group_key(key, g), block, block.dtype, tuple(block.shape), whole, (offset,) + (0,) * len(rest),
                None, replica_id=(0, tp_replica, 0))
        return out

    def merge(sub_state_dict: Dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if not sub_state_dict:
                return torch.empty((0,) + rest, dtype=ref.dtype)
            return torch.cat([t for _, t in sorted(sub_state_dict.items())], dim=0)

    return ShardedTensorFactory(entry.key, ref._local_tensor, build, merge, entry.replica_id)


# ----------------------------------------------------------------------------------------------
# Back to DTensors after a load
# ----------------------------------------------------------------------------------------------


def fsdp_dtensors(models: Iterable[torch.nn.Module], optimizer=None) -> List[DTensor]:
    """Every ``DTensor`` a checkpoint entry can stand for: the models' parameters and, of each
    megatron optimizer, its main parameters and their state tensors."""
    found: List[DTensor] = [p for m in models for p in m.parameters() if isinstance(p, DTensor)]
    for opt in getattr(optimizer, "chained_optimizers", [optimizer] if optimizer is not None else []):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            found += [p for p in group["params"] if isinstance(p, DTensor)]
        for state in inner.state.values():
            found += [v for v in state.values() if isinstance(v, DTensor)]
    return found


@dataclass
class FsdpRestore:
    """Which entries of a sharded state dict stand for which ``DTensor`` (by path)."""

    references: Dict[Path, DTensor] = field(default_factory=dict)

    @classmethod
    def record(cls, sd: Dict[str, Any], dtensors: Iterable[DTensor]) -> "FsdpRestore":
        by_local = {id(t._local_tensor): t for t in dtensors}
        refs = {}
        for path, entry, _, _ in _entries(sd):
            ref = by_local.get(id(getattr(entry, "data", None)))
            if ref is not None and isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
                refs[path] = ref
        return cls(refs)

    def apply(self, loaded: Dict[str, Any]) -> None:
        """Replace, in place, the loaded tensors at the recorded paths by ``DTensor`` s."""
        for path, ref in self.references.items():
            parent, key = _parent(loaded, path)
            if parent is None:
                continue  # not part of this load (e.g. weights only)
            value = parent[key]
            local_shape = tuple(ref._local_tensor.shape)
            if tuple(value.shape) != local_shape:
                if tuple(value.shape) != tuple(ref.shape):
                    raise ValueError(f"loaded tensor at {'/'.join(map(str, path))} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(ref.shape)} or its FSDP shard {local_shape}")
                start, stop = shard_rows(ref)
                value = value.narrow(0, start, stop - start)
            parent[key] = DTensor.from_local(value.to(ref.dtype).contiguous().clone(), ref.device_mesh,
                                             ref.placements, run_check=False, shape=ref.shape, stride=ref.stride())


# ----------------------------------------------------------------------------------------------
# Nested state dicts
# ----------------------------------------------------------------------------------------------


def _entries(obj: Any, path: Path = ()):
    """``(path, value, parent, key)`` of every leaf of nested dicts and lists, depth first in
    insertion order."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in list(items):
        if isinstance(value, (dict, list)):
            yield from _entries(value, path + (key,))
        else:
            yield path + (key,), value, obj, key


def _parent(obj: Any, path: Path):
    for key in path[:-1]:
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return None, None
    if isinstance(obj, dict) and path[-1] not in obj or isinstance(obj, list) and path[-1] >= len(obj):
        return None, None
    return obj, path[-1]

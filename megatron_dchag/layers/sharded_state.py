"""Checkpoint sharding (megatron-core ``dist_checkpointing``) of this project's modules.

Group-owned parameters are saved **one tensor per channel group**, under keys
``<param key>.group<g>``: each group's block is a whole tensor of the checkpoint, written by the
one TP rank that owns it (or by TP rank 0 when every rank holds every group). A checkpoint
therefore loads at any TP size dividing G (each rank asks for the groups it owns), and the
strategies that share a parameter layout share checkpoint keys.

Other parameters of these modules are replicated across TP; children (megatron-core layers)
provide their own sharded state dicts.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint, sharded_state_dict_default

from megatron_dchag.layers.channel_plan import group_layout


def group_key(key: str, group: int) -> str:
    return f"{key}.group{group:04d}"


def _group_factory(key: str, param: torch.Tensor) -> ShardedTensorFactory:
    layout = group_layout(param)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    replica_id = (0, tp_rank if layout.is_complete else 0, dp_rank)

    @torch.no_grad()
    def build(key: str, data: torch.Tensor, replica_id, flattened_range: Optional[slice]):
        if flattened_range is not None:
            raise NotImplementedError("group-sharded parameters do not support flattened ranges")
        return {
            group_key(key, g): ShardedTensor.from_rank_offsets(group_key(key, g), block, replica_id=replica_id)
            for g, block in zip(layout.owned, layout.split_local(data))
        }

    def merge(sub_state_dict: Dict[str, torch.Tensor]) -> torch.Tensor:
        # Keys carry the factory's key at build time (optimizer states use their own prefix), so
        # order by the zero-padded group suffix rather than rebuilding names.
        with torch.no_grad():
            return torch.cat([t for _, t in sorted(sub_state_dict.items())], dim=layout.axis)

    return ShardedTensorFactory(key, param, build, merge, replica_id)


class GroupShardedStateMixin:
    """``sharded_state_dict`` for a module holding group-owned and/or replicated parameters."""

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: Tuple[Tuple[int, int, int], ...] = (), metadata: Optional[dict] = None
    ):
        out = {}
        replicated = {}
        for name, param in self.named_parameters(recurse=False):
            if group_layout(param) is not None:
                out[f"{prefix}{name}"] = _group_factory(f"{prefix}{name}", param)
            else:
                replicated[name] = param
        if replicated:
            out.update(make_sharded_tensors_for_checkpoint(replicated, prefix, sharded_offsets=sharded_offsets))
        for name, child in self.named_children():
            out.update(_child_sharded_state_dict(child, f"{prefix}{name}.", sharded_offsets, metadata))
        return out


def _child_sharded_state_dict(child: torch.nn.Module, prefix: str, sharded_offsets, metadata):
    """Containers (ModuleList, ...) have no sharded_state_dict: look inside them."""
    if not hasattr(child, "sharded_state_dict") and isinstance(
        child, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)
    ):
        out = {}
        for name, grandchild in child.named_children():
            out.update(_child_sharded_state_dict(grandchild, f"{prefix}{name}.", sharded_offsets, metadata))
        return out
    return sharded_state_dict_default(child, prefix, sharded_offsets, metadata)

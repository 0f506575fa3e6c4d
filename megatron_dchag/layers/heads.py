"""Channel-parallel output head: each TP rank predicts only the channels it owns.

``D -> C_local * values_per_channel`` (e.g. ``p*p`` pixels of a patch). The input is replicated
across TP ranks, so it enters through megatron's copy-to-TP-region (identity forward, all-reduce
backward): each rank's channels contribute their part of the input gradient. No rank ever
materializes all ``C`` output channels; losses are reduced across TP with
:func:`reduce_loss_across_tp`.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region

from megatron_dchag.layers.channel_plan import ChannelGroupPlan, group_generator, mark_group_sharded
from megatron_dchag.layers.embeddings import xavier_uniform_
from megatron_dchag.layers.sharded_state import GroupShardedStateMixin


class ChannelParallelHead(GroupShardedStateMixin, nn.Module):
    def __init__(self, plan: ChannelGroupPlan, in_features: int, values_per_channel: int, seed: int, name: str = "head"):
        super().__init__()
        self.plan = plan
        self.values_per_channel = values_per_channel
        groups = list(plan.owned_groups(sharded=True))
        sizes = plan.owned_group_sizes(sharded=True)
        self.channel_range = plan.owned_channel_range(sharded=True)
        self.num_local_channels = sum(sizes)
        k = values_per_channel
        self.weight = nn.Parameter(torch.empty(self.num_local_channels * k, in_features))
        self.bias = nn.Parameter(torch.zeros(self.num_local_channels * k))
        with torch.no_grad():
            for g, piece in zip(groups, torch.split(self.weight, [s * k for s in sizes], dim=0)):
                xavier_uniform_(piece, in_features, plan.num_channels * k, group_generator(seed, f"{name}.weight", g))
        blocks = [s * k for s in plan.group_sizes]
        mark_group_sharded(self.weight, 0, blocks, groups)
        mark_group_sharded(self.bias, 0, blocks, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., C_local, values_per_channel]``."""
        if self.plan.tp_size > 1:
            x = copy_to_tensor_model_parallel_region(x)
        out = torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        return out.view(*x.shape[:-1], self.num_local_channels, self.values_per_channel)


def reduce_loss_across_tp(local_sum: torch.Tensor) -> torch.Tensor:
    """Sum a per-rank partial loss over the TP group (identity backward)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return local_sum
    return reduce_from_tensor_model_parallel_region(local_sum)

"""Channel-group plan: which channels form which group, and which groups a TP rank owns.

The model has ``G`` channel groups. ``C`` channels are split into ``G`` contiguous groups whose
sizes differ by at most one (larger groups first), so 500 channels work with 8 groups
(63, 63, 63, 63, 62, 62, 62, 62). TP rank ``r`` of ``T`` owns groups ``[r*G/T, (r+1)*G/T)`` and
therefore one contiguous slice of channels. Strategies that do not shard channels
(``tp_baseline``, ``hierarchical``) own every group on every rank.

Parameters that belong to channel groups (tokenizer, channel embedding, partial aggregation,
channel-parallel head) are laid out as the concatenation, along one axis, of one block per owned
group. :class:`GroupShardedLayout` records that layout on the parameter so the full tensor can be
cut into (or rebuilt from) rank-local pieces for any ``T`` dividing ``G``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from megatron_dchag.config import split_evenly


@dataclass(frozen=True)
class ChannelGroupPlan:
    num_channels: int
    num_groups: int
    tp_size: int = 1
    tp_rank: int = 0

    def __post_init__(self) -> None:
        if self.num_groups < 1 or self.num_channels < self.num_groups:
            raise ValueError(
                f"num_channels={self.num_channels} must be >= channel_groups={self.num_groups} >= 1"
            )
        if self.num_groups % self.tp_size:
            raise ValueError(
                f"channel_groups={self.num_groups} is not divisible by tensor_model_parallel_size={self.tp_size}"
            )
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} out of range for tp_size={self.tp_size}")

    # -- global partition ---------------------------------------------------------------------
    @property
    def group_sizes(self) -> List[int]:
        return split_evenly(self.num_channels, self.num_groups)

    @property
    def group_offsets(self) -> List[int]:
        offsets, acc = [], 0
        for size in self.group_sizes:
            offsets.append(acc)
            acc += size
        return offsets

    def group_channel_range(self, group: int) -> Tuple[int, int]:
        start = self.group_offsets[group]
        return start, start + self.group_sizes[group]

    @property
    def groups_per_rank(self) -> int:
        return self.num_groups // self.tp_size

    def rank_groups(self, rank: int) -> range:
        g = self.groups_per_rank
        return range(rank * g, (rank + 1) * g)

    def rank_channel_range(self, rank: int) -> Tuple[int, int]:
        groups = self.rank_groups(rank)
        return self.group_channel_range(groups[0])[0], self.group_channel_range(groups[-1])[1]

    @property
    def channels_per_rank(self) -> List[int]:
        return [b - a for a, b in (self.rank_channel_range(r) for r in range(self.tp_size))]

    # -- this rank ----------------------------------------------------------------------------
    def owned_groups(self, sharded: bool) -> range:
        """Groups this rank holds: its own share when ``sharded``, else all of them."""
        return self.rank_groups(self.tp_rank) if sharded else range(self.num_groups)

    def owned_channel_range(self, sharded: bool) -> Tuple[int, int]:
        return self.rank_channel_range(self.tp_rank) if sharded else (0, self.num_channels)

    def owned_group_sizes(self, sharded: bool) -> List[int]:
        sizes = self.group_sizes
        return [sizes[g] for g in self.owned_groups(sharded)]


@dataclass(frozen=True)
class GroupShardedLayout:
    """How a group-owned parameter is laid out: blocks of ``block_sizes[g]`` along ``axis``.

    ``block_sizes`` covers all ``G`` groups (the full tensor); ``owned`` lists the groups present
    in the local tensor, in order.
    """

    axis: int
    block_sizes: Tuple[int, ...]
    owned: Tuple[int, ...]

    def block_offsets(self) -> List[int]:
        offsets, acc = [], 0
        for size in self.block_sizes:
            offsets.append(acc)
            acc += size
        return offsets

    @property
    def full_size(self) -> int:
        return sum(self.block_sizes)

    @property
    def is_complete(self) -> bool:
        return tuple(self.owned) == tuple(range(len(self.block_sizes)))

    def local_from_full(self, full: torch.Tensor) -> torch.Tensor:
        offsets = self.block_offsets()
        pieces = [full.narrow(self.axis, offsets[g], self.block_sizes[g]) for g in self.owned]
        return torch.cat(pieces, dim=self.axis)

    def split_local(self, local: torch.Tensor) -> List[torch.Tensor]:
        """Per-owned-group views of the local tensor."""
        return list(torch.split(local, [self.block_sizes[g] for g in self.owned], dim=self.axis))


GROUP_LAYOUT_ATTR = "dchag_group_layout"


def mark_group_sharded(param: torch.nn.Parameter, axis: int, block_sizes: Sequence[int], owned: Sequence[int]) -> None:
    """Attach a :class:`GroupShardedLayout` to ``param`` and check its local size."""
    layout = GroupShardedLayout(axis, tuple(int(b) for b in block_sizes), tuple(int(g) for g in owned))
    expected = sum(layout.block_sizes[g] for g in layout.owned)
    if param.shape[axis] != expected:
        raise ValueError(f"parameter axis {axis} has size {param.shape[axis]}, layout expects {expected}")
    setattr(param, GROUP_LAYOUT_ATTR, layout)
    if not layout.is_complete:
        # Distinct on every TP rank: megatron must count it on each rank (gradient norm,
        # duplicate detection), exactly like its own tensor-parallel weights.
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        set_tensor_model_parallel_attributes(param, True, axis, 1)


def group_layout(param: torch.Tensor):
    return getattr(param, GROUP_LAYOUT_ATTR, None)


def group_generator(seed: int, name: str, group: int) -> torch.Generator:
    """A CPU generator determined by (seed, parameter name, group): initial values of a group's
    parameters do not depend on the TP size or on which rank builds them."""
    import zlib

    key = (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 7919 + int(group)) % (2**63 - 1)
    return torch.Generator().manual_seed(key)

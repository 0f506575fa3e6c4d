"""The channel stage: images of many channels -> one token per patch position.

One module, four strategies, selected by two switches of :class:`~megatron_dchag.config.ModelConfig`:

============== ======================= ========================== =========================
strategy       tokenizer holds          partial aggregation tree   all-gather
============== ======================= ========================== =========================
tp_baseline    all C channels           no                         no
dist_tokenize  own C/T channels         no                         C tokens
hierarchical   all C channels           all G groups               no
dchag          own C/T channels         own G/T groups             G group tokens
============== ======================= ========================== =========================

followed in every case by the TP-sharded final cross-attention. ``input_channel_range`` says
which input channels this rank must be given (data loaders read only those).

With a linear tree (``dchag`` or ``hierarchical``, ``aggregation_layer=linear``) tokenizer and tree
run **fused** by default (``model.channel_stage_impl``): one product per channel group, no
per-channel tokens (:mod:`megatron_dchag.layers.fused_channel_stage`). The reference path
(tokenizer, then the tree level by level) computes the same function with the same parameters.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dchag.config import ModelConfig
from megatron_dchag.layers.aggregation import FinalChannelCrossAttention, PartialChannelAggregation
from megatron_dchag.layers.channel_plan import ChannelGroupPlan
from megatron_dchag.layers.comm import gather_tokens_from_tp_region
from megatron_dchag.layers.fused_channel_stage import fused_group_tokens
from megatron_dchag.layers.sharded_state import GroupShardedStateMixin
from megatron_dchag.layers.tokenizer import ChannelEmbedding, GroupedPatchTokenizer


def make_channel_plan(model: ModelConfig, tp_size: Optional[int] = None, tp_rank: Optional[int] = None) -> ChannelGroupPlan:
    """The plan for this rank (TP size and rank from ``parallel_state`` unless given) of a resolved
    ``model`` (:func:`~megatron_dchag.config.resolve_model`: ``channel_groups`` set)."""
    if tp_size is None:
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_rank is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if model.channel_groups is None:
        raise ValueError("model.channel_groups is unset: build models from a resolved config "
                         "(megatron_dchag.config.resolve_config or resolve_model)")
    return ChannelGroupPlan(model.num_channels, model.channel_groups, tp_size, tp_rank)


class ChannelAggregationStage(GroupShardedStateMixin, nn.Module):
    def __init__(
        self,
        model: ModelConfig,
        config: TransformerConfig,
        plan: ChannelGroupPlan,
        seed: int,
        wavelengths: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        self.plan = plan
        self.sharded = model.shards_channels
        self.hierarchical = model.uses_partial_aggregation
        d = model.hidden_size
        if model.channel_embedding == "wavelength":
            wavelengths = wavelengths if wavelengths is not None else model.wavelengths
            if wavelengths is None:
                raise ValueError(
                    "model.channel_embedding='wavelength' needs wavelengths (model.wavelengths or from the data)"
                )
        else:
            wavelengths = None
        self.tokenizer = GroupedPatchTokenizer(plan, self.sharded, model.patch_size, d, seed)
        self.channel_embedding = ChannelEmbedding(plan, self.sharded, d, wavelengths)
        self.partial_aggregation = (
            PartialChannelAggregation(
                plan, self.sharded, model.aggregation_tree, model.aggregation_layer, d,
                model.aggregation_heads, seed, model.init_method_std,
            )
            if self.hierarchical
            else None
        )
        self.final_aggregation = FinalChannelCrossAttention(config, d, model.aggregation_heads, seed)
        # Tokenizer + linear tree as one product per group (model.channel_stage_impl resolved);
        # False selects the reference path.
        self.fused = model.fuses_channel_stage
        if self.fused and not (self.partial_aggregation is not None and self.partial_aggregation.is_linear):
            raise ValueError("model.channel_stage_impl=fused needs a linear partial-aggregation tree")

    @property
    def input_channel_range(self) -> Tuple[int, int]:
        return self.plan.owned_channel_range(self.sharded)

    def select_input_channels(self, images: torch.Tensor) -> torch.Tensor:
        """Cut this rank's input channels out of an all-channel batch ``[B, C, H, W]``.

        Data loaders should read only these channels in the first place; this is for callers
        that hold every channel anyway (tests, inference on one machine).
        """
        if images.dim() != 4 or images.shape[1] != self.plan.num_channels:
            raise ValueError(
                f"expected images [B, {self.plan.num_channels}, H, W] with all channels, got {tuple(images.shape)}"
            )
        lo, hi = self.input_channel_range
        return images[:, lo:hi]

    @property
    def gathered_counts_per_rank(self):
        if self.hierarchical:
            return [self.plan.groups_per_rank] * self.plan.tp_size
        return self.plan.channels_per_rank

    def forward(self, images: torch.Tensor, patch_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``images [B, C_in, H, W]`` (C_in = this rank's input channels) -> ``[L, B, D]``."""
        if self.fused:
            tokens = fused_group_tokens(self.tokenizer, self.channel_embedding, self.partial_aggregation,
                                        images, patch_index)  # [G_own, L, B, D]
        else:
            tokens = self.tokenizer(images, patch_index, channel_bias=self.channel_embedding())
            if self.partial_aggregation is not None:
                tokens = self.partial_aggregation(tokens)  # [G_own, L, B, D]
        if self.sharded and self.plan.tp_size > 1:
            tokens = gather_tokens_from_tp_region(tokens, self.gathered_counts_per_rank)
        return self.final_aggregation(tokens)

"""The one collective of the channel stage: all-gather of token tensors along dim 0 over TP.

Forward: all-gather ``[N_local, ...]`` from every TP rank into ``[N, ...]``. Backward: return this
rank's slice of the incoming gradient, **no communication** (megatron-core's
``gather_from_sequence_parallel_region(tensor_parallel_output_grad=False)``). That is exact only
because the consumer is a TP layer whose input path all-reduces the gradient in backward
(megatron's copy-to-TP-region inside ``ColumnParallelLinear``), so every rank already holds the
full gradient of the gathered tensor.

Ranks may own different numbers of tokens (uneven channel groups with ``dist_tokenize``); then
each rank pads to the largest count, gathers once, and the padding rows are dropped.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region


def gather_tokens_from_tp_region(tokens: torch.Tensor, counts_per_rank: Sequence[int]) -> torch.Tensor:
    """All-gather ``tokens [counts_per_rank[rank], ...]`` along dim 0 across the TP group."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if len(counts_per_rank) != tp:
        raise ValueError(f"counts_per_rank has {len(counts_per_rank)} entries for TP size {tp}")
    if tp == 1:
        return tokens
    largest = max(counts_per_rank)
    if all(c == largest for c in counts_per_rank):
        return gather_from_sequence_parallel_region(tokens, tensor_parallel_output_grad=False)
    pad = largest - tokens.shape[0]
    if pad:
        tokens = torch.cat([tokens, tokens.new_zeros((pad,) + tuple(tokens.shape[1:]))], dim=0)
    gathered = gather_from_sequence_parallel_region(tokens, tensor_parallel_output_grad=False)
    keep = torch.cat([torch.arange(r * largest, r * largest + c) for r, c in enumerate(counts_per_rank)])
    return gathered.index_select(0, keep.to(gathered.device))

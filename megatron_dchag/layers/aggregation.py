"""Cross-channel aggregation: the local partial-aggregation tree and the TP-sharded final layer.

Token layout everywhere is ``[N, L, B, D]`` (N channels or group tokens first).

*Partial aggregation* (local to a rank, no communication) reduces each owned channel group to
one token per patch position with a small tree given as a list of chunk sizes (see
:func:`megatron_dchag.config.aggregation_level_sizes`). All owned groups of one tree level are
computed together:

- :class:`LinearAggregationLevel` (D-CHAG-L): a learned weighted sum over each chunk, one matrix
  multiply with a block-structured ``[chunks, tokens]`` matrix.
- :class:`CrossAttentionAggregationLevel` (D-CHAG-C): per chunk a learned query attends over the
  chunk's tokens (multi-head, per patch position). The query is folded into the key projection,
  ``q_h . (W_k x)_h = x . (W_k,h^T q_h)``, and the value projection is applied after the
  weighted sum, ``sum_i a_i W_v x_i = W_v sum_i a_i x_i``. No per-channel key/value tensors and no
  ``[L, B, C, C]`` scores are ever materialized: beyond the input only ``[N, L*B, heads]`` scores
  and ``[chunks, L*B, heads, D]`` sums are.

*Final aggregation* (:class:`FinalChannelCrossAttention`) attends with a learned query over the
``N`` tokens of each patch position, heads split across TP ranks with megatron-core
``ColumnParallelLinear`` / ``RowParallelLinear``. Its first layer's input path is megatron's
copy-to-TP-region (backward all-reduce), which is what makes the communication-free backward of
the preceding all-gather exact. It is evaluated in the same folded form as the partial levels (no
``[N, L*B, 2D/T]`` keys/values); ``folded = False`` selects the textbook form.

Both cross-attention forms pool through :class:`ChunkAttentionPool`, whose backward writes the
gradient of the tokens into one buffer (plain autograd would hold three token-sized gradients).
Linear levels with equal chunks are one batched product (no block matrix, no wasted work).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import nn

from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dchag.config import aggregation_level_sizes
from megatron_dchag.layers.channel_plan import ChannelGroupPlan, group_generator, mark_group_sharded
from megatron_dchag.layers.embeddings import xavier_uniform_
from megatron_dchag.layers.sharded_state import GroupShardedStateMixin


class TreeLevelPlan:
    """Chunking of one tree level for every group, and the index maps for the owned groups."""

    def __init__(self, level_chunks_per_group: Sequence[Sequence[int]], owned: Sequence[int]):
        self.chunks_per_group = [list(c) for c in level_chunks_per_group]  # all G groups
        self.owned = list(owned)
        self.tokens_in_per_group = [sum(c) for c in self.chunks_per_group]
        self.chunks_out_per_group = [len(c) for c in self.chunks_per_group]
        chunk_of_token: List[int] = []
        group_of_chunk: List[int] = []
        chunk_lengths: List[int] = []
        for local_g, g in enumerate(self.owned):
            for length in self.chunks_per_group[g]:
                chunk_of_token.extend([len(chunk_lengths)] * length)
                group_of_chunk.append(local_g)
                chunk_lengths.append(length)
        self.num_tokens_in = len(chunk_of_token)
        self.num_chunks = len(chunk_lengths)
        self.chunk_lengths = chunk_lengths
        self.chunk_of_token = torch.tensor(chunk_of_token, dtype=torch.long)
        self.group_of_chunk = torch.tensor(group_of_chunk, dtype=torch.long)

    @staticmethod
    def build_tree(plan: ChannelGroupPlan, sharded: bool, tree: Sequence[int]) -> List["TreeLevelPlan"]:
        per_group = [aggregation_level_sizes(size, tree) for size in plan.group_sizes]
        owned = list(plan.owned_groups(sharded))
        return [TreeLevelPlan([levels[k] for levels in per_group], owned) for k in range(len(tree) + 1)]


class LinearAggregationLevel(GroupShardedStateMixin, nn.Module):
    """Learned weighted sum over each chunk: ``weight [tokens_in]`` (initialised to the mean)."""

    def __init__(self, level: TreeLevelPlan, level_index: int, seed: int):
        super().__init__()
        self.level = level
        init = torch.cat([torch.full((n,), 1.0 / n) for n in level.chunk_lengths])
        self.weight = nn.Parameter(init)
        mark_group_sharded(self.weight, 0, level.tokens_in_per_group, level.owned)
        rows = level.chunk_of_token
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", torch.arange(level.num_tokens_in), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        lengths = self.level.chunk_lengths
        if len(set(lengths)) == 1:
            # Equal chunks: one batched [1, c] x [c, L*B*D] product per chunk, no [m, n] matrix
            # and no m-fold redundant multiply-adds.
            m, c = len(lengths), lengths[0]
            out = torch.bmm(self.weight.to(tokens.dtype).view(m, 1, c), tokens.reshape(m, c, -1))
            return out.view(m, *tokens.shape[1:])
        matrix = self.weight.new_zeros(self.level.num_chunks, n).index_put((self._rows, self._cols), self.weight)
        out = torch.matmul(matrix.to(tokens.dtype), tokens.reshape(n, -1))
        return out.view(self.level.num_chunks, *tokens.shape[1:])


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Softmax inputs in fp32 under bf16/fp16; fp64 stays fp64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def segment_softmax(scores: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of ``scores [N, ...]`` over the rows of each segment (``segment [N]`` ids)."""
    idx = segment.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
    shape = (num_segments,) + tuple(scores.shape[1:])
    smax = torch.full(shape, float("-inf"), dtype=scores.dtype, device=scores.device)
    smax = smax.scatter_reduce(0, idx, scores.detach(), reduce="amax", include_self=True)
    exp = torch.exp(scores - smax.index_select(0, segment))
    denom = torch.zeros(shape, dtype=scores.dtype, device=scores.device).index_add(0, segment, exp)
    return exp / denom.index_select(0, segment)


class ChunkAttentionPool(torch.autograd.Function):
    """Attention pooling over contiguous chunks of tokens, memory-lean in forward and backward.

    ``x [N, B', D]`` (chunks are consecutive runs of ``chunk_lengths`` rows), folded per-chunk
    queries ``u [M, h, D]`` and optional score offsets ``c [M, h]``::

        p[n, b, k] = softmax over n in chunk j of (x[n, b] . u[j, k] + c[j, k])
        out[j, b, k] = sum_{n in chunk j} p[n, b, k] x[n, b]            -> [M, B', h, D]

    Autograd through the plain formulation keeps one ``[N, B', D]`` gradient per use of ``x``
    and a third for their sum; this function writes the gradient of ``x`` into **one** buffer
    (a matmul, then an in-place ``baddbmm_`` per chunk). Saved for backward: ``x`` (the caller's
    tensor, no copy), ``u`` and the ``[N, B', h]`` weights. Softmax in at least fp32.
    """

    @staticmethod
    def forward(ctx, x, u, c, chunk_lengths):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return ChunkAttentionPool._forward(ctx, x, u, c, chunk_lengths)

    @staticmethod
    def _forward(ctx, x, u, c, chunk_lengths):
        n, bb, d = x.shape
        m, h, _ = u.shape
        dtype = x.dtype
        u = u.to(dtype)
        probs = x.new_empty(n, bb, h)
        out = x.new_empty(m, bb, h, d)
        start = 0
        for j, length in enumerate(chunk_lengths):
            xs = x[start : start + length]
            scores = torch.matmul(xs, u[j].t())  # [c, B', h]
            if c is not None:
                scores = scores + c[j].to(scores.dtype)
            p = torch.softmax(_at_least_fp32(scores), dim=0).to(dtype)
            probs[start : start + length] = p
            torch.bmm(p.permute(1, 2, 0), xs.transpose(0, 1), out=out[j])  # [B', h, D]
            start += length
        ctx.chunk_lengths = list(chunk_lengths)
        ctx.has_c = c is not None
        ctx.c_dtype = c.dtype if c is not None else None
        ctx.u_dtype = u.dtype
        ctx.save_for_backward(x, u, probs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, u, probs = ctx.saved_tensors
        dtype = x.dtype
        grad_out = grad_out.to(dtype)
        m, h = u.shape[0], u.shape[1]
        need_x, need_u, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if need_x else None
        grad_u = torch.empty_like(u) if need_u else None
        grad_c = torch.empty(m, h, dtype=torch.float32, device=x.device) if need_c else None
        start = 0
        for j, length in enumerate(ctx.chunk_lengths):
            xs, p, g = x[start : start + length], probs[start : start + length], grad_out[j]
            grad_p = torch.bmm(g, xs.permute(1, 2, 0)).permute(2, 0, 1)  # [c, B', h]
            p32, gp32 = _at_least_fp32(p), _at_least_fp32(grad_p)
            grad_s = p32 * (gp32 - (gp32 * p32).sum(0, keepdim=True))
            if need_c:
                grad_c[j] = grad_s.sum((0, 1))
            grad_s = grad_s.to(dtype)
            if need_u:
                grad_u[j] = torch.matmul(grad_s.reshape(-1, h).t(), xs.reshape(-1, xs.shape[-1]))
            if need_x:
                gx = grad_x[start : start + length]
                torch.matmul(grad_s, u[j], out=gx)
                gx.transpose(0, 1).baddbmm_(p.transpose(0, 1), g)
            start += length
        if grad_c is not None:
            grad_c = grad_c.to(ctx.c_dtype)
        return grad_x, grad_u, grad_c, None


class CrossAttentionAggregationLevel(GroupShardedStateMixin, nn.Module):
    """Multi-head cross-attention of one learned query per chunk over the chunk's tokens.

    Per owned group: ``query [chunks_g, D]``, ``key_weight``, ``value_weight``, ``out_weight``
    ``[D, D]`` and value/out biases ``[D]`` (a key bias would cancel in the softmax).
    """

    def __init__(self, level: TreeLevelPlan, level_index: int, hidden_size: int, num_heads: int, seed: int,
                 query_std: float = 0.02):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by aggregation heads={num_heads}")
        self.level = level
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        d, owned = hidden_size, level.owned
        ng = len(owned)
        self.query = nn.Parameter(torch.empty(level.num_chunks, d))
        self.key_weight = nn.Parameter(torch.empty(ng, d, d))
        self.value_weight = nn.Parameter(torch.empty(ng, d, d))
        self.value_bias = nn.Parameter(torch.zeros(ng, d))
        self.out_weight = nn.Parameter(torch.empty(ng, d, d))
        self.out_bias = nn.Parameter(torch.zeros(ng, d))
        with torch.no_grad():
            queries = torch.split(self.query, [level.chunks_out_per_group[g] for g in owned], dim=0)
            for i, g in enumerate(owned):
                gen = lambda name: group_generator(seed, f"aggregation.level{level_index}.{name}", g)  # noqa: E731
                queries[i].normal_(0.0, query_std, generator=gen("query"))
                for name, w in (("key", self.key_weight), ("value", self.value_weight), ("out", self.out_weight)):
                    xavier_uniform_(w[i], d, d, gen(name))
        mark_group_sharded(self.query, 0, level.chunks_out_per_group, owned)
        ones = [1] * len(level.chunks_per_group)
        for p in (self.key_weight, self.value_weight, self.value_bias, self.out_weight, self.out_bias):
            mark_group_sharded(p, 0, ones, owned)
        self.register_buffer("_chunk_of_token", level.chunk_of_token, persistent=False)
        self.register_buffer("_group_of_chunk", level.group_of_chunk, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, l, b, d = tokens.shape
        m, h, e = self.level.num_chunks, self.num_heads, self.head_dim
        x = tokens.reshape(n, l * b, d)
        dtype = x.dtype
        goc = self._group_of_chunk
        # Fold each chunk's query into its group's key projection: u[m, h, D].
        wk = self.key_weight.index_select(0, goc).view(m, h, e, d)
        u = torch.einsum("mhe,mhed->mhd", self.query.view(m, h, e), wk) / math.sqrt(e)
        sums = ChunkAttentionPool.apply(x, u.to(dtype), None, self.level.chunk_lengths)  # [m, LB, h, D]
        wv = self.value_weight.index_select(0, goc).view(m, h, e, d).to(dtype)
        values = torch.einsum("mbhd,mhed->mbhe", sums, wv).reshape(m, l * b, d)
        values = values + self.value_bias.index_select(0, goc).unsqueeze(1).to(dtype)
        wo = self.out_weight.index_select(0, goc).to(dtype)
        out = torch.baddbmm(self.out_bias.index_select(0, goc).unsqueeze(1).to(dtype), values, wo.transpose(1, 2))
        return out.view(m, l, b, d)


class PartialChannelAggregation(GroupShardedStateMixin, nn.Module):
    """The local tree: each owned group ``[C_g tokens] -> 1 token`` per patch position."""

    def __init__(self, plan: ChannelGroupPlan, sharded: bool, tree: Sequence[int], layer_kind: str,
                 hidden_size: int, num_heads: int, seed: int, query_std: float = 0.02):
        super().__init__()
        self.levels_plan = TreeLevelPlan.build_tree(plan, sharded, tree)
        levels = []
        for k, level in enumerate(self.levels_plan):
            if layer_kind == "linear":
                levels.append(LinearAggregationLevel(level, k, seed))
            elif layer_kind == "cross_attention":
                levels.append(CrossAttentionAggregationLevel(level, k, hidden_size, num_heads, seed, query_std))
            else:
                raise ValueError(f"unknown aggregation layer kind '{layer_kind}' (linear or cross_attention)")
        self.levels = nn.ModuleList(levels)
        self.is_linear = layer_kind == "linear"
        # Token index of every owned channel at each level (level 0: the channel itself); after
        # the last level it is the owned group's local index (one chunk per group).
        index = torch.arange(self.levels_plan[0].num_tokens_in)
        for k, level in enumerate(self.levels_plan):
            self.register_buffer(f"_token_of_channel_{k}", index, persistent=False)
            index = level.chunk_of_token.index_select(0, index)
        self.register_buffer("_group_of_channel", index, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for level in self.levels:
            tokens = level(tokens)
        return tokens

    def path_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """A linear tree as one weight per channel: ``(w [C_own], group_of_channel [C_own])``.

        The tree maps the channel tokens ``x_c`` of group ``g`` to ``sum_c w_c x_c`` with ``w_c``
        the product of the level weights on the path from ``c`` to the group token. Built from the
        level parameters with autograd ops, so gradients flow back to every level.
        """
        if not self.is_linear:
            raise ValueError("path_weights needs a linear tree (aggregation_layer=linear)")
        w = None
        for k, level in enumerate(self.levels):
            wk = level.weight.index_select(0, getattr(self, f"_token_of_channel_{k}"))
            w = wk if w is None else w * wk
        return w, self._group_of_channel


class FinalChannelCrossAttention(GroupShardedStateMixin, nn.Module):
    """Learned-query cross-attention over the ``N`` tokens of each patch: ``[N, L, B, D] -> [L, B, D]``.

    ``linear_kv`` (column-parallel, ``D -> 2D``, laid out per head as ``[heads, (k, v), head_dim]``)
    and ``linear_q`` (column-parallel, applied to the replicated learned query) split the heads
    across TP ranks; ``linear_proj`` (row-parallel) merges them with megatron's all-reduce.
    The parameters are used directly in the folded evaluation (:meth:`forward_folded`); the
    textbook evaluation (:meth:`forward_unfolded`, also used with sequence parallelism) calls the
    layers. Both compute the same function with the same parameters.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, num_heads: int, seed: int):
        super().__init__()
        tp = config.tensor_model_parallel_size
        if num_heads % tp:
            raise ValueError(f"aggregation heads={num_heads} not divisible by tensor_model_parallel_size={tp}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.local_heads = num_heads // tp
        # Folded evaluation (no per-token keys/values); False selects the textbook form.
        self.folded = True
        init = config.init_method
        self.query = nn.Parameter(torch.empty(hidden_size))
        with torch.no_grad():
            self.query.normal_(0.0, config.init_method_std, generator=group_generator(seed, "final.query", 0))
        self.linear_q = tensor_parallel.ColumnParallelLinear(
            hidden_size, hidden_size, config=config, init_method=init, bias=True, gather_output=False
        )
        self.linear_kv = tensor_parallel.ColumnParallelLinear(
            hidden_size, 2 * hidden_size, config=config, init_method=init, bias=True, gather_output=False
        )
        self.linear_proj = tensor_parallel.RowParallelLinear(
            hidden_size, hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False,
        )

    def _query_input(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.query.to(dtype).view(1, 1, self.hidden_size)
        # Under no_grad (e.g. the first pass of activation recompute) a view of a parameter still
        # reports requires_grad without a grad_fn, which breaks module hooks (torch's ModTracker /
        # MemTracker); no graph is built there, so detaching changes nothing.
        return q if torch.is_grad_enabled() else q.detach()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.linear_kv.sequence_parallel or not self.folded:
            return self.forward_unfolded(tokens)
        return self.forward_folded(tokens)

    def forward_folded(self, tokens: torch.Tensor) -> torch.Tensor:
        """Same function as :meth:`forward_unfolded`, without the ``[N, L*B, 2D/T]`` keys/values.

        The learned query is folded into the key projection, ``q_h . (W_k,h x + b_k,h) =
        x . (W_k,h^T q_h) + q_h . b_k,h``, and the value projection is applied after the
        attention-weighted sum, ``sum_n p_n (W_v,h x_n + b_v,h) = W_v,h (sum_n p_n x_n) + b_v,h``
        (the weights sum to one). Beyond the input only ``[N, L*B, heads]`` scores and
        ``[L*B, heads, D]`` sums are materialized, in forward and in backward. The input enters
        through megatron's copy-to-TP-region exactly as in ``linear_kv`` (all-reduce in backward).
        """
        n, l, b, d = tokens.shape
        h, e = self.local_heads, self.head_dim
        dtype = tokens.dtype
        x = tensor_parallel.copy_to_tensor_model_parallel_region(tokens.reshape(n, l * b, d))
        w = self.linear_kv.weight.to(dtype).view(h, 2, e, d)
        bias = self.linear_kv.bias.to(dtype).view(h, 2, e)
        q, _ = self.linear_q(self._query_input(dtype))  # [1, 1, D/T]
        q = q.view(h, e) / math.sqrt(e)
        u = torch.einsum("he,hed->hd", q, w[:, 0])  # [h, D]
        offset = (q * bias[:, 0]).sum(-1)  # [h]
        sums = ChunkAttentionPool.apply(x, u.unsqueeze(0), offset.unsqueeze(0), [n])[0]  # [LB, h, D]
        context = torch.einsum("bhd,hed->bhe", sums, w[:, 1]) + bias[:, 1]  # [LB, h, e]
        out, _ = self.linear_proj(context.reshape(1, l * b, h * e))
        return out.view(l, b, d)

    def forward_unfolded(self, tokens: torch.Tensor) -> torch.Tensor:
        """Textbook form: explicit keys and values of all ``N`` tokens (reference, and the
        sequence-parallel path)."""
        n, l, b, d = tokens.shape
        h, e = self.local_heads, self.head_dim
        kv, _ = self.linear_kv(tokens.reshape(n, l * b, d))  # [N, LB, 2D/T]
        kv = kv.view(n, l * b, h, 2, e)
        key, value = kv[..., 0, :], kv[..., 1, :]
        q, _ = self.linear_q(self._query_input(tokens.dtype))  # [1, 1, D/T]
        q = q.view(h, e)
        scores = (key * q).sum(-1) / math.sqrt(e)  # [N, LB, h]
        probs = torch.softmax(_at_least_fp32(scores), dim=0).to(tokens.dtype)
        context = (probs.unsqueeze(-1) * value).sum(0)  # [LB, h, e]
        out, _ = self.linear_proj(context.reshape(1, l * b, h * e))
        return out.view(l, b, d)

"""Analytic FLOP count of the encoder (tokenizer, channel aggregation, backbone) and of a head.

Conventions (the usual ones for TFLOP/s reporting, e.g. Megatron-LM's):

- a multiply-add is 2 FLOPs; only matrix products are counted (element-wise work, norms and
  softmax are a few percent at most and are left out);
- counts are for **one copy of the model** (the work the model defines, whatever the parallel
  layout): ``tp_baseline`` tokenizing every channel on every TP rank does not count ``T`` times;
- training = 3 x forward (backward ~ 2 x forward); activation recompute is not counted, so the
  figure stays comparable between runs with and without recompute ("model FLOPs");
- TFLOP/s per rank = training FLOPs per step / step time / number of ranks (as the trainer logs).

What is counted is what this code computes. In particular the cross-attention layers over
channels are the *folded* forms implemented in :mod:`megatron_dchag.layers.aggregation`: the
learned query is folded into the key projection and the value projection is applied after the
weighted sum, so there is no per-token key/value projection. Per tree level with ``n`` tokens in
``m`` chunks and ``h`` heads (``B'`` = batch x patches)::

    scores  2 n B' D h      weighted sums  2 n B' h D      value + output projections  4 m B' D^2

(A textbook cross-attention would add ``4 n B' D^2`` for the key and value projections;
:func:`cross_attention_flops` gives both.)

With a linear tree the channel stage runs *fused* by default (``model.channel_stage_impl``,
:mod:`megatron_dchag.layers.fused_channel_stage`): the tree's weights are folded into the patch
embeddings, so the products are exactly the tokenizer's and the tree's ``2 n B' D`` per level
disappear. What remains of the tree is the elementwise weight formation, counted as the
``partial_aggregation`` part: one multiply per patch-embedding weight and a multiply-add per bias
element, ``C (p^2 + 2) D`` per forward, independent of the batch (:func:`fused_weight_formation_flops`).
"""

from __future__ import annotations

from typing import Dict, Optional

from megatron_dchag.config import ModelConfig, aggregation_level_sizes, resolve_model, split_evenly

__all__ = [
    "TRAINING_MULTIPLIER",
    "cross_attention_flops",
    "encoder_flops",
    "flops_breakdown",
    "fused_weight_formation_flops",
    "head_flops",
    "tflops_per_rank",
    "training_flops",
    "transformer_flops",
]

TRAINING_MULTIPLIER = 3.0


def transformer_flops(num_layers: int, hidden: int, ffn: int, seq_length: int, batch_size: int) -> float:
    """Forward FLOPs of ``num_layers`` standard (bidirectional) transformer layers.

    Per layer: QKV ``6 t D^2``, attention scores and context ``4 B s^2 D``, output projection
    ``2 t D^2``, MLP ``4 t D F`` (``t = B s`` tokens).
    """
    tokens = batch_size * seq_length
    per_layer = 8 * tokens * hidden**2 + 4 * tokens * hidden * ffn + 4 * batch_size * seq_length**2 * hidden
    return float(num_layers * per_layer)


def cross_attention_flops(num_tokens: int, num_queries: int, positions: int, hidden: int, heads: int,
                          folded: bool = True) -> float:
    """Forward FLOPs of learned-query cross-attention: ``num_tokens`` tokens pooled into
    ``num_queries`` outputs at each of ``positions`` (batch x patches) positions."""
    n, m, bp, d, h = num_tokens, num_queries, positions, hidden, heads
    if folded:
        return float(2 * n * bp * d * h + 2 * n * bp * h * d + 4 * m * bp * d * d)
    # Explicit K and V projections of every token, scores and context per head, output projection.
    return float(4 * n * bp * d * d + 4 * n * bp * d + 2 * m * bp * d * d)


def fused_weight_formation_flops(model: ModelConfig) -> float:
    """Elementwise FLOPs of the fused channel stage's weight formation: ``w_c W_c`` (one multiply
    per patch-embedding weight) and ``sum_c w_c (b_c + e_c)`` (a multiply-add per bias element)."""
    return float(model.num_channels * (model.patch_size**2 + 2) * model.hidden_size)


def _partial_aggregation_flops(model: ModelConfig, positions: int) -> float:
    """``model`` resolved."""
    d, heads = model.hidden_size, model.aggregation_heads
    total = 0.0
    for size in split_evenly(model.num_channels, model.channel_groups):
        for chunks in aggregation_level_sizes(size, model.aggregation_tree):
            n, m = sum(chunks), len(chunks)
            if model.aggregation_layer == "linear":
                total += 2.0 * n * positions * d
            else:
                total += cross_attention_flops(n, m, positions, d, heads) + 2.0 * m * d * d  # + query folds
    return total


def flops_breakdown(
    model: ModelConfig,
    batch_size: int,
    visible_patches: Optional[int] = None,
    tensor_model_parallel_size: int = 1,
    with_head: bool = False,
    values_per_channel: Optional[int] = None,
) -> Dict[str, float]:
    """Forward FLOPs by part: ``tokenizer``, ``partial_aggregation``, ``final_aggregation``,
    ``backbone``, ``head`` (0 unless ``with_head``) and ``total``.

    ``model``: as written or resolved; ``tensor_model_parallel_size`` only matters for a model whose
    ``channel_groups`` is unset (it is resolved with :func:`~megatron_dchag.config.resolve_model`: G = T).
    ``visible_patches``: patch positions that are tokenized (MAE masking), default all.
    ``values_per_channel``: outputs per channel and patch of the head (default ``p*p``).
    """
    model = resolve_model(model, tensor_model_parallel_size)
    c, d, k = model.num_channels, model.hidden_size, model.patch_size**2
    seq = model.num_patches if visible_patches is None else int(visible_patches)
    positions = batch_size * seq
    out: Dict[str, float] = {}
    out["tokenizer"] = 2.0 * positions * c * k * d
    if model.fuses_channel_stage:
        out["partial_aggregation"] = fused_weight_formation_flops(model)
        final_tokens = model.channel_groups
    elif model.uses_partial_aggregation:
        out["partial_aggregation"] = _partial_aggregation_flops(model, positions)
        final_tokens = model.channel_groups
    else:
        out["partial_aggregation"] = 0.0
        final_tokens = c
    out["final_aggregation"] = cross_attention_flops(final_tokens, 1, positions, d, model.aggregation_heads) + 4.0 * d * d
    backbone = transformer_flops(model.num_layers, d, model.ffn_hidden_size, seq, batch_size)
    if model.lead_time_embedding:
        backbone += 2.0 * batch_size * d * d
    out["backbone"] = backbone
    out["head"] = head_flops(model, batch_size, visible_patches, values_per_channel) if with_head else 0.0
    out["total"] = sum(out.values())
    return out


def encoder_flops(model_cfg: ModelConfig, batch_size: int, visible_patches: Optional[int] = None,
                  tensor_model_parallel_size: int = 1) -> float:
    """Forward FLOPs of the encoder (channel stage + backbone) for ``batch_size`` samples.

    Training FLOPs are ``3 x`` this (:func:`training_flops`)."""
    parts = flops_breakdown(model_cfg, batch_size, visible_patches, tensor_model_parallel_size)
    return parts["total"]


def head_flops(model_cfg: ModelConfig, batch_size: int, output_patches: Optional[int] = None,
               values_per_channel: Optional[int] = None) -> float:
    """Forward FLOPs of the channel-parallel head ``D -> C * values_per_channel`` on every
    output patch position (all ranks together)."""
    seq = model_cfg.num_patches if output_patches is None else int(output_patches)
    v = model_cfg.patch_size**2 if values_per_channel is None else int(values_per_channel)
    return 2.0 * batch_size * seq * model_cfg.hidden_size * model_cfg.num_channels * v


def training_flops(forward_flops: float) -> float:
    """Forward + backward FLOPs from forward FLOPs."""
    return TRAINING_MULTIPLIER * float(forward_flops)


def tflops_per_rank(flops_per_step: float, step_time_s: float, num_ranks: int) -> float:
    """Achieved TFLOP/s per rank."""
    if step_time_s <= 0 or num_ranks < 1:
        return 0.0
    return flops_per_step / step_time_s / num_ranks / 1e12

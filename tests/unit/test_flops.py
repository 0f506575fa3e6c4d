"""The analytic FLOP counter (megatron_dchag.flops) on hand-computed cases, and against torch's
FlopCounterMode on the real encoder."""

import pytest
import torch

from megatron_dchag.config import ModelConfig
from megatron_dchag.flops import (
    cross_attention_flops,
    encoder_flops,
    flops_breakdown,
    fused_weight_formation_flops,
    head_flops,
    tflops_per_rank,
    training_flops,
    transformer_flops,
)

# B=1, image 4x4, patch 2 -> L=4 positions, k=4; D=8, F=32, 1 layer, 2 heads, C=4.
TINY = dict(num_channels=4, image_size=(4, 4), patch_size=2, hidden_size=8, num_layers=1, num_attention_heads=2)


def test_tp_baseline_by_hand():
    parts = flops_breakdown(ModelConfig(strategy="tp_baseline", **TINY), batch_size=1)
    assert parts["tokenizer"] == 2 * 4 * 4 * 4 * 8  # 2 * positions * C * k * D = 1024
    # folded cross-attention over N=4 tokens, 2 heads: scores 2*4*4*8*2 + sums 2*4*4*2*8 + value/out 4*1*4*64,
    # plus the query folds 4*D^2
    assert parts["final_aggregation"] == 512 + 512 + 1024 + 256
    # 8 t D^2 + 4 t D F + 4 B s^2 D with t = s = 4
    assert parts["backbone"] == 2048 + 4096 + 512
    assert parts["partial_aggregation"] == 0 and parts["head"] == 0
    assert parts["total"] == 9984
    assert encoder_flops(ModelConfig(strategy="tp_baseline", **TINY), 1) == 9984
    assert training_flops(9984) == 3 * 9984


def test_dchag_linear_two_groups_by_hand():
    cfg = ModelConfig(strategy="dchag", aggregation_layer="linear", channel_groups=2, channel_stage_impl="reference",
                      **TINY)
    parts = flops_breakdown(cfg, batch_size=1)
    assert parts["partial_aggregation"] == 2 * (2 * 2 * 4 * 8)  # two groups of 2 channels: 2 n P D each
    assert parts["final_aggregation"] == 256 + 256 + 1024 + 256  # over G = 2 group tokens
    assert parts["total"] == 1024 + 256 + 1792 + 6656
    # G defaults to the TP size
    assert encoder_flops(ModelConfig(strategy="dchag", channel_stage_impl="reference", **TINY), 1,
                         tensor_model_parallel_size=2) == parts["total"]
    # Fused (the default for a linear tree): the tokenizer's products, the tree's weights folded into
    # the patch embeddings: C (k + 2) D elementwise, whatever the batch
    fused = flops_breakdown(ModelConfig(strategy="dchag", aggregation_layer="linear", channel_groups=2, **TINY), 1)
    assert fused["tokenizer"] == parts["tokenizer"]
    assert fused["partial_aggregation"] == fused_weight_formation_flops(cfg) == 4 * (4 + 2) * 8
    assert flops_breakdown(ModelConfig(strategy="dchag", **TINY), 3, tensor_model_parallel_size=2)[
        "partial_aggregation"] == 192


def test_head_masking_batch_and_helpers():
    cfg = ModelConfig(strategy="tp_baseline", **TINY)
    assert head_flops(cfg, 1) == 2 * 1 * 4 * 8 * 4 * 4
    with_head = flops_breakdown(cfg, 1, with_head=True)
    assert with_head["total"] == 9984 + 1024
    # everything scales with the batch except the query folds (4 D^2); masking keeps 2 of 4 patches
    assert encoder_flops(cfg, 3) == 3 * (9984 - 256) + 256
    masked = flops_breakdown(cfg, 1, visible_patches=2)
    assert masked["tokenizer"] == 512
    assert transformer_flops(1, 8, 32, 2, 1) == 8 * 2 * 64 + 4 * 2 * 8 * 32 + 4 * 4 * 8
    assert cross_attention_flops(4, 1, 4, 8, 2, folded=False) == 4 * 4 * 4 * 64 + 4 * 4 * 4 * 8 + 2 * 4 * 64
    assert tflops_per_rank(4e12, 2.0, 2) == pytest.approx(1.0)


def _count_with_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_dchag.models.encoder import build_encoder

    out = []
    cases = [("tp_baseline", "linear", [], "auto"), ("dist_tokenize", "linear", [], "auto"),
             ("dchag", "linear", [4], "reference"), ("dchag", "linear", [4], "fused"),
             ("hierarchical", "linear", [4, 2], "fused"), ("dchag", "cross_attention", [4], "auto"),
             ("hierarchical", "cross_attention", [], "auto")]
    for strategy, layer, tree, impl in cases:
        cfg = ModelConfig(num_channels=24, channel_groups=2, image_size=(16, 32), patch_size=4, hidden_size=32,
                          num_layers=2, num_attention_heads=4, strategy=strategy, aggregation_layer=layer,
                          aggregation_tree=tree, channel_stage_impl=impl)
        model = build_encoder(cfg)
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.randn(2, 24, 16, 32))
        out.append((cfg, counter.get_total_flops()))
    return out


def test_matches_torch_flop_counter_on_the_real_encoder():
    """FlopCounterMode counts every matmul the code runs, but not SDPA on CPU nor elementwise work:
    adding the attention term 4 B s^2 D per layer back, and the fused stage's weight formation, the
    analytic count is exact."""
    from tests.dist_utils import run_single

    for cfg, counted in run_single(_count_with_flop_counter):
        analytic = flops_breakdown(cfg, 2)["total"]
        sdpa = cfg.num_layers * 4 * 2 * cfg.num_patches**2 * cfg.hidden_size
        elementwise = fused_weight_formation_flops(cfg) if cfg.fuses_channel_stage else 0.0
        label = (cfg.strategy, cfg.channel_stage_impl)
        assert counted + sdpa + elementwise == pytest.approx(analytic, rel=1e-9), label  # float64 sums of integers

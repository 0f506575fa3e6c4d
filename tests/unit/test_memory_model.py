"""The analytic memory model (megatron_dchag.memory_model): its arithmetic on a hand-computed case,
the parameter count against the real encoder, and the paper-scale statements."""

import dataclasses

import pytest

from megatron_dchag.memory_model import GIB, MemoryConfig, estimate_memory, paper_config, param_counts

# C=4, image 4x4, patch 2 (L=4 positions, k=4), D=8, F=32, 1 layer, 2 heads, B=1, TP=1, fp32, torch AdamW.
HAND = MemoryConfig(hidden_size=8, num_layers=1, num_attention_heads=2, image_size=(4, 4), patch_size=2,
                    num_channels=4, strategy="tp_baseline", tensor_model_parallel_size=1, micro_batch_size=1)


def test_parameter_count_by_hand():
    p = param_counts(HAND)
    assert p["tokenizer"] == 4 * (4 * 8 + 8) + 4 * 8  # patch embeddings + biases + channel embedding
    assert p["final_aggregation"] == 8 + (64 + 8) + (128 + 16) + 64 + 8  # query, q, kv, proj
    # 2 norms + qkv + proj + fc1 + fc2, final norm, position table
    assert p["backbone"] == 4 * 8 + (192 + 24) + (64 + 8) + (256 + 32) + (256 + 8) + 2 * 8 + 4 * 8
    assert p["partial_aggregation"] == 0 and p["head"] == 0
    assert p["total"] == 192 + 296 + 920 == 1408


def test_breakdown_arithmetic_by_hand():
    est = estimate_memory(HAND)
    e, pos, d = 4, 4, 8
    params, opt = 1408 * 4, 1408 * 8
    inputs = 1 * 4 * 4 * 4 * e
    patches, tokens = 4 * pos * 4 * e, 4 * pos * d * e
    final_saved = 4 * pos * 2 * e + pos * 2 * d * e + pos * d * e  # weights, sums, context
    small = 6 * pos * d * e
    # channel-stage backward: its saved tensors + the token gradient; grads of all but the channel stage
    channel_backward = params + opt + inputs + patches + tokens + final_saved + tokens + small + (1408 - 488) * 4
    forward_end = params + opt + inputs + patches + tokens + final_saved + pos * d * 16 * e + 2 * pos * d * e + small
    # torch AdamW's step: an fp32 sqrt(v) of every parameter and one more of the largest (fc1, 256)
    optimizer_step = params + opt + inputs + params + params + 256 * 4
    assert est.phases == {"forward_end": forward_end, "channel_backward": channel_backward,
                          "optimizer_step": optimizer_step}
    assert (channel_backward, forward_end, optimizer_step) == (23392, 21504, 29440)
    assert est.total == optimizer_step and est.peak_phase == "optimizer_step"
    assert est.parameters + est.gradients + est.optimizer + est.inputs + est.activations == pytest.approx(est.total)


def test_fused_channel_stage_by_hand():
    """The same model with a linear tree over one group, fused: no patches, tokens or token
    gradient; the group token, the final layer's terms and one block's work buffers."""
    from megatron_dchag.layers.fused_channel_stage import BLOCK_CONTRACTION
    from megatron_dchag.memory_model import FUSED_BLOCK_CONTRACTION

    assert FUSED_BLOCK_CONTRACTION == BLOCK_CONTRACTION
    fused_cfg = dataclasses.replace(HAND, strategy="dchag", aggregation_layer="linear", channel_groups=1)
    assert fused_cfg.fused and not dataclasses.replace(fused_cfg, channel_stage_impl="reference").fused
    est = estimate_memory(fused_cfg)
    e, pos, d = 4, 4, 8
    params, opt = 1412 * 4, 1412 * 8  # + the tree's 4 weights
    inputs = 1 * 4 * 4 * 4 * e
    group_token = 1 * pos * d * e
    final_saved = 1 * pos * 2 * e + pos * 2 * d * e + pos * d * e
    work = pos * 16 * e + 16 * d * 4 + 2 * group_token  # a block of all 4 channels (16 columns)
    small = 6 * pos * d * e
    assert est.phases["channel_backward"] == params + opt + inputs + group_token + final_saved + work + small + params
    assert est.activation_parts["tokenizer"] == 0
    with pytest.raises(ValueError, match="needs a linear partial-aggregation tree"):
        estimate_memory(dataclasses.replace(HAND, channel_stage_impl="fused"))
    # At 1024 channels (the benchmark configuration, TP=1) the fused stage's backward is no
    # longer the peak: the optimizer step is.
    big = MemoryConfig(num_channels=1024, strategy="dchag", aggregation_layer="linear")
    fused_big, reference_big = estimate_memory(big), estimate_memory(dataclasses.replace(big, channel_stage_impl="reference"))
    assert fused_big.peak_phase == "optimizer_step" and reference_big.peak_phase == "channel_backward"
    assert fused_big.phases["channel_backward"] < 0.5 * reference_big.phases["channel_backward"]


def test_sharding_precision_and_optimizer_rules():
    big = dataclasses.replace(HAND, num_channels=64, channel_groups=4, image_size=(32, 32), num_attention_heads=4)
    base = estimate_memory(dataclasses.replace(big, strategy="tp_baseline", tensor_model_parallel_size=4))
    dchag = estimate_memory(dataclasses.replace(big, strategy="dchag", tensor_model_parallel_size=4))
    assert param_counts(dataclasses.replace(big, strategy="dchag", tensor_model_parallel_size=4))["tokenizer"] * 4 == \
        param_counts(dataclasses.replace(big, strategy="tp_baseline", tensor_model_parallel_size=4))["tokenizer"]
    assert dchag.total < 0.5 * base.total
    mega = dataclasses.replace(HAND, precision="bf16", framework="megatron")
    est = estimate_memory(mega)
    assert est.parameters == 1408 * 2 and est.optimizer == 1408 * 12  # bf16 weights; fp32 master + m + v
    assert estimate_memory(dataclasses.replace(mega, data_parallel_size=4, distributed_optimizer=True)).optimizer \
        == 1408 * 3
    deep = dataclasses.replace(mega, num_layers=4)
    assert estimate_memory(dataclasses.replace(deep, recompute="full")).phases["forward_end"] < \
        estimate_memory(deep).phases["forward_end"]
    with pytest.raises(ValueError, match="not divisible"):
        estimate_memory(dataclasses.replace(HAND, channel_groups=3, tensor_model_parallel_size=2,
                                            num_attention_heads=2))


def test_megatron_gradient_buffer_and_adam_step_by_hand():
    """framework=megatron (the trainer and the benchmark): DDP's fp32 main-grad buffer lives all
    step; the Adam step allocates nothing with FusedAdam and two fp32 temporaries of the largest
    parameter with torch's AdamW; the fused stage's backward also holds the tokenizer's weight
    gradient until DDP's hook adds it to the buffer."""
    mega = dataclasses.replace(HAND, framework="megatron")
    fused_adam, torch_adam = estimate_memory(mega), estimate_memory(dataclasses.replace(mega, adam_impl="torch"))
    params, opt, inputs = 1408 * 4, 1408 * 8, 1 * 4 * 4 * 4 * 4
    assert fused_adam.phases["optimizer_step"] == params + opt + inputs + 1408 * 4
    assert torch_adam.phases["optimizer_step"] - fused_adam.phases["optimizer_step"] == 2 * 256 * 4  # fc1
    assert torch_adam.phases["forward_end"] == fused_adam.phases["forward_end"]
    assert fused_adam.phases["forward_end"] - estimate_memory(HAND).phases["forward_end"] == 1408 * 4
    stage = dataclasses.replace(HAND, strategy="dchag", aggregation_layer="linear", channel_groups=1)
    megatron_stage = estimate_memory(dataclasses.replace(stage, framework="megatron"))
    assert megatron_stage.phases["channel_backward"] - estimate_memory(stage).phases["channel_backward"] == 4 * 4 * 8 * 4
    with pytest.raises(ValueError, match="adam_impl"):
        estimate_memory(dataclasses.replace(mega, adam_impl="apex"))


def _real_param_counts():
    from megatron.core import parallel_state

    from megatron_dchag.config import ModelConfig
    from megatron_dchag.models.encoder import build_encoder

    counts = []
    for strategy, layer, tree in (("tp_baseline", "linear", []), ("dist_tokenize", "linear", []),
                                  ("hierarchical", "cross_attention", [4]), ("dchag", "cross_attention", [4]),
                                  ("dchag", "linear", [4, 2])):
        cfg = ModelConfig(num_channels=30, channel_groups=2, image_size=(8, 16), patch_size=4, hidden_size=16,
                          num_layers=1, num_attention_heads=2, strategy=strategy, aggregation_layer=layer,
                          aggregation_tree=tree)
        counts.append(sum(p.numel() for p in build_encoder(cfg).parameters()))
    return parallel_state.get_tensor_model_parallel_rank(), counts


def test_param_count_matches_the_real_encoder_at_tp2():
    from tests.dist_utils import run_distributed

    results = run_distributed(_real_param_counts, 2, tensor_model_parallel_size=2)
    cases = (("tp_baseline", "linear", []), ("dist_tokenize", "linear", []), ("hierarchical", "cross_attention", [4]),
             ("dchag", "cross_attention", [4]), ("dchag", "linear", [4, 2]))
    for i, (strategy, layer, tree) in enumerate(cases):
        cfg = MemoryConfig(num_channels=30, channel_groups=2, image_size=(8, 16), patch_size=4, hidden_size=16,
                           num_layers=1, num_attention_heads=2, strategy=strategy, aggregation_layer=layer,
                           aggregation_tree=tree, tensor_model_parallel_size=2)
        assert param_counts(cfg)["total"] == max(counts[i] for _, counts in results), strategy


def test_paper_scale_statements():
    """Under the documented assumptions (paper_config): pure TP cannot hold the 26B model with 256
    channels on a 64 GiB GCD, D-CHAG holds it with 512 channels under 80%."""
    device = 64 * GIB
    tp_26b_256 = estimate_memory(paper_config("26B", 256, "tp_baseline"))
    dchag_26b_512 = estimate_memory(paper_config("26B", 512, "dchag"))
    assert tp_26b_256.total > device
    assert dchag_26b_512.total < 0.8 * device
    # 26B is 25.8B backbone parameters (hidden 8192, 32 layers)
    assert 25e9 < param_counts(paper_config("26B", 512, "dchag", tensor_model_parallel_size=1))["backbone"] < 26.5e9
    # D-CHAG always needs less than pure TP, and the gap grows with the channel count
    for model in ("7B", "15B", "26B"):
        ratios = [estimate_memory(paper_config(model, c, "dchag")).total
                  / estimate_memory(paper_config(model, c, "tp_baseline")).total for c in (256, 512, 1024)]
        assert all(r < 1 for r in ratios) and ratios == sorted(ratios, reverse=True)

"""The memory/compute fast paths of the channel stage: same function, less memory.

- ChunkAttentionPool (folded cross-attention over channel chunks) has exact gradients;
- the equal-chunk linear aggregation path equals explicit weighted sums;
- the folded final cross-attention equals the textbook one (explicit keys/values), forward and all
  gradients, and its backward holds far less memory;
- activation recompute of the channel stage gives the same gradients for every parameter (the
  channel stage's included), on the reference path (cross-attention tree) and the fused one
  (linear tree; the fused stage itself is tested in test_fused_channel_stage.py).
"""

import torch

from megatron_dchag.layers.aggregation import ChunkAttentionPool, LinearAggregationLevel, TreeLevelPlan
from megatron_dchag.layers.channel_plan import ChannelGroupPlan
from tests.tolerances import FLOAT32_REL, FLOAT64_REL, assert_close_scaled, max_relative_error


def test_chunk_attention_pool_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(9, 3, 8, dtype=torch.double, requires_grad=True)
    u = torch.randn(3, 2, 8, dtype=torch.double, requires_grad=True)
    c = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, u, c: ChunkAttentionPool.apply(x, u, c, [4, 3, 2]), (x, u, c))
    assert torch.autograd.gradcheck(lambda x, u: ChunkAttentionPool.apply(x, u, None, [9]), (x, u[:1]))


def test_equal_chunk_linear_level_matches_weighted_sums():
    torch.manual_seed(0)
    level = TreeLevelPlan.build_tree(ChannelGroupPlan(24, 2), sharded=False, tree=[4])[0]  # 6 chunks of 4
    layer = LinearAggregationLevel(level, 0, seed=0)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(24, 3, 2, 5, requires_grad=True)
    out = layer(x)
    ref = torch.stack([(layer.weight[4 * i:4 * i + 4].view(-1, 1, 1, 1) * x[4 * i:4 * i + 4]).sum(0) for i in range(6)])
    # One product vs explicit sums (another summation order): relative to the largest value.
    assert_close_scaled(out, ref, FLOAT32_REL, "equal-chunk level")
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, layer.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, layer.weight), g)
    assert_close_scaled(gx, rx, FLOAT32_REL, "input gradient")
    assert_close_scaled(gw, rw, FLOAT32_REL, "weight gradient")


def _final_and_recompute_checks():
    from torch.distributed._tools.mem_tracker import MemTracker

    from megatron_dchag.config import ModelConfig, TrainingConfig
    from megatron_dchag.layers.aggregation import FinalChannelCrossAttention
    from megatron_dchag.models.encoder import build_encoder, make_transformer_config

    torch.manual_seed(0)
    cfg = ModelConfig(num_channels=8, hidden_size=32, num_attention_heads=4)
    layer = FinalChannelCrossAttention(make_transformer_config(cfg), 32, 4, seed=1).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(13, 5, 2, 32, dtype=torch.double, requires_grad=True)
    weights = torch.randn(5, 2, 32, dtype=torch.double)
    results = {}
    for folded in (True, False):
        layer.folded = folded
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        (out * weights).sum().backward()
        results[folded] = [out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    # float64, two formulations of one function: FLOAT64_REL of each tensor's largest magnitude.
    equal = all(max_relative_error(a, b) <= FLOAT64_REL for a, b in zip(results[True], results[False]))

    # Peak memory of forward + backward over many tokens: no [N, L*B, 2D] keys/values when folded.
    layer = layer.float()
    peaks = {}
    for folded in (True, False):
        layer.folded = folded
        big = torch.randn(256, 64, 2, 32, requires_grad=True)
        tracker = MemTracker()
        tracker.track_external(layer, big)
        with tracker:
            layer(big).square().sum().backward()
        peaks[folded] = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]

    # Channel-stage recompute: identical gradients for every parameter, reference and fused paths.
    images = torch.randn(2, 12, 8, 16)
    proj = torch.randn(8, 2, 16)  # a fixed projection: the normalised output's own norm has ~0 gradient
    missing, same = [], True
    for layer in ("cross_attention", "linear"):
        model_cfg = ModelConfig(num_channels=12, channel_groups=2, image_size=(8, 16), patch_size=4, hidden_size=16,
                                num_layers=1, num_attention_heads=2, strategy="dchag", aggregation_layer=layer,
                                aggregation_tree=[3])
        grads = {}
        for granularity in (None, "channel_stage"):
            torch.manual_seed(0)  # megatron's layers draw their initial weights from the global generator
            model = build_encoder(model_cfg, training=TrainingConfig(recompute_granularity=granularity), seed=5)
            assert model.channel_stage.fused == (layer == "linear")
            model.train()
            (model(images) * proj).sum().backward()
            grads[granularity] = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
        missing += [f"{layer}: {n}" for n, g in grads["channel_stage"].items() if g is None]
        # Recompute replays the same kernels; FLOAT32_REL of the largest gradient leaves room for
        # a different reduction order in backward.
        same = same and all(max_relative_error(g, grads[None][n]) <= FLOAT32_REL
                            for n, g in grads["channel_stage"].items() if g is not None)
    return equal, peaks, missing, same


def test_folded_final_aggregation_and_channel_stage_recompute():
    from tests.dist_utils import run_single

    equal, peaks, missing, same = run_single(_final_and_recompute_checks)
    assert equal, "folded final cross-attention differs from the textbook form"
    # textbook keeps keys/values [N, LB, 2D] (2x the tokens) and three such gradients; folded ~1x
    assert peaks[True] < 0.5 * peaks[False], peaks
    assert not missing, f"no gradient under channel-stage recompute: {missing}"
    assert same

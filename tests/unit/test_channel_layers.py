"""Single-process tests of the channel-stage building blocks against naive references."""

import math

import pytest
import torch

from megatron_dchag.config import aggregation_level_sizes
from megatron_dchag.layers.aggregation import (
    CrossAttentionAggregationLevel,
    LinearAggregationLevel,
    TreeLevelPlan,
    segment_softmax,
)
from megatron_dchag.layers.channel_plan import ChannelGroupPlan, GroupShardedLayout
from megatron_dchag.layers.tokenizer import ChannelEmbedding, GroupedPatchTokenizer
from tests.tolerances import FLOAT32_REL, FLOAT64_REL, assert_close_scaled, max_relative_error


def test_plan_500_channels_8_groups():
    plan = ChannelGroupPlan(500, 8, tp_size=4, tp_rank=1)
    assert plan.group_sizes == [63, 63, 63, 63, 62, 62, 62, 62]
    assert sum(plan.group_sizes) == 500
    assert [plan.rank_channel_range(r) for r in range(4)] == [(0, 126), (126, 252), (252, 376), (376, 500)]
    assert plan.owned_channel_range(sharded=True) == (126, 252)
    assert plan.owned_channel_range(sharded=False) == (0, 500)
    assert list(plan.owned_groups(sharded=True)) == [2, 3]


def test_plan_rejects_bad_inputs():
    with pytest.raises(ValueError, match="not divisible"):
        ChannelGroupPlan(64, 6, tp_size=4)
    with pytest.raises(ValueError, match=">="):
        ChannelGroupPlan(3, 4)


def test_tree_level_sizes():
    assert aggregation_level_sizes(63, []) == [[63]]
    assert aggregation_level_sizes(130, [64]) == [[44, 43, 43], [3]]
    assert aggregation_level_sizes(128, [64, 4]) == [[64, 64], [2], [1]]
    assert aggregation_level_sizes(256, [64, 2]) == [[64, 64, 64, 64], [2, 2], [2]]


def _per_channel_conv_loop(tok, images, index, p, d, channel_of=None, flip_patches=False, transpose_weight=False):
    """The textbook tokenizer: one 1->D Conv2d per channel. The keyword arguments break it on purpose
    (a wrong channel, a wrong patch order, a transposed weight) to show the comparison catches each."""
    c = images.shape[1]
    outs = []
    for ch in range(c):
        src = ch if channel_of is None else channel_of(ch)
        conv = torch.nn.Conv2d(1, d, p, stride=p)
        with torch.no_grad():
            weight = tok.weight[ch].unsqueeze(1)  # [D, 1, p, p]
            conv.weight.copy_(weight.transpose(-1, -2) if transpose_weight else weight)
            conv.bias.copy_(tok.bias[ch])
        ref = conv(images[:, src : src + 1]).flatten(2).permute(2, 0, 1)  # [L, B, D]
        if flip_patches:
            ref = ref.flip(0)
        if index is not None:
            ref = torch.stack([ref[index[b], b] for b in range(images.shape[0])], dim=1)
        outs.append(ref)
    return torch.stack(outs)  # [C, L, B, D]


@pytest.mark.parametrize("with_index", [False, True])
def test_grouped_tokenizer_equals_per_channel_conv_loop(with_index):
    """One grouped product equals a per-channel convolution loop.

    The two are different kernels (baddbmm vs conv2d), which round differently by CPU and build:
    they are compared relative to the largest output (FLOAT32_REL, ~84 float32 eps), not elementwise
    at one ulp. Each deliberately broken reference differs by a large fraction of the output, so
    a wrong channel, patch order or weight layout still fails the comparison.
    """
    torch.manual_seed(0)
    c, d, p = 11, 16, 4
    plan = ChannelGroupPlan(c, 3)
    tok = GroupedPatchTokenizer(plan, sharded=False, patch_size=p, hidden_size=d, seed=7)
    with torch.no_grad():
        tok.bias.normal_()
    images = torch.randn(2, c, 12, 16) + torch.arange(c).view(1, c, 1, 1)
    index = torch.stack([torch.randperm(12)[:5] for _ in range(2)]) if with_index else None
    out = tok(images, index)  # [C, L, B, D]
    assert_close_scaled(out, _per_channel_conv_loop(tok, images, index, p, d), FLOAT32_REL, "tokenizer vs loop")
    broken = {
        "wrong channel": dict(channel_of=lambda ch: (ch + 1) % c),
        "wrong patch order": dict(flip_patches=True),
        "transposed weight": dict(transpose_weight=True),
    }
    for name, kwargs in broken.items():
        err = max_relative_error(out, _per_channel_conv_loop(tok, images, index, p, d, **kwargs))
        assert err > 1000 * FLOAT32_REL, f"{name}: the comparison would not catch it (error {err:.2e})"


def test_tokenizer_and_embedding_hold_only_own_channels_exact_counts():
    c, g, t, d, p = 500, 8, 4, 32, 6
    totals = 0
    for rank in range(t):
        plan = ChannelGroupPlan(c, g, t, rank)
        tok = GroupedPatchTokenizer(plan, sharded=True, patch_size=p, hidden_size=d, seed=1)
        emb = ChannelEmbedding(plan, sharded=True, hidden_size=d)
        own = plan.channels_per_rank[rank]
        assert own == [126, 126, 124, 124][rank]
        assert tok.weight.numel() == own * d * p * p and tok.bias.numel() == own * d
        assert emb.weight.numel() == own * d
        totals += tok.weight.numel() + tok.bias.numel() + emb.weight.numel()
    assert totals == c * d * (p * p + 2)


def test_tokenizer_init_independent_of_tp():
    full = GroupedPatchTokenizer(ChannelGroupPlan(26, 4), sharded=False, patch_size=2, hidden_size=8, seed=3)
    pieces = [
        GroupedPatchTokenizer(ChannelGroupPlan(26, 4, 2, r), sharded=True, patch_size=2, hidden_size=8, seed=3).weight
        for r in range(2)
    ]
    assert torch.equal(torch.cat(pieces), full.weight)


def test_wavelength_embedding_slices_by_channel():
    wl = [400 + 2.0 * i for i in range(10)]
    full = ChannelEmbedding(ChannelGroupPlan(10, 2), sharded=False, hidden_size=8, wavelengths=wl).weight
    part = ChannelEmbedding(ChannelGroupPlan(10, 2, 2, 1), sharded=True, hidden_size=8, wavelengths=wl).weight
    assert torch.equal(part, full[5:])
    assert not torch.equal(full, ChannelEmbedding(ChannelGroupPlan(10, 2), False, 8).weight)


def test_group_layout_roundtrip():
    layout = GroupShardedLayout(axis=0, block_sizes=(3, 2, 2, 1), owned=(1, 2))
    full = torch.arange(8.0)
    assert layout.local_from_full(full).tolist() == [3.0, 4.0, 5.0, 6.0]


def test_segment_softmax_matches_per_segment():
    torch.manual_seed(0)
    scores = torch.randn(7, 3, 2)
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = segment_softmax(scores, seg, 3)
    for s, (a, b) in enumerate([(0, 3), (3, 5), (5, 7)]):
        # Probabilities in [0, 1]: relative to the largest one.
        assert_close_scaled(out[a:b], torch.softmax(scores[a:b], dim=0), FLOAT32_REL, f"segment {s}")


def _level(group_sizes, tree, level=0):
    plan = ChannelGroupPlan(sum(group_sizes), len(group_sizes))
    assert plan.group_sizes == list(group_sizes)
    return TreeLevelPlan.build_tree(plan, sharded=False, tree=tree)[level]


def test_linear_level_matches_weighted_sums():
    torch.manual_seed(0)
    level = _level([7, 6], [3])  # chunks [3,2,2] and [2,2,2]
    layer = LinearAggregationLevel(level, 0, seed=0)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(13, 4, 2, 8)
    out = layer(x)
    start, rows = 0, []
    for length in level.chunk_lengths:
        w = layer.weight[start : start + length]
        rows.append((w.view(-1, 1, 1, 1) * x[start : start + length]).sum(0))
        start += length
    # Different summation order (one product vs explicit sums): relative to the largest value.
    assert_close_scaled(out, torch.stack(rows), FLOAT32_REL, "linear level vs weighted sums")


def test_cross_attention_level_matches_explicit_attention():
    """The folded formulation equals textbook multi-head attention with explicit K and V."""
    torch.manual_seed(0)
    d, heads = 16, 4
    e = d // heads
    level = _level([7, 6], [3])
    layer = CrossAttentionAggregationLevel(level, 0, d, heads, seed=0, query_std=1.0)
    with torch.no_grad():
        layer.value_bias.normal_()
        layer.out_bias.normal_()
    x = torch.randn(13, 5, 2, d, dtype=torch.float64)
    layer = layer.double()
    out = layer(x)
    start, rows = 0, []
    for j, length in enumerate(level.chunk_lengths):
        g = int(level.group_of_chunk[j])
        xs = x[start : start + length]  # [n, L, B, D]
        k = xs @ layer.key_weight[g].T
        v = xs @ layer.value_weight[g].T + layer.value_bias[g]
        q = layer.query[j]
        ctx = []
        for h in range(heads):
            sl = slice(h * e, (h + 1) * e)
            a = torch.softmax((k[..., sl] @ q[sl]) / math.sqrt(e), dim=0)  # [n, L, B]
            ctx.append((a.unsqueeze(-1) * v[..., sl]).sum(0))
        rows.append(torch.cat(ctx, -1) @ layer.out_weight[g].T + layer.out_bias[g])
        start += length
    # float64, folded vs explicit keys/values: FLOAT64_REL (1e-10) of the largest output.
    assert_close_scaled(out, torch.stack(rows), FLOAT64_REL, "folded vs explicit attention")


def test_linear_tree_path_weights_are_the_products_along_each_path():
    """A linear tree = one weight per channel: the product of the level weights from the channel
    to its group token (what the fused channel stage folds into the patch embeddings)."""
    from megatron_dchag.layers.aggregation import PartialChannelAggregation

    torch.manual_seed(0)
    plan = ChannelGroupPlan(13, 2)  # groups of 7 and 6; tree [3]: chunks [3, 2, 2] and [3, 3]
    tree = PartialChannelAggregation(plan, sharded=False, tree=[3], layer_kind="linear", hidden_size=8,
                                     num_heads=2, seed=0).double()
    with torch.no_grad():
        for p in tree.parameters():
            p.normal_()
    w, group_of_channel = tree.path_weights()
    chunk_of_channel = [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4]
    level0, level1 = tree.levels[0].weight, tree.levels[1].weight
    assert group_of_channel.tolist() == [0] * 7 + [1] * 6
    assert torch.equal(w, torch.stack([level0[c] * level1[chunk_of_channel[c]] for c in range(13)]))
    x = torch.randn(13, 3, 2, 8, dtype=torch.float64)
    expected = torch.stack([(w[group_of_channel == g].view(-1, 1, 1, 1) * x[group_of_channel == g]).sum(0)
                            for g in range(2)])
    assert_close_scaled(tree(x), expected, FLOAT64_REL, "tree vs path weights")
    with pytest.raises(ValueError, match="needs a linear tree"):
        PartialChannelAggregation(plan, False, [3], "cross_attention", 8, 2, seed=0).path_weights()

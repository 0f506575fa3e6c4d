"""The fused channel stage (tokenizer + linear tree as one product per group) against the reference.

- :class:`GroupedPatchEmbeddingSum` has exact gradients (``gradcheck``; all patches and visible
  ones, several blocks per group, uneven groups, the images' gradient included);
- fused = reference for the group tokens and for every parameter's gradient (tokenizer weight and
  bias, channel embedding, every tree level): float64 to 1e-10 and float32 to 1e-5 of the largest
  magnitude, for trees ``[]``, ``[64]``, ``[64, 4]``, uneven groups, masked inputs, and the ``dchag``
  (one TP rank's own groups) and ``hierarchical`` (all groups) layouts;
- the whole encoder: fused = reference (output and every gradient), and ``auto`` picks the fused
  path exactly for linear trees; ``fused`` elsewhere is refused;
- memory: the fused forward + backward holds no ``[C, L, B, D]`` tensor (MemTracker).
"""

import pytest
import torch

from megatron_dchag.config import ConfigError, ModelConfig
from megatron_dchag.layers.aggregation import PartialChannelAggregation
from megatron_dchag.layers.channel_plan import ChannelGroupPlan
from megatron_dchag.layers.fused_channel_stage import GroupedPatchEmbeddingSum, channel_blocks, fused_group_tokens
from megatron_dchag.layers.tokenizer import ChannelEmbedding, GroupedPatchTokenizer
from tests.tolerances import FLOAT32_REL, FLOAT64_REL, assert_close_scaled

PATCH, HIDDEN, IMAGE = 4, 16, (8, 12)  # 6 patch positions
# name -> (channels, groups, tree, TP size, TP rank, sharded): sharded = dchag on that rank,
# unsharded = hierarchical (every group on every rank).
LAYOUTS = {
    "tree[]-dchag": (12, 2, [], 2, 1, True),
    "tree[64]-hierarchical": (130, 1, [64], 1, 0, False),
    "tree[64,4]-hierarchical": (300, 1, [64, 4], 1, 0, False),
    "uneven-tree[3]-dchag": (30, 4, [3], 2, 1, True),  # groups 8, 8, 7, 7: rank 1 owns the two 7s
    "uneven-tree[3,2]-hierarchical": (30, 4, [3, 2], 1, 0, False),
}


def _modules(channels, groups, tree, tp, rank, sharded, dtype):
    plan = ChannelGroupPlan(channels, groups, tp, rank)
    tokenizer = GroupedPatchTokenizer(plan, sharded, PATCH, HIDDEN, seed=3)
    embedding = ChannelEmbedding(plan, sharded, HIDDEN)
    aggregation = PartialChannelAggregation(plan, sharded, tree, "linear", HIDDEN, 2, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the initial means / zeros, so every term matters
        for module in (tokenizer, embedding, aggregation):
            for p in module.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 0.1))
    return [m.to(dtype) for m in (tokenizer, embedding, aggregation)]


def _images(channels, dtype, masked):
    gen = torch.Generator().manual_seed(7)
    images = (torch.randn(2, channels, *IMAGE, generator=gen) + 1.0).to(dtype)
    index = torch.stack([torch.randperm(6, generator=gen)[:3].sort().values for _ in range(2)]) if masked else None
    return images, index


def _group_tokens_and_grads(modules, images, index, fused):
    tokenizer, embedding, aggregation = modules
    for m in modules:
        m.zero_grad(set_to_none=True)
    if fused:
        out = fused_group_tokens(tokenizer, embedding, aggregation, images, index)
    else:
        out = aggregation(tokenizer(images, index, channel_bias=embedding()))
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out.dtype)
    (out * upstream).sum().backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("masked", [False, True], ids=["all-patches", "masked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_equals_reference_outputs_and_every_gradient(layout, dtype, masked):
    channels, *rest = LAYOUTS[layout]
    modules = _modules(channels, *rest, dtype)
    images, index = _images(modules[0].num_local_channels, dtype, masked)
    out, grads = _group_tokens_and_grads(modules, images, index, fused=True)
    ref_out, ref_grads = _group_tokens_and_grads(modules, images, index, fused=False)
    rel = FLOAT64_REL if dtype == torch.float64 else FLOAT32_REL
    assert out.shape == ref_out.shape == (len(modules[0].plan.owned_group_sizes(rest[-1])), 3 if masked else 6, 2,
                                          HIDDEN)
    assert_close_scaled(out, ref_out, rel, f"{layout} group tokens")
    assert set(grads) == set(ref_grads) and len(grads) == 3 + len(rest[1]) + 1  # weight, bias, emb, levels
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, f"{layout}: zero reference gradient for {name}"
        assert_close_scaled(grads[name], g, rel, f"{layout} gradient of {name}")


def test_blocks_cover_every_channel_and_never_span_groups():
    blocks = channel_blocks([7, 6, 1], patch_elements=16, block_contraction=48)  # 3 channels a block
    assert blocks == [(0, 0, 3), (0, 3, 5), (0, 5, 7), (1, 7, 10), (1, 10, 13), (2, 13, 14)]
    assert channel_blocks([1024], 64) == [(0, i * 32, (i + 1) * 32) for i in range(32)]


@pytest.mark.parametrize("masked", [False, True], ids=["all-patches", "masked"])
def test_grouped_patch_embedding_sum_gradcheck(masked):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 7, 8, 12, dtype=torch.double, generator=gen).requires_grad_()
    weight = torch.randn(7, 5, 4, 4, dtype=torch.double, generator=gen).requires_grad_()
    w = torch.randn(7, dtype=torch.double, generator=gen).requires_grad_()
    group_bias = torch.randn(2, 5, dtype=torch.double, generator=gen).requires_grad_()
    blocks = channel_blocks([4, 3], 16, block_contraction=32)  # two channels a block, uneven groups
    index = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(2)]) if masked else None
    fn = lambda *args: GroupedPatchEmbeddingSum.apply(*args, blocks, 4, index)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (images, weight, w, group_bias))


def test_many_blocks_per_group_equal_reference(monkeypatch):
    import megatron_dchag.layers.fused_channel_stage as fused

    monkeypatch.setattr(fused, "BLOCK_CONTRACTION", 48)  # 3 channels a block: 3 blocks per group of 7
    modules = _modules(30, 4, [3], 2, 1, True, torch.float64)
    images, index = _images(14, torch.float64, masked=True)
    out, grads = _group_tokens_and_grads(modules, images, index, fused=True)
    ref_out, ref_grads = _group_tokens_and_grads(modules, images, index, fused=False)
    assert_close_scaled(out, ref_out, FLOAT64_REL, "group tokens")
    for name, g in ref_grads.items():
        assert_close_scaled(grads[name], g, FLOAT64_REL, f"gradient of {name}")


def test_impl_selection_and_validation():
    linear = ModelConfig(strategy="dchag", aggregation_layer="linear")
    assert linear.fuses_channel_stage
    assert ModelConfig(strategy="hierarchical", aggregation_layer="linear", aggregation_tree=[4]).fuses_channel_stage
    assert not ModelConfig(strategy="dchag", aggregation_layer="linear", channel_stage_impl="reference").fuses_channel_stage
    for other in (dict(aggregation_layer="cross_attention"), dict(strategy="tp_baseline"),
                  dict(strategy="dist_tokenize")):
        model = ModelConfig(**other)
        assert not model.fuses_channel_stage
        model.validate()  # auto: the reference path, no error
        model.channel_stage_impl = "fused"
        with pytest.raises(ConfigError, match="model.channel_stage_impl=fused needs a linear partial-aggregation"):
            model.validate()


def _peak_bytes(modules, images, fused):
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*modules, images)
    _group_tokens_and_grads(modules, images, None, fused)  # warm-up
    with tracker:
        tokenizer, embedding, aggregation = modules
        out = (fused_group_tokens(tokenizer, embedding, aggregation, images) if fused
               else aggregation(tokenizer(images, None, channel_bias=embedding())))
        out.square().sum().backward()
    for m in modules:
        m.zero_grad(set_to_none=True)
    return next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]


def test_fused_forward_backward_holds_no_per_channel_tokens():
    """256 channels, 64 positions x 2 samples, D=64: the reference's tokens [C, L, B, D] are 8 MiB
    (and their gradient as much again), input 2 MiB, patch embeddings 1 MiB.

    The fused forward + backward holds the input, the parameters, their gradients, the group tokens
    and the work buffers of one block of channels (its patches [L*B, K], the [D, K] product and its
    fp32 elementwise product, K = BLOCK_CONTRACTION), nothing of size [C, L, B, D]: beyond those the
    bound allows 1/16 of the token tensor. The whole peak must also be under 35% of the reference's
    (measured: 6.7 vs 23.4 MB)."""
    from megatron_dchag.layers.fused_channel_stage import BLOCK_CONTRACTION

    channels, d = 256, 64
    plan = ChannelGroupPlan(channels, 1)
    modules = [GroupedPatchTokenizer(plan, False, 4, d, seed=1), ChannelEmbedding(plan, False, d),
               PartialChannelAggregation(plan, False, [], "linear", d, 2, seed=1)]
    images = torch.randn(2, channels, 32, 32)
    fused, reference = _peak_bytes(modules, images, True), _peak_bytes(modules, images, False)
    tokens = channels * 64 * 2 * d * 4
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    floor = images.numel() * 4 + 2 * params
    positions, width = 64 * 2, BLOCK_CONTRACTION
    work = 4 * (positions * width + 2 * d * width + 2 * positions * d)
    assert fused - floor <= work + tokens / 16, (fused, floor, work, tokens)
    assert fused < 0.35 * reference, (fused, reference)


def _encoders_fused_vs_reference():
    from megatron_dchag.models.encoder import build_encoder

    results = []
    for strategy, tree in (("dchag", [3]), ("hierarchical", [3, 2])):
        base = dict(num_channels=30, channel_groups=4, image_size=(8, 16), patch_size=4, hidden_size=16,
                    num_layers=1, num_attention_heads=2, strategy=strategy, aggregation_layer="linear",
                    aggregation_tree=tree)
        images = torch.randn(2, 30, 8, 16, generator=torch.Generator().manual_seed(1))
        index = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(b))[:3] for b in range(2)])
        proj = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(2))
        runs = {}
        for impl in ("auto", "reference"):
            torch.manual_seed(0)  # megatron's layers draw their initial weights from the global generator
            model = build_encoder(ModelConfig(**base, channel_stage_impl=impl), seed=5)
            model.train()
            out = model(images, patch_index=index)
            (out * proj).sum().backward()  # not a norm of the normalised output: its gradient is ~0
            runs[impl] = dict(fused=model.channel_stage.fused, out=out.detach(),
                              grads={n: p.grad.clone() for n, p in model.named_parameters()})
        results.append((strategy, runs))
    return results


def test_encoder_fused_equals_reference():
    from tests.dist_utils import run_single

    for strategy, runs in run_single(_encoders_fused_vs_reference):
        fused, ref = runs["auto"], runs["reference"]
        assert fused["fused"] and not ref["fused"], strategy
        assert_close_scaled(fused["out"], ref["out"], FLOAT32_REL, f"{strategy} output")
        assert set(fused["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            assert_close_scaled(fused["grads"][name], g, FLOAT32_REL, f"{strategy} gradient of {name}")


def test_bf16_runs_and_accumulates_in_fp32():
    """bf16 parameters and images (the trainer's --bf16): block products accumulate in fp32. Against
    float64, outputs and gradients are off by bf16 rounding (measured <= 7e-3 of the largest
    magnitude, the same as the reference path in bf16); 2e-2 allows for that, not for a bug."""
    modules = _modules(30, 4, [3], 1, 0, False, torch.float64)
    images, index = _images(30, torch.float64, masked=True)
    ref_out, ref_grads = _group_tokens_and_grads(modules, images, index, fused=False)
    modules = [m.to(torch.bfloat16) for m in modules]
    out, grads = _group_tokens_and_grads(modules, images.to(torch.bfloat16), index, fused=True)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads.values())
    assert_close_scaled(out.double(), ref_out, 2e-2, "bf16 group tokens")
    for name, g in ref_grads.items():
        assert_close_scaled(grads[name].double(), g, 2e-2, f"bf16 gradient of {name}")

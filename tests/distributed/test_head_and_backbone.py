"""The channel-parallel head and the ViT backbone under TP.

- Each rank's head predicts only its own channels; the TP-reduced loss and the input gradient equal
  the TP=1 head with the same weights.
- The ViT layer spec is bidirectional: the first patch's output depends on the last patch.
"""

import torch

from tests.dist_utils import run_distributed
from tests.tolerances import FLOAT32_REL, assert_close_scaled


def _head_case(full_weight=None, full_bias=None):
    from megatron.core import parallel_state
    from megatron_dchag.layers.channel_plan import ChannelGroupPlan
    from megatron_dchag.layers.heads import ChannelParallelHead, reduce_loss_across_tp
    from megatron_dchag.models.full_weights import gather_full_state_dict

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    plan = ChannelGroupPlan(13, 4, tp, rank)
    head = ChannelParallelHead(plan, in_features=8, values_per_channel=4, seed=5)
    init = gather_full_state_dict(head)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 8, generator=g, requires_grad=True)
    target = torch.randn(6, 3, 13, 4, generator=g)
    pred = head(x)
    lo, hi = head.channel_range
    assert pred.shape == (6, 3, hi - lo, 4)
    loss = reduce_loss_across_tp(((pred - target[:, :, lo:hi]) ** 2).sum()) / target.numel()
    loss.backward()
    return dict(init=init, loss=loss.detach(), xgrad=x.grad, grads=gather_full_state_dict(head, grads=True),
                local_channels=hi - lo)


def test_channel_parallel_head_matches_tp1():
    ref = run_distributed(_head_case, 1)[0]
    for rank, res in enumerate(run_distributed(_head_case, 2, tensor_model_parallel_size=2)):
        assert res["local_channels"] == [7, 6][rank]  # groups 4,3,3,3 -> ranks own 7 and 6 channels
        for name, t in ref["init"].items():
            assert torch.equal(res["init"][name], t)
        # The loss is reduced across TP ranks (another summation order than one process):
        # relative to the largest value of each tensor.
        assert_close_scaled(res["loss"], ref["loss"], FLOAT32_REL, "loss")
        assert_close_scaled(res["xgrad"], ref["xgrad"], FLOAT32_REL, "input gradient")
        for name, t in ref["grads"].items():
            assert_close_scaled(res["grads"][name], t, FLOAT32_REL, f"grad {name}")


def _bidirectional():
    from megatron_dchag.config import ModelConfig
    from megatron_dchag.models.encoder import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(num_channels=4, channel_groups=2, image_size=(8, 8), patch_size=4,
                                    hidden_size=16, num_layers=1, num_attention_heads=2))
    images = torch.randn(1, 4, 8, 8)
    lo, hi = enc.input_channel_range
    base = enc(images[:, lo:hi])
    changed = images.clone()
    changed[..., 4:, 4:] += 1.0  # only the last patch
    out = enc(changed[:, lo:hi])
    return (out[0] - base[0]).abs().max().item(), (out[-1] - base[-1]).abs().max().item()


def test_vit_layer_is_bidirectional_under_tp():
    for first_change, last_change in run_distributed(_bidirectional, 2, tensor_model_parallel_size=2):
        assert last_change > 0 and first_change > 1e-6

"""The MAE loss under a validity mask (``data.nodata=mask``): missing pixels do not count.

- An all-True mask gives the loss of no mask, bit for bit (same code path numerics at TP=1).
- With one masked patch of one sample marked invalid, the loss is the MSE over the other masked
  patches (computed by hand from the unmasked run's prediction and target), and does not change
  when that patch's pixels change; without the mask it does.
- At TP=2 (each rank holds half the channels and counts its own valid pixels) the loss equals TP=1.
"""

import torch

from tests.dist_utils import run_distributed
from tests.tolerances import FLOAT32_REL, assert_close_scaled

PATCH = 4


def _model(norm_pix_loss: bool = False):
    from megatron_dchag.config import load_config, resolve_config
    from megatron_dchag.models.mae import MaskedAutoencoder

    cfg = load_config(None, ["model.num_channels=8", "model.channel_groups=2", "model.image_size=[8,8]",
                             f"model.patch_size={PATCH}", "model.hidden_size=16", "model.num_attention_heads=2",
                             "model.num_layers=1", "mae.mask_ratio=0.5", "mae.decoder_hidden_size=16",
                             "mae.decoder_num_layers=1", "mae.decoder_num_attention_heads=2",
                             f"mae.norm_pix_loss={str(norm_pix_loss).lower()}"])
    from megatron.core import parallel_state

    cfg.parallel.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    return MaskedAutoencoder(resolve_config(cfg), seed=3)


def _loss_case():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 8, 8, 8, generator=g)
    visible = torch.tensor([[0, 3], [1, 2]])
    masked = torch.tensor([[1, 2], [0, 3]])
    model = _model()
    lo, hi = model.input_channel_range
    x = images[:, lo:hi]
    # the invalid region: masked patch 2 of sample 0 (grid 2x2: rows 4..8, cols 0..4), every channel
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[0, :, 4:8, 0:4] = False
    changed = x.clone()
    changed[0, :, 4:8, 0:4] = 1e6  # only the target sees it: the patch is masked, so the encoder does not
    with torch.no_grad():
        plain = model(x, visible, masked)
        all_valid = model(x, visible, masked, torch.ones_like(valid))
        with_mask = model(x, visible, masked, valid)
        with_mask_changed = model(changed, visible, masked, valid)
        plain_changed = model(changed, visible, masked)
        norm_pix = _model(norm_pix_loss=True)
        norm_plain = norm_pix(x, visible, masked).loss
        norm_all_valid = norm_pix(x, visible, masked, torch.ones_like(valid)).loss
        norm_masked, norm_masked_changed = norm_pix(x, visible, masked, valid).loss, norm_pix(changed, visible, masked, valid).loss
    # by hand, over this rank's channels: all masked patches but (sample 0, masked position 1)
    err = (plain.prediction - plain.target) ** 2  # [B, C_local, Lm, k]
    keep = torch.ones_like(err)
    keep[0, :, 1, :] = 0.0
    return dict(plain=plain.loss, all_valid=all_valid.loss, masked=with_mask.loss,
                masked_changed=with_mask_changed.loss, plain_changed=plain_changed.loss,
                baseline=with_mask.mean_baseline_loss, local_sq=(err * keep).sum(), local_count=keep.sum(),
                local_base=(plain.target ** 2 * keep).sum(), norm_plain=norm_plain, norm_all_valid=norm_all_valid,
                norm_masked=norm_masked, norm_masked_changed=norm_masked_changed)


def test_loss_counts_only_valid_pixels_and_matches_tp1():
    (ref,) = run_distributed(_loss_case, 1)
    assert torch.equal(ref["all_valid"], ref["plain"])  # an all-True mask changes nothing
    by_hand = ref["local_sq"] / ref["local_count"]
    assert_close_scaled(ref["masked"], by_hand, FLOAT32_REL, "masked loss vs by hand")
    assert_close_scaled(ref["baseline"], ref["local_base"] / ref["local_count"], FLOAT32_REL, "baseline")
    assert not torch.isclose(ref["masked"], ref["plain"], rtol=1e-3)  # the left-out patch mattered
    assert torch.equal(ref["masked_changed"], ref["masked"])  # invalid pixels do not count
    assert ref["plain_changed"] > 1e6 * ref["plain"]  # ... which they do without the mask
    # norm_pix_loss: the per-patch mean and variance over valid pixels (another formula: close, not equal)
    assert_close_scaled(ref["norm_all_valid"], ref["norm_plain"], FLOAT32_REL, "norm_pix, all valid")
    assert torch.equal(ref["norm_masked_changed"], ref["norm_masked"])
    tp2 = run_distributed(_loss_case, 2, tensor_model_parallel_size=2)
    for rank in tp2:
        for key in ("plain", "masked", "baseline", "masked_changed"):
            assert_close_scaled(rank[key], ref[key], FLOAT32_REL, f"TP=2 {key}")
    # the ranks' valid counts add up to the one-process count
    assert sum(rank["local_count"] for rank in tp2) == ref["local_count"]

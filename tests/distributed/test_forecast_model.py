"""The forecaster's loss and channel-parallel head under TP.

- ``latitude_weighted_sq_error`` against a hand computation (weights, channel mask).
- ForecastModel at TP=2 (all outputs) and TP=4 (a subset) gives the same loss, predictions and gradients as TP=1, and the
  loss equals the latitude-weighted MSE computed by hand from the TP=1 prediction (so the TP
  reduction covers every output channel exactly once and constants are left out).
- A subset of output channels maps each output to the rank that owns its input channel
  (including ranks that predict nothing: their head holds one unused padding row per empty
  group, so no parameter or checkpoint shard has size zero).
"""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.tolerances import FLOAT32_REL, assert_close_scaled

CHANNELS = ["z_500", "z_850", "t_500", "t_850", "u_500", "v_850", "q_850", "t2m", "u10", "v10", "lsm", "orography"]


def _cfg(tp, residual, outputs=None):
    from megatron_dchag.config import ExperimentConfig, ForecastConfig, ModelConfig, ParallelConfig, DataConfig

    return ExperimentConfig(
        model=ModelConfig(num_channels=12, channel_groups=4, image_size=(8, 16), patch_size=4, hidden_size=16,
                          num_layers=1, num_attention_heads=4, lead_time_embedding=True),
        parallel=ParallelConfig(tensor_model_parallel_size=tp),
        data=DataConfig(channels=list(CHANNELS)),
        forecast=ForecastConfig(residual=residual, output_channels=outputs),
    )


def _case(residual, outputs):
    from megatron.core import parallel_state
    from megatron_dchag.models.forecast import ForecastModel
    from megatron_dchag.models.full_weights import gather_full_state_dict

    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = ForecastModel(_cfg(tp, residual, outputs), seed=3)
    n_out = len(model.channels.outputs)
    with torch.no_grad():  # a non-zero head (the residual head starts at zero), the same at every TP size
        rows, (h0, h1) = model.head_plan.num_channels, model.head_plan.owned_channel_range(sharded=True)
        full = torch.randn(rows * 16, 16, generator=torch.Generator().manual_seed(7)) * 0.1
        model.head.weight.copy_(full[h0 * 16 : h1 * 16])
    lo, hi = model.output_channel_range
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 12, 8, 16, generator=g)
    target = torch.randn(2, n_out, 8, 16, generator=g)
    lead = torch.tensor([6.0, 48.0])
    a, b = model.input_channel_range
    out = model(images[:, a:b], lead_time_hours=lead, target=target[:, lo:hi])
    out.loss.backward()
    preds = [None] * tp
    torch.distributed.all_gather_object(preds, out.prediction.detach(), group=parallel_state.get_tensor_model_parallel_group())
    return dict(loss=out.loss.detach(), prediction=torch.cat(preds, dim=1), target=target,
                grads=gather_full_state_dict(model, grads=True), outputs=list(model.output_channel_names),
                lat_weights=model.lat_weights.clone(), loss_mask=model.channels.loss_channel_mask(False),
                head_rows=model.head_plan.num_channels)


def test_latitude_weighted_sq_error_by_hand():
    from megatron_dchag.models.forecast import latitude_weighted_sq_error

    pred = torch.zeros(1, 2, 2, 3)
    target = torch.zeros(1, 2, 2, 3)
    target[0, 0, 0, :] = 1.0  # channel 0, row 0: error 1 at 3 points
    target[0, 1, 1, 0] = 2.0  # channel 1, row 1: error 4 at one point
    w = torch.tensor([0.5, 1.5])
    assert latitude_weighted_sq_error(pred, target, w).item() == pytest.approx(0.5 * 3 + 1.5 * 4)
    assert latitude_weighted_sq_error(pred, target, w, torch.tensor([1.0, 0.0])).item() == pytest.approx(1.5)


@pytest.mark.parametrize("residual, outputs", [(False, None), (True, ["u10", "z_500", "t2m"])])
def test_forecast_loss_and_grads_match_tp1(residual, outputs):
    from megatron_dchag.metrics import latitude_weights
    from megatron_dchag.models.forecast import default_latitudes

    ref = run_distributed(_case, 1, residual=residual, outputs=outputs)[0]
    # The loss is the latitude-weighted MSE over the outputs in the loss (constants excluded).
    w = torch.as_tensor(latitude_weights(default_latitudes(8), "cos"), dtype=torch.float32)
    torch.testing.assert_close(ref["lat_weights"], w)
    mask = torch.as_tensor(ref["loss_mask"])
    err = ((ref["prediction"] - ref["target"]) ** 2 * w[:, None])[:, mask]
    # The model's reduction vs this explicit mean (another order): FLOAT32_REL of the loss.
    assert_close_scaled(ref["loss"], err.mean(), FLOAT32_REL, "loss vs explicit weighted MSE")
    if outputs is None:
        assert ref["loss_mask"].sum() == 10  # lsm and orography are not in the loss
    else:
        assert ref["outputs"] == ["z_500", "t2m", "u10"]  # put in input order
    tp = 2 if outputs is None else 4
    results = run_distributed(_case, tp, tensor_model_parallel_size=tp, residual=residual, outputs=outputs)
    if outputs is not None:  # groups [z_500 z_850 t_500] [t_850 u_500 v_850] [q_850 t2m u10] [v10 lsm orography]
        assert [r["outputs"] for r in results] == [["z_500"], [], ["t2m", "u10"], []]
        assert ref["head_rows"] == 5  # 1 + 0 + 2 + 0 outputs, empty groups padded to one row
    for res in results:
        # TP ranks sum partial products in another order than one process: relative to the
        # largest value of each tensor (loss, prediction, each parameter's gradient).
        assert_close_scaled(res["loss"], ref["loss"], FLOAT32_REL, "loss")
        assert_close_scaled(res["prediction"], ref["prediction"], FLOAT32_REL, "prediction")
        assert res["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            assert_close_scaled(res["grads"][name], grad, FLOAT32_REL, f"grad {name}")
    assert any(g.abs().sum() > 0 for n, g in ref["grads"].items() if "tokenizer" in n)

"""The forecaster's optional time-of-day / day-of-year inputs (``forecast.time_features``).

- :func:`time_features` against hand values (local solar time by longitude, day of year).
- Off (the default) the model has exactly the parameters it had before, so older checkpoints
  load; on, one more (``time_embedding.weight``), zero at the start, so the untrained model is the
  model without time features.
- With a non-zero embedding the prediction depends on the input time, and TP=2 gives the same
  predictions and time-embedding gradient as TP=1 (the embedding is replicated across TP, and
  each rank's gradient of it is the full one, as for the position embedding).
"""

import math

import torch

from tests.dist_utils import run_distributed
from tests.tolerances import assert_close_scaled

CHANNELS = ["z_500", "t_850", "t2m", "u10", "lsm", "orography"]


def test_time_features_by_hand():
    from megatron_dchag.models.forecast import time_features

    t = torch.tensor([0, 6 * 3600 + 86400 * 365])  # 1970-01-01T00, 1971-01-01T06 (365 days on)
    lons = torch.tensor([0.0, 90.0, 180.0])
    f = time_features(t, lons, num_patch_rows=2)
    assert f.shape == (6, 2, 4)
    assert torch.equal(f[:3], f[3:])  # the same in every patch row
    # local solar time at 00 UTC: 0 h at 0°E, 6 h at 90°E, 12 h at 180°E
    torch.testing.assert_close(f[:3, 0, :2].double(), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    # 06 UTC at 0°E: a quarter of the day
    torch.testing.assert_close(f[0, 1, :2].double(), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    season = 2 * math.pi * ((365 + 0.25) % 365.2425) / 365.2425
    torch.testing.assert_close(f[0, 1, 2:].double(), torch.tensor([math.sin(season), math.cos(season)], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    assert torch.equal(f[0, 0, 2:], torch.tensor([0.0, 1.0], dtype=f.dtype))


def _cfg(tp, time_features):
    from megatron_dchag.config import DataConfig, ExperimentConfig, ForecastConfig, ModelConfig, ParallelConfig

    return ExperimentConfig(
        model=ModelConfig(num_channels=6, channel_groups=2, image_size=(8, 16), patch_size=4, hidden_size=16,
                          num_layers=1, num_attention_heads=4, lead_time_embedding=True),
        parallel=ParallelConfig(tensor_model_parallel_size=tp),
        data=DataConfig(channels=list(CHANNELS)),
        forecast=ForecastConfig(time_features=time_features),
    )


def _case():
    from megatron.core import parallel_state
    from megatron_dchag.models.forecast import ForecastModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    plain, timed = ForecastModel(_cfg(tp, False), seed=3), ForecastModel(_cfg(tp, True), seed=3)
    added = sorted(set(timed.state_dict()) - set(plain.state_dict()))
    assert set(plain.state_dict()) <= set(timed.state_dict())
    sharded_added = sorted(set(timed.sharded_state_dict()) - set(plain.sharded_state_dict()))
    missing = timed.load_state_dict(plain.state_dict(), strict=False).missing_keys  # the same weights otherwise
    assert missing == ["time_embedding.weight"], missing
    g = torch.Generator().manual_seed(1)
    images, lead = torch.randn(2, 6, 8, 16, generator=g), torch.tensor([6.0, 6.0])
    a, b = timed.input_channel_range
    with torch.no_grad():  # a non-zero head, the same at every TP size
        full = torch.randn(6 * 16, 16, generator=torch.Generator().manual_seed(7)) * 0.1
        h0, h1 = timed.head_plan.owned_channel_range(sharded=True)
        for m in (plain, timed):
            m.head.weight.copy_(full[h0 * 16:h1 * 16])
    noon, night = torch.tensor([12 * 3600, 12 * 3600]), torch.tensor([0, 0])
    same_at_start = torch.equal(plain(images[:, a:b], lead_time_hours=lead).prediction,
                                timed(images[:, a:b], lead_time_hours=lead, input_time_s=noon).prediction)
    with torch.no_grad():
        timed.time_embedding.weight.copy_(torch.randn(16, 4, generator=torch.Generator().manual_seed(5)))
    at_noon = timed(images[:, a:b], lead_time_hours=lead, input_time_s=noon).prediction
    at_night = timed(images[:, a:b], lead_time_hours=lead, input_time_s=night)
    at_night.prediction.square().sum().backward()
    preds = [None] * tp
    torch.distributed.all_gather_object(preds, at_night.prediction.detach(),
                                        group=parallel_state.get_tensor_model_parallel_group())
    grad = timed.time_embedding.weight.grad.clone()
    return dict(added=added, sharded_added=sharded_added, same_at_start=same_at_start,
                time_matters=not torch.allclose(at_noon, at_night.prediction.detach()),
                prediction=torch.cat(preds, dim=1), grad=grad)


def test_time_features_are_optional_and_tp_invariant():
    ref = run_distributed(_case, 1)[0]
    assert ref["added"] == ["time_embedding.weight"] and ref["sharded_added"] == ["time_embedding.weight"]
    assert ref["same_at_start"] and ref["time_matters"]
    for result in run_distributed(_case, 2, tensor_model_parallel_size=2):
        assert result["added"] == ["time_embedding.weight"] and result["same_at_start"] and result["time_matters"]
        assert_close_scaled(result["prediction"], ref["prediction"], what="TP=2 prediction")
        # the encoder's all-gather sums the ranks' gradients on the way back: each rank holds the full one
        assert_close_scaled(result["grad"], ref["grad"], what="time-embedding gradient")

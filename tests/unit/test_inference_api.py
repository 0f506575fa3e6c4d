"""The normalization record and the inference API on ERA5 forecasts.

- A record read from either workload's statistics file (``.json``/``.npz`` cubes, ``.npz`` ERA5)
  survives JSON bit for bit and normalizes exactly as the datasets do.
- :meth:`PretrainedModel.forecast` of a tiny forecaster: with its head at zero (the residual model
  is persistence) it returns the raw state it was given, so normalizing and denormalizing are
  exact inverses per channel; with a random head, TP=2 (two ranks predicting their own outputs,
  gathered) equals TP=1 and matches the model run by hand on the dataset's normalization.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.dist_utils import run_distributed, run_single
from tests.tolerances import assert_close_scaled

CHANNELS = ["z_500", "t_850", "u10", "t2m"]


def _hyperspectral_stats():
    from megatron_dchag.data.hyperspectral.statistics import RunningChannelMoments

    moments = RunningChannelMoments(5)
    moments.update(np.random.default_rng(1).random((5, 7, 3)) * [[[1.0]], [[10.0]], [[1e3]], [[1e-3]], [[3.0]]])
    return moments.finalize()


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_hyperspectral_record_round_trips_and_normalizes_as_the_dataset(tmp_path, suffix):
    from megatron_dchag.data.hyperspectral.statistics import save_channel_stats
    from megatron_dchag.data.normalization import Normalization, normalization_from_stats_file

    stats = _hyperspectral_stats()
    path = tmp_path / f"stats{suffix}"
    save_channel_stats(stats, path)
    record = normalization_from_stats_file(str(path))
    assert record.kind == "hyperspectral" and record.source == path.name and len(record.sha256) == 64
    again = Normalization.from_json(record.to_json(), "test")
    assert again.mean.tobytes() == stats.mean.tobytes() and again.std.tobytes() == stats.std.tobytes()
    for ours, theirs in zip(again.hyperspectral_affine(1, 4), stats.normalization(1, 4)):
        assert ours.tobytes() == theirs.tobytes()


def _era5_stats_file(root) -> str:
    from megatron_dchag.data.era5.statistics import ERA5Stats, save_era5_stats

    path = os.path.join(root, "era5_stats.npz")
    save_era5_stats(path, ERA5Stats(channels=CHANNELS + ["lsm"], mean=np.array([5.4e4, 270.0, 1.5, 285.0, 0.3]),
                                    std=np.array([3.1e3, 12.0, 5.5, 15.0, 0.0]),
                                    climatology=np.zeros((5, 8, 16))))
    return path


def test_era5_record_is_told_apart_and_selects_by_name(tmp_path):
    from megatron_dchag.data.normalization import Normalization, normalization_from_stats_file

    record = Normalization.from_json(normalization_from_stats_file(_era5_stats_file(tmp_path)).to_json(), "test")
    assert record.kind == "era5" and record.channels == tuple(CHANNELS + ["lsm"])
    mean, std = record.era5_affine(["t2m", "lsm", "z_500"])
    assert mean[:, 0, 0].tolist() == [285.0, np.float32(0.3), 5.4e4] and std[:, 0, 0].tolist() == [15.0, 1.0, 3.1e3]
    with pytest.raises(ValueError, match="no channels"):
        record.era5_affine(["q_700"])


def _save_forecaster(root: str, random_head: bool) -> str:
    import torch

    from megatron_dchag.config import ExperimentConfig, build_dataclass, config_to_dict, resolve_config
    from megatron_dchag.data.normalization import normalization_from_stats_file
    from megatron_dchag.tasks.forecasting import ERA5ForecastTask
    from megatron_dchag.training.checkpointing import TrainingState, save_checkpoint

    stats = _era5_stats_file(root)
    cfg = resolve_config(build_dataclass(ExperimentConfig, {
        "model": dict(num_channels=4, channel_groups=2, image_size=[8, 16], patch_size=4, hidden_size=16, num_layers=1,
                      num_attention_heads=2, lead_time_embedding=True),
        "forecast": dict(metric_variables=["z_500", "t2m"]), "parallel": dict(tensor_model_parallel_size=1),
        "data": dict(channels=CHANNELS, stats_file=stats)}))
    model = ERA5ForecastTask(cfg).build_model()
    if random_head:
        with torch.no_grad():
            model.head.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    run = os.path.join(root, "head" if random_head else "persistence")
    state = TrainingState(iteration=1, layout=dict(tp=1, pp=1, dp=1), task=ERA5ForecastTask.name, has_optimizer=False)
    save_checkpoint(run, 1, [model], state=state, config_dict=config_to_dict(cfg),
                    normalization=normalization_from_stats_file(stats).to_json())
    return run


def _raw_state(batch: int = 2):
    rng = np.random.default_rng(7)
    mean, std = np.array([5.4e4, 270.0, 1.5, 285.0]), np.array([3.1e3, 12.0, 5.5, 15.0])
    return (mean[None, :, None, None] + std[None, :, None, None] * rng.standard_normal((batch, 4, 8, 16))).astype(np.float32)


def _forecast(run: str, lead: float):
    import torch

    from megatron_dchag.inference import load_pretrained

    model = load_pretrained(run)
    raw = _raw_state()
    by_hand = None
    if model.config.parallel.tensor_model_parallel_size == 1:
        mean, std = model.normalization.era5_affine(CHANNELS)
        x = (torch.from_numpy(raw) - torch.from_numpy(mean)) / torch.from_numpy(std)
        with torch.no_grad():
            pred = model.model(x, lead_time_hours=torch.full((2,), lead)).prediction
        by_hand = pred.double() * torch.from_numpy(std).double() + torch.from_numpy(mean).double()
    return dict(forecast=model.forecast(raw, lead_hours=lead), by_hand=by_hand, names=model.output_channel_names,
                tokens=tuple(model.tokens(raw, lead_hours=lead).shape))


def test_forecast_of_a_persistence_model_returns_its_input(tmp_path):
    run = run_single(_save_forecaster, str(tmp_path), False)
    out = run_single(_forecast, run, 24.0)
    assert out["names"] == CHANNELS and out["tokens"] == (2, 8, 16)
    assert_close_scaled(out["forecast"], _raw_state(), what="persistence forecast vs the raw state")


def test_forecast_at_tp2_equals_tp1_and_the_model_by_hand(tmp_path):
    run = run_single(_save_forecaster, str(tmp_path), True)
    one = run_single(_forecast, run, 48.0)
    assert_close_scaled(one["forecast"], one["by_hand"].float(), what="API forecast vs by hand")
    assert not np.allclose(one["forecast"].numpy(), _raw_state(), rtol=1e-3)  # the head does something
    for rank in run_distributed(_forecast, 2, run, 48.0, tensor_model_parallel_size=2):
        assert_close_scaled(rank["forecast"], one["forecast"], what="TP=2 forecast vs TP=1")

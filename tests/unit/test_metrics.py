"""Latitude-weighted metrics against hand-computed values (megatron_dchag.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_dchag.metrics import (
    ForecastMetrics,
    climatology_rmse,
    latitude_weights,
    persistence_rmse,
    weighted_acc,
    weighted_mse,
    weighted_rmse,
)


def test_cos_weights_hand_values():
    w = latitude_weights(np.array([-45.0, 0.0, 45.0]), kind="cos")
    c = math.cos(math.radians(45.0))
    mean = (2 * c + 1) / 3
    # float64 throughout: 1e-12 is ~4,500 eps
    np.testing.assert_allclose(w, [c / mean, 1 / mean, c / mean], rtol=1e-12)
    assert w.mean() == pytest.approx(1.0)


def test_area_weights_hand_values():
    # Cells [-90,-30], [-30,30], [30,90]: areas 0.5, 1, 0.5 (x 2*pi R^2) -> normalized 0.75, 1.5, 0.75.
    np.testing.assert_allclose(latitude_weights(np.array([-60.0, 0.0, 60.0]), kind="area"), [0.75, 1.5, 0.75], rtol=1e-12)
    # Grids that include the poles: pole rows get a small positive weight (cos would give 0).
    w = latitude_weights(np.array([90.0, 0.0, -90.0]), kind="area")  # descending order is fine
    s = math.sin(math.radians(45.0))
    areas = np.array([1 - s, 2 * s, 1 - s])
    np.testing.assert_allclose(w, areas / areas.mean(), rtol=1e-12)
    assert latitude_weights(np.array([90.0, 0.0, -90.0]), kind="cos")[0] == pytest.approx(0.0, abs=1e-12)


def test_weights_accept_torch_and_reject_bad_kind():
    w = latitude_weights(torch.tensor([-45.0, 45.0], dtype=torch.float64))
    assert isinstance(w, torch.Tensor) and torch.allclose(w, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="cos' or 'area"):
        latitude_weights(np.array([0.0]), kind="gaussian")


def test_mse_rmse_hand_values():
    lats = np.array([0.0, 60.0])  # cos weights [1, 0.5] -> normalized [4/3, 2/3]
    w = latitude_weights(lats)
    target = np.zeros((2, 1, 2, 2))
    pred = np.zeros((2, 1, 2, 2))
    pred[0, 0] = [[1.0, 1.0], [3.0, 3.0]]  # sample 0; sample 1 is perfect
    mse0 = (4 / 3 * 1 * 2 + 2 / 3 * 9 * 2) / 4  # = 11/3
    np.testing.assert_allclose(weighted_mse(pred, target, w, reduction="none"), [[mse0], [0.0]])
    np.testing.assert_allclose(weighted_mse(pred, target, w), [mse0 / 2])
    # RMSE: square root per sample, then the mean over samples (ClimaX convention).
    np.testing.assert_allclose(weighted_rmse(pred, target, w), [math.sqrt(mse0) / 2])
    # torch in -> torch out, same numbers
    r = weighted_rmse(torch.tensor(pred), torch.tensor(target), torch.tensor(w))
    assert isinstance(r, torch.Tensor) and r.item() == pytest.approx(math.sqrt(mse0) / 2)


def test_acc_hand_values():
    clim = np.zeros((2, 2))
    pred = np.array([[1.0, 2.0], [3.0, 4.0]])
    target = np.array([[2.0, 1.0], [4.0, 3.0]])
    # Uniform weights. Centered: anomalies minus their mean -> correlation 0.75 / 1.25.
    assert weighted_acc(pred, target, clim, None) == pytest.approx(0.6)
    # Uncentered (WeatherBench 2): 7 / sqrt(7.5 * 7.5).
    assert weighted_acc(pred, target, clim, None, centered=False) == pytest.approx(7 / 7.5)
    # Latitude weights [4/3, 2/3]: sum(w f o) / sqrt(sum(w f^2) sum(w o^2)) = (64/3) / (70/3).
    w = latitude_weights(np.array([0.0, 60.0]))
    assert weighted_acc(pred, target, clim, w, centered=False) == pytest.approx(64 / 70)


def test_perfect_and_climatology_forecasts():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 2, 8, 16, generator=g, dtype=torch.float64)
    clim = torch.randn(2, 8, 16, generator=g, dtype=torch.float64)
    w = latitude_weights(torch.linspace(-80, 80, 8, dtype=torch.float64))
    assert torch.all(weighted_rmse(target, target, w) == 0)
    torch.testing.assert_close(weighted_acc(target, target, clim, w), torch.ones(2, dtype=torch.float64))
    for centered in (True, False):
        acc = weighted_acc(clim.expand_as(target), target, clim, w, centered=centered)
        torch.testing.assert_close(acc, torch.zeros(2, dtype=torch.float64))
    # An anti-correlated forecast has ACC -1.
    torch.testing.assert_close(weighted_acc(2 * clim - target, target, clim, w), -torch.ones(2, dtype=torch.float64))


def test_reference_rmses_and_accumulator():
    g = torch.Generator().manual_seed(1)
    lats = torch.linspace(-60, 60, 4, dtype=torch.float64)
    w = latitude_weights(lats)
    initial = torch.randn(4, 3, 4, 8, generator=g, dtype=torch.float64)
    target = initial + 0.1 * torch.randn(4, 3, 4, 8, generator=g, dtype=torch.float64)
    pred = target + 0.05 * torch.randn(4, 3, 4, 8, generator=g, dtype=torch.float64)
    clim = torch.zeros(3, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(persistence_rmse(initial, target, w), weighted_rmse(initial, target, w))
    torch.testing.assert_close(climatology_rmse(clim, target, w), weighted_rmse(torch.zeros_like(target), target, w))

    metrics = ForecastMetrics(["z_500", "t_850", "t2m"], [6, 24], w)
    metrics.update(pred[:2], target[:2], 6, climatology=clim, initial_state=initial[:2])
    metrics.update(pred[2:], target[2:], torch.tensor([24.0, 24.0]), climatology=clim, initial_state=initial[2:])
    out = metrics.compute()
    assert set(out) == {6, 24}
    rmse6 = weighted_rmse(pred[:2], target[:2], w)
    assert out[6]["t_850"]["rmse"] == pytest.approx(rmse6[1].item())
    assert out[6]["t_850"]["mse"] == pytest.approx(weighted_mse(pred[:2], target[:2], w)[1].item())
    assert out[24]["z_500"]["persistence_rmse"] == pytest.approx(persistence_rmse(initial[2:], target[2:], w)[0].item())
    assert out[24]["z_500"]["acc"] == pytest.approx(weighted_acc(pred[2:], target[2:], clim, w)[0].item())
    assert out[6]["t2m"]["num_samples"] == 2
    assert "rmse/t2m/24h" in metrics.flat()
    with pytest.raises(ValueError, match="declared evaluation leads"):
        metrics.update(pred[:1], target[:1], 12)

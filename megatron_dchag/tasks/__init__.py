"""Workloads plugged into the shared trainer: MAE pretraining of hyperspectral cubes, ERA5 forecasting."""

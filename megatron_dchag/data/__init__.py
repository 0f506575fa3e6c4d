"""Data for both workloads: one package per domain, and the plumbing they share.

* :mod:`~megatron_dchag.data.hyperspectral`: cube files (formats, statistics, discovery) and the
  MAE pretraining dataset;
* :mod:`~megatron_dchag.data.era5`: ERA5 naming, stores, statistics, lead times and the
  forecasting dataset;
* :mod:`~megatron_dchag.data.sampler`: the resumable data-parallel sample order of both workloads;
* :mod:`~megatron_dchag.data.loader`: micro-batches built from a plan, inline or in worker
  processes.
"""

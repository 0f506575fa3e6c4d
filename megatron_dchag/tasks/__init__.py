"""Workloads: the :class:`~megatron_dchag.tasks.base.Task` contract (``base``), MAE pretraining of
hyperspectral cubes (``mae_pretraining``), ERA5 forecasting (``forecasting``), the benchmark's encoder
on synthetic inputs (``benchmark``) and the lookup of a task by the name its checkpoints record
(``registry``)."""

"""Hyperspectral cube data, from files on disk to one tensor-parallel rank's normalized crops.

* :mod:`~megatron_dchag.data.hyperspectral.formats`: the on-disk contract (HDF5, ENVI), readers
  that read only a channel slice and window, writers, and the error types;
* :mod:`~megatron_dchag.data.hyperspectral.statistics`: per-channel mean/std, streamed, saved and
  loaded;
* :mod:`~megatron_dchag.data.hyperspectral.discovery`: the cube files of a collection, their
  train/val split and the metadata scan that validates them;
* :mod:`~megatron_dchag.data.hyperspectral.dataset`: :class:`HyperspectralDataset`, seeded crops of
  a rank's channel range.

Import the names from their modules (one place for each).
"""

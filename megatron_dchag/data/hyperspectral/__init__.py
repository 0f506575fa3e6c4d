"""Hyperspectral cube data, from files on disk to one tensor-parallel rank's normalized crops.

* :mod:`~megatron_dchag.data.hyperspectral.formats`: the on-disk contract (HDF5, ENVI; no-data
  values and reflectance scale factors), readers that read only a channel slice and window,
  writers, and the error types;
* :mod:`~megatron_dchag.data.hyperspectral.discovery`: the cube files of a collection and the
  metadata scan that validates them;
* :mod:`~megatron_dchag.data.hyperspectral.splits`: the train / validation / test split by file
  (named lists, globs and folders, or a hash of each cube's stem);
* :mod:`~megatron_dchag.data.hyperspectral.statistics`: per-channel mean/std and missing-value
  counts, streamed, saved with the cubes they cover, and loaded;
* :mod:`~megatron_dchag.data.hyperspectral.nodata`: the no-data policy (error, fill, mask);
* :mod:`~megatron_dchag.data.hyperspectral.dataset`: :class:`HyperspectralDataset`, seeded crops of
  a rank's channel range.

Import the names from their modules (one place for each).
"""

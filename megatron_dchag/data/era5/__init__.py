"""ERA5 forecasting data, from zarr/netCDF stores to one rank's normalized forecasting pairs.

* :mod:`~megatron_dchag.data.era5.naming`: the canonical variables and every name they are found
  under (short, long, CF), channel names and their parsing, grids (no xarray);
* :mod:`~megatron_dchag.data.era5.canonical`: the canonical view of one opened file (variables
  recognised by name or CF attributes, with a record of how; axes, time decoding, ensemble
  members, longitudes);
* :mod:`~megatron_dchag.data.era5.store`: opening stores as one lazy dataset, reading channels,
  :class:`~megatron_dchag.data.era5.store.ERA5DataError`;
* :mod:`~megatron_dchag.data.era5.zarr_io`: zarr formats 2 and 3 and the encodings written;
* :mod:`~megatron_dchag.data.era5.splits`: the train/validation split of the time axis;
* :mod:`~megatron_dchag.data.era5.statistics`: normalization statistics and climatology files;
* :mod:`~megatron_dchag.data.era5.leads`: training lead times (numpy only);
* :mod:`~megatron_dchag.data.era5.dataset`: :class:`~megatron_dchag.data.era5.dataset.ERA5Dataset`.

Import the names from their modules (one place for each). This file imports nothing, so
``megatron_dchag.data.era5.leads``, ``naming`` and ``splits`` stay cheap to import (no xarray).
"""

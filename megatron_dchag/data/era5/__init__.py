"""ERA5 forecasting data, from zarr/netCDF stores to one rank's normalized forecasting pairs.

* :mod:`~megatron_dchag.data.era5.naming`: the canonical variables, channel names and their
  parsing, the canonical view of every naming convention, grids;
* :mod:`~megatron_dchag.data.era5.store`: opening stores as one lazy dataset, reading channels,
  :class:`~megatron_dchag.data.era5.store.ERA5DataError`;
* :mod:`~megatron_dchag.data.era5.statistics`: normalization statistics and climatology files;
* :mod:`~megatron_dchag.data.era5.leads`: training lead times (numpy only);
* :mod:`~megatron_dchag.data.era5.dataset`: :class:`~megatron_dchag.data.era5.dataset.ERA5Dataset`.

Import the names from their modules (one place for each). This file imports nothing, so
``megatron_dchag.data.era5.leads`` stays cheap to import (no xarray).
"""

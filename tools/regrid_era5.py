#!/usr/bin/env python
"""Regrid ERA5 data (0.25°, 721×1440, or any regular lat/lon grid) to a coarser grid, as zarr.

Thin wrapper around :mod:`megatron_dchag.cli.regrid_era5`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-regrid-era5``.
"""

import sys

from megatron_dchag.cli.regrid_era5 import main

if __name__ == "__main__":
    sys.exit(main())

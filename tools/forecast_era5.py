#!/usr/bin/env python
"""Write ERA5 forecasts of a checkpoint as WeatherBench 2 files (zarr or netCDF), with rollouts.

Thin wrapper around :mod:`megatron_dchag.cli.forecast_era5`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-forecast-era5``.
"""

import sys

from megatron_dchag.cli.forecast_era5 import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Per-channel normalization statistics and climatology of ERA5 data, streamed over time.

Thin wrapper around :mod:`megatron_dchag.cli.compute_era5_stats`, which holds the logic and the
flags (``--help``); the same tool is installed as the console script ``dchag-compute-era5-stats``.
"""

import sys

from megatron_dchag.cli.compute_era5_stats import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Write an ERA5-shaped synthetic dataset with physically plausible, predictable dynamics.

Thin wrapper around :mod:`megatron_dchag.cli.make_synthetic_era5`, which holds the logic and the
flags (``--help``); the same tool is installed as the console script ``dchag-make-synthetic-era5``.
"""

import sys

from megatron_dchag.cli.make_synthetic_era5 import main

if __name__ == "__main__":
    sys.exit(main())

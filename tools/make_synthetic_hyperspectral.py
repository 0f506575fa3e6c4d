#!/usr/bin/env python
"""Write synthetic hyperspectral cubes in the project's HDF5 contract (and optionally as ENVI).

Thin wrapper around :mod:`megatron_dchag.cli.make_synthetic_hyperspectral`, which holds the logic
and the flags (``--help``); the same tool is installed as the console script
``dchag-make-synthetic-hyperspectral``.
"""

import sys

from megatron_dchag.cli.make_synthetic_hyperspectral import main

if __name__ == "__main__":
    sys.exit(main())

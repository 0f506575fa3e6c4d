#!/usr/bin/env python
"""Per-channel mean / std of a hyperspectral cube collection, computed by streaming.

Thin wrapper around :mod:`megatron_dchag.cli.compute_stats`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-compute-stats``.
"""

import sys

from megatron_dchag.cli.compute_stats import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""`make demo`: synthetic hyperspectral cubes -> D-CHAG MAE pretraining at TP=2 -> evaluation -> plot.

Thin wrapper around :mod:`megatron_dchag.cli.demo`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-demo``.
"""

import sys

from megatron_dchag.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Plot forecasts from a checkpoint: truth, prediction and error maps per variable and lead time.

Thin wrapper around :mod:`megatron_dchag.cli.plot_forecast`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-plot-forecast``.
"""

import sys

from megatron_dchag.cli.plot_forecast import main

if __name__ == "__main__":
    sys.exit(main())

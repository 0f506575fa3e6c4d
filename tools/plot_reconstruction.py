#!/usr/bin/env python
"""Plot an MAE reconstruction from a checkpoint: original, masked and reconstructed images and a spectrum.

Thin wrapper around :mod:`megatron_dchag.cli.plot_reconstruction`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-plot-reconstruction``.
"""

import sys

from megatron_dchag.cli.plot_reconstruction import main

if __name__ == "__main__":
    sys.exit(main())

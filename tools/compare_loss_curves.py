#!/usr/bin/env python
"""Train the same MAE three ways on the same data and steps, and plot the loss curves.

Thin wrapper around :mod:`megatron_dchag.cli.compare_loss_curves`, which holds the logic and the
flags (``--help``); the same tool is installed as the console script ``dchag-compare-loss-curves``.
"""

import sys

from megatron_dchag.cli.compare_loss_curves import main

if __name__ == "__main__":
    sys.exit(main())

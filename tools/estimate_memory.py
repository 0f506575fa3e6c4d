#!/usr/bin/env python
"""Per-rank memory estimate of D-CHAG training (the model is :mod:`megatron_dchag.memory_model`).

Thin wrapper around :mod:`megatron_dchag.cli.estimate_memory`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-estimate-memory``.
"""

import sys

from megatron_dchag.cli.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())

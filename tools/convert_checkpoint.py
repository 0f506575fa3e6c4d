#!/usr/bin/env python
"""Reshard, export, import and inspect megatron_dchag checkpoints (both workloads, detected from the checkpoint).

Thin wrapper around :mod:`megatron_dchag.cli.convert_checkpoint`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-convert-checkpoint``.
"""

import sys

from megatron_dchag.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())

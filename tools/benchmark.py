#!/usr/bin/env python
"""Benchmark the channel-stage strategies side by side: per-rank peak memory and step time.

Thin wrapper around :mod:`megatron_dchag.cli.benchmark`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-benchmark``.
"""

import sys

from megatron_dchag.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

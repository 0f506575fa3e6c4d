#!/usr/bin/env python
"""GPU check kit (``make gpu-check``): GPU = CPU checks, bf16 training, TE spec, nccl, benchmarks, report.

Thin wrapper around :mod:`megatron_dchag.cli.gpu_check`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-gpu-check``.
"""

import sys

from megatron_dchag.cli.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())

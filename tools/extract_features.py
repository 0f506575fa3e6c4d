#!/usr/bin/env python
"""Embed every cube of a directory with a pretrained model, into one HDF5 file.

Thin wrapper around :mod:`megatron_dchag.cli.extract_features`, which holds the logic and the flags
(``--help``); the same tool is installed as the console script ``dchag-extract-features``.
"""

import sys

from megatron_dchag.cli.extract_features import main

if __name__ == "__main__":
    sys.exit(main())

"""Command-line tools: one module per command, each holding its logic and ``main(argv=None) -> int``.

Each is installed as a ``dchag-*`` console script (see ``setup.py``); ``tools/<name>.py`` and the
root ``pretrain_hyperspectral.py`` / ``pretrain_era5.py`` are thin wrappers around the same
``main``, so ``python tools/<name>.py ...`` and ``torchrun ... pretrain_*.py ...`` keep working.
Tests import these modules normally (``from megatron_dchag.cli import compute_stats``).

This package is the top layer: it may import any other part of ``megatron_dchag``; nothing else in
the package imports it. Submodules are not imported here, so one tool's ``--help`` does not pay for
another tool's imports.
"""

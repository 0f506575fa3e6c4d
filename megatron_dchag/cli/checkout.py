"""The source checkout that the workflow tools (``demo``, ``compare_loss_curves``) run scripts in.

Those tools start the repository's scripts (``pretrain_hyperspectral.py``, ``tools/*.py``) as
subprocesses with the checkout as working directory and read its ``configs/``; they therefore need
the package installed editable from a checkout (``make install`` or ``pip install -e .``), which
puts this module at ``<checkout>/megatron_dchag/cli/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict

CHECKOUT_ROOT = Path(__file__).resolve().parents[2]
_MARKER = "pretrain_hyperspectral.py"


def require_checkout(tool: str) -> bool:
    """True if :data:`CHECKOUT_ROOT` is a source checkout; else print ``<tool>: error: ...`` and return False."""
    if (CHECKOUT_ROOT / _MARKER).is_file():
        return True
    print(f"{tool}: error: {CHECKOUT_ROOT} is not a source checkout (no {_MARKER}); "
          f"install the package editable from a checkout: pip install -e .", file=sys.stderr)
    return False


def script_environment() -> Dict[str, str]:
    """Environment of the scripts these tools run: warnings off, one OpenMP thread unless set."""
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

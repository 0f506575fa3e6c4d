"""Forecast lead times: the leads training draws from and the lead of each training step.

Training draws **one lead Δ per micro-batch step**: :func:`sample_lead_hours` is a pure function
of ``(seed, step)``, so every rank computes the same value without communication (TP ranks
agree, DP ranks agree on Δ) and a run resumed at a step replays exactly. Plain numpy: the
samplers use it without importing the store's xarray stack.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np

__all__ = ["train_lead_hours", "sample_lead_hours"]


def train_lead_hours(max_lead_hours: int, lead_step_hours: int = 6, min_lead_hours: Optional[int] = None) -> List[int]:
    """The lead times training draws from: ``min, min + step, ..., max`` (``min`` defaults to ``step``)."""
    lo = lead_step_hours if min_lead_hours is None else min_lead_hours
    if lead_step_hours <= 0 or lo <= 0 or max_lead_hours < lo:
        raise ValueError(
            f"lead times: need 0 < min_lead_hours ({lo}) <= max_lead_hours ({max_lead_hours}) and lead_step_hours > 0 ({lead_step_hours})"
        )
    if (max_lead_hours - lo) % lead_step_hours:
        raise ValueError(f"max_lead_hours={max_lead_hours} is not min_lead_hours={lo} plus a multiple of lead_step_hours={lead_step_hours}")
    return list(range(lo, max_lead_hours + 1, lead_step_hours))


def sample_lead_hours(
    seed: int, step: int, max_lead_hours: int, lead_step_hours: int = 6, min_lead_hours: Optional[int] = None
) -> int:
    """The lead time (hours) of training batch ``step``: uniform over :func:`train_lead_hours`.

    A pure function of ``(seed, step)``: every rank computes the same value without
    communication, and a resumed run continues with exactly the same sequence.
    """
    choices = train_lead_hours(max_lead_hours, lead_step_hours, min_lead_hours)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 0x1EAD]))
    return int(choices[int(rng.integers(len(choices)))])

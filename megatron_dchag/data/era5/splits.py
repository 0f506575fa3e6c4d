"""The train/validation split of an ERA5 time axis: the one rule the dataset, the statistics tool
and the run's checks share.

The validation split is the last ``val_fraction`` of the time steps of the window, the train split
the first ``1 - val_fraction`` (rounded to whole steps). Statistics and climatology computed over
the train split therefore never see a validation time. Plain numpy.
"""

from __future__ import annotations

from typing import Tuple

__all__ = ["SPLITS", "split_window"]

SPLITS = ("train", "val", "all")


def split_window(lo: int, hi: int, split: str, val_fraction: float) -> Tuple[int, int]:
    """The time indices ``[lo', hi')`` of ``split`` within the window ``[lo, hi)``."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if split == "all":
        return lo, hi
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_train = int(round((hi - lo) * (1.0 - val_fraction)))
    return (lo, lo + n_train) if split == "train" else (lo + n_train, hi)

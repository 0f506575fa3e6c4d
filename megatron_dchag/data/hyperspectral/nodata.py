"""Missing values in cubes and what a run does with them: the no-data policy (``data.nodata``).

A value is *missing* when it is NaN or +-inf as read: stored that way in a float cube, or equal
to the file's declared no-data value (an HDF5 fill-value attribute, ENVI's ``data ignore
value``), which the readers return as NaN. The policies (:data:`NODATA_POLICIES`):

* ``error`` (the default): a cube with missing values stops the run with one :class:`NoDataError`
  line naming the file, the channel and how many of that channel's values are missing. Before
  training when the statistics file records the cube (``dchag-compute-stats`` counts them,
  :func:`check_recorded_missing`); otherwise at the first read of a crop that holds one
  (:func:`missing_value_error`).
* ``fill``: missing values become the channel's mean, i.e. 0 after normalization (0 in raw units
  when the run has no statistics file).
* ``mask``: filled like ``fill`` for the model's input, and a validity mask travels with each
  sample so that the loss leaves the missing values out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_dchag.data.hyperspectral.formats import CubeFormatError, CubeReader, PathLike
from megatron_dchag.data.hyperspectral.statistics import ChannelStats, recorded_missing

NODATA_POLICIES = ("error", "fill", "mask")
POLICY_HINT = ("set data.nodata=fill (replace them by the channel mean) or data.nodata=mask "
               "(also leave them out of the loss)")


class NoDataError(CubeFormatError):
    """A cube holds missing values and the policy is ``error``. Names the file and the channel."""


def check_policy(policy: str) -> str:
    if policy not in NODATA_POLICIES:
        raise ValueError(f"nodata={policy!r} must be one of {NODATA_POLICIES}")
    return policy


def _markers(nodata_value: Optional[float]) -> str:
    return "NaN/inf" + ("" if nodata_value is None else f" or the file's no-data value {nodata_value:g}")


def missing_value_error(reader: CubeReader, channel_start: int, finite: np.ndarray) -> NoDataError:
    """The error for a block read from ``reader`` (channels from ``channel_start``) whose ``finite``
    mask has a False: its first such channel, counted over the channel's whole image."""
    c_local = int(np.flatnonzero(~finite.reshape(finite.shape[0], -1).all(axis=1))[0])
    channel = channel_start + c_local
    plane = reader.read_channels(channel, channel + 1)
    count = int(plane.size - np.isfinite(plane).sum())
    return NoDataError(
        f"{reader.path}: channel {channel} has {count} missing values of {plane.size} "
        f"({_markers(reader.nodata_value)}) and data.nodata=error; {POLICY_HINT}"
    )


def check_recorded_missing(stats: ChannelStats, files: Sequence[Path], stats_path: PathLike) -> None:
    """Under ``error``: refuse, before any training step, the first of ``files`` that the
    statistics file records as holding missing values."""
    found = recorded_missing(stats, files)
    if not found:
        return
    path, record = found[0]
    more = f"; {len(found) - 1} more of the run's cubes hold some" if len(found) > 1 else ""
    kinds = " and ".join(part for part in (f"{record.nonfinite} NaN/inf" if record.nonfinite else "",
                                             f"{record.nodata} no-data" if record.nodata else "") if part)
    raise NoDataError(
        f"{path}: channel {record.first_channel} has {record.first_channel_count} missing values "
        f"({kinds} values in the cube, as counted in {stats_path}) and data.nodata=error{more}; {POLICY_HINT}"
    )

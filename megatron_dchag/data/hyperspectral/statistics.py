"""Per-channel statistics of a cube collection: computing them by streaming, saving and loading.

:class:`ChannelStats` holds per-channel mean / std (population, ``ddof=0``) / count, plus
wavelengths when known; :class:`RunningChannelMoments` accumulates them block by block
(``tools/compute_stats.py`` streams a collection through it). Files are ``.npz`` or ``.json``
(see :func:`save_channel_stats` for the exact keys); :func:`load_channel_stats` validates them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from megatron_dchag.data.hyperspectral.formats import (
    CubeFormatError,
    CubeReadError,
    PathLike,
    publish_temp_file,
    temp_file_beside,
)

STATS_FORMAT_NAME = "megatron_dchag.channel_stats"
STATS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of a cube collection.

    ``mean`` and ``std`` (population, ``ddof=0``) are float64 ``[C]``; ``count`` is int64 ``[C]``
    (finite values seen per channel); ``wavelengths`` is float64 ``[C]`` in nm or None.
    """

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    wavelengths: Optional[np.ndarray] = None

    @property
    def num_channels(self) -> int:
        return int(self.mean.shape[0])

    def channel_slice(self, start: int, stop: int) -> "ChannelStats":
        """Statistics of channels ``[start, stop)``."""
        if not 0 <= start < stop <= self.num_channels:
            raise ValueError(f"channel range [{start}, {stop}) is outside [0, {self.num_channels})")
        wl = None if self.wavelengths is None else self.wavelengths[start:stop]
        return ChannelStats(self.mean[start:stop], self.std[start:stop], self.count[start:stop], wl)

    def normalization(self, start: int = 0, stop: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(mean, 1/std)`` as float32 ``[c, 1, 1]`` for channels ``[start, stop)``.

        A channel with zero variance gets ``1/std = 1`` (it normalizes to 0 instead of NaN).
        """
        s = self.channel_slice(start, self.num_channels if stop is None else stop)
        inv_std = np.where(s.std > 0, 1.0 / np.where(s.std > 0, s.std, 1.0), 1.0)
        return s.mean.astype(np.float32)[:, None, None], inv_std.astype(np.float32)[:, None, None]


class RunningChannelMoments:
    """Streaming per-channel count / mean / M2 in float64, merged with Chan et al.'s parallel formula.

    ``update(block, channel_start)`` takes any block ``[c, ...]`` of values of channels
    ``[channel_start, channel_start + c)``; blocks may come in any order and any size. Non-finite
    values are skipped (and not counted).
    """

    def __init__(self, num_channels: int):
        self.num_channels = num_channels
        self.count = np.zeros(num_channels, dtype=np.int64)
        self.mean = np.zeros(num_channels, dtype=np.float64)
        self.m2 = np.zeros(num_channels, dtype=np.float64)

    def update(self, block: np.ndarray, channel_start: int = 0) -> None:
        c = block.shape[0]
        if channel_start < 0 or channel_start + c > self.num_channels:
            raise ValueError(
                f"block channels [{channel_start}, {channel_start + c}) outside [0, {self.num_channels})"
            )
        x = np.asarray(block, dtype=np.float64).reshape(c, -1)
        finite = np.isfinite(x)
        if finite.all():
            n_b = np.full(c, x.shape[1], dtype=np.int64)
            mean_b = x.mean(axis=1)
            m2_b = np.square(x - mean_b[:, None]).sum(axis=1)
        else:
            n_b = finite.sum(axis=1).astype(np.int64)
            x = np.where(finite, x, 0.0)
            mean_b = x.sum(axis=1) / np.maximum(n_b, 1)
            m2_b = np.where(finite, np.square(x - mean_b[:, None]), 0.0).sum(axis=1)
        self._merge(slice(channel_start, channel_start + c), n_b, mean_b, m2_b)

    def merge(self, other: "RunningChannelMoments") -> None:
        if other.num_channels != self.num_channels:
            raise ValueError(f"cannot merge moments of {other.num_channels} channels into {self.num_channels}")
        self._merge(slice(0, self.num_channels), other.count, other.mean, other.m2)

    def _merge(self, sl: slice, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a, mean_a, m2_a = self.count[sl], self.mean[sl], self.m2[sl]
        n = n_a + n_b
        safe_n = np.maximum(n, 1).astype(np.float64)
        delta = mean_b - mean_a
        self.mean[sl] = mean_a + delta * (n_b / safe_n)
        self.m2[sl] = m2_a + m2_b + delta * delta * (n_a.astype(np.float64) * n_b / safe_n)
        self.count[sl] = n

    def finalize(self, wavelengths: Optional[np.ndarray] = None) -> ChannelStats:
        empty = np.flatnonzero(self.count == 0)
        if empty.size:
            raise ValueError(f"channels {empty[:10].tolist()} have no finite values; cannot compute statistics")
        std = np.sqrt(np.maximum(self.m2, 0.0) / self.count)
        wl = None if wavelengths is None else np.asarray(wavelengths, dtype=np.float64)
        return ChannelStats(self.mean.copy(), std, self.count.copy(), wl)


def save_channel_stats(stats: ChannelStats, path: PathLike) -> Path:
    """Write ``stats`` atomically (temp file in the same directory, then ``os.replace``).

    Format by extension:

    * ``.json``: ``{"format": "megatron_dchag.channel_stats", "version": 1, "num_channels": C,
      "mean": [C floats], "std": [C floats], "count": [C ints], "wavelengths": [C floats] | null,
      "std_ddof": 0, "wavelength_units": "nm"}``
    * ``.npz``: the same keys as arrays (``format``/``version``/``num_channels``/``std_ddof`` 0-d;
      ``wavelengths`` absent when unknown).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".npz"):
        raise ValueError(f"{path}: statistics file must end in .json or .npz")
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if suffix == ".json":
                payload = {
                    "format": STATS_FORMAT_NAME,
                    "version": STATS_FORMAT_VERSION,
                    "num_channels": stats.num_channels,
                    "mean": [float(v) for v in stats.mean],
                    "std": [float(v) for v in stats.std],
                    "count": [int(v) for v in stats.count],
                    "wavelengths": None if stats.wavelengths is None else [float(v) for v in stats.wavelengths],
                    "std_ddof": 0,
                    "wavelength_units": "nm",
                }
                f.write(json.dumps(payload, indent=1).encode("utf-8"))
            else:
                arrays: Dict[str, np.ndarray] = {
                    "format": np.array(STATS_FORMAT_NAME),
                    "version": np.array(STATS_FORMAT_VERSION),
                    "num_channels": np.array(stats.num_channels),
                    "mean": np.asarray(stats.mean, dtype=np.float64),
                    "std": np.asarray(stats.std, dtype=np.float64),
                    "count": np.asarray(stats.count, dtype=np.int64),
                    "std_ddof": np.array(0),
                }
                if stats.wavelengths is not None:
                    arrays["wavelengths"] = np.asarray(stats.wavelengths, dtype=np.float64)
                np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        publish_temp_file(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_channel_stats(path: PathLike, num_channels_expected: Optional[int] = None) -> ChannelStats:
    """Read and validate a statistics file written by :func:`save_channel_stats`."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            raw: Dict[str, Any] = json.loads(path.read_text())
        elif path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        else:
            raise CubeFormatError(f"{path}: statistics file must end in .json or .npz")
    except (OSError, ValueError) as err:
        if isinstance(err, CubeFormatError):
            raise
        raise CubeReadError(f"{path}: cannot read statistics file: {err}") from err
    for key in ("mean", "std", "count", "num_channels"):
        if key not in raw:
            raise CubeFormatError(f"{path}: statistics file has no {key!r} field")
    num_channels = int(np.asarray(raw["num_channels"]))
    arrays = {}
    for key, dtype in (("mean", np.float64), ("std", np.float64), ("count", np.int64)):
        values = np.asarray(raw[key], dtype=dtype).reshape(-1)
        if values.size != num_channels:
            raise CubeFormatError(
                f"{path}: field {key!r} has {values.size} values but num_channels = {num_channels}"
            )
        arrays[key] = values
    if not (np.isfinite(arrays["mean"]).all() and np.isfinite(arrays["std"]).all() and (arrays["std"] >= 0).all()):
        raise CubeFormatError(f"{path}: 'mean' and 'std' must be finite and 'std' non-negative")
    wavelengths = raw.get("wavelengths")
    if wavelengths is not None:
        wavelengths = np.asarray(wavelengths, dtype=np.float64).reshape(-1)
        if wavelengths.size != num_channels:
            raise CubeFormatError(
                f"{path}: field 'wavelengths' has {wavelengths.size} values but num_channels = {num_channels}"
            )
    if num_channels_expected is not None and num_channels != num_channels_expected:
        raise CubeFormatError(
            f"{path}: statistics are for {num_channels} channels but the data has {num_channels_expected} channels"
        )
    return ChannelStats(arrays["mean"], arrays["std"], arrays["count"], wavelengths)


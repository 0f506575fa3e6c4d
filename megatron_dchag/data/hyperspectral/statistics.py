"""Per-channel statistics of a cube collection: computing them by streaming, saving and loading.

:class:`ChannelStats` holds per-channel mean / std (population, ``ddof=0``) / count of the valid
values, the per-channel counts of missing values (stored NaN/inf, and the file's declared no-data
value), wavelengths when known, and :class:`StatsCoverage`: which cubes the statistics cover (their
stems, the split and its options, a fingerprint) and which of them hold missing values.
:class:`RunningChannelMoments` accumulates them block by block (``dchag-compute-stats`` streams a
collection through it); missing values count apart and never enter the moments.

A channel whose std is zero (a constant band) cannot be normalized: :meth:`RunningChannelMoments.finalize`
refuses it unless told to store std = 1 for it, and :func:`load_channel_stats` refuses a file that
holds one. Files are ``.npz`` or ``.json`` (see :func:`save_channel_stats` for the exact keys);
:func:`load_channel_stats` validates them and still reads version-1 files (no counts, no coverage).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_dchag.data.hyperspectral.formats import (
    CubeFormatError,
    CubeReadError,
    PathLike,
    publish_temp_file,
    temp_file_beside,
)
from megatron_dchag.data.hyperspectral.splits import FileSplit, cube_stem

STATS_FORMAT_NAME = "megatron_dchag.channel_stats"
STATS_FORMAT_VERSION = 2
# A channel is constant when its std is at most this fraction of |mean|: float64 rounding of the
# mean of identical values leaves ~1e-16 of |mean|; any real band varies far more.
CONSTANT_STD_RTOL = 1e-9


class ConstantChannelError(CubeFormatError):
    """A channel has std = 0, so normalizing by it divides by zero. Names the channel."""


def constant_channels(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Indices of the channels whose std is zero (up to :data:`CONSTANT_STD_RTOL` of |mean|)."""
    return np.flatnonzero(np.asarray(std) <= CONSTANT_STD_RTOL * np.abs(np.asarray(mean)))


@dataclass(frozen=True)
class MissingValues:
    """The missing values of one cube: stored NaN/inf and declared no-data, and its first such channel."""

    stem: str
    path: str
    nonfinite: int
    nodata: int
    first_channel: int
    first_channel_count: int

    @property
    def total(self) -> int:
        return self.nonfinite + self.nodata


@dataclass(frozen=True)
class StatsCoverage:
    """Which cubes a statistics file covers: ``files`` (their stems, sorted), the ``split`` they are
    (``train``, ``all``, or ``files`` for a list given by hand) under ``split_options``, and the
    cubes among them that hold missing values."""

    files: Tuple[str, ...]
    split: str = "files"
    split_options: Optional[Dict[str, Any]] = None
    missing: Tuple[MissingValues, ...] = ()

    @property
    def fingerprint(self) -> str:
        """sha1 of the sorted stems: equal for two files that cover the same cubes."""
        return hashlib.sha1("\n".join(sorted(self.files)).encode()).hexdigest()

    def to_dict(self) -> Dict[str, Any]:
        return {
            "split": self.split,
            "split_options": self.split_options,
            "fingerprint": self.fingerprint,
            "num_files": len(self.files),
            "files": sorted(self.files),
            "missing": [vars(m) for m in self.missing],
        }

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], where: str) -> "StatsCoverage":
        try:
            files = tuple(str(f) for f in raw["files"])
            missing = tuple(MissingValues(**m) for m in raw.get("missing") or [])
        except (KeyError, TypeError) as err:
            raise CubeFormatError(f"{where}: the 'coverage' field is malformed ({err})") from None
        return cls(files=files, split=str(raw.get("split", "files")), split_options=raw.get("split_options"),
                   missing=missing)


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of a cube collection.

    ``mean`` and ``std`` (population, ``ddof=0``) are float64 ``[C]``; ``count`` is int64 ``[C]``
    (valid values seen per channel); ``wavelengths`` is float64 ``[C]`` in nm or None.
    ``nonfinite_count`` / ``nodata_count`` (int64 ``[C]``) are the values left out: NaN/inf as
    stored, and values equal to the file's no-data value; None when not recorded.
    ``constant_channels`` were found constant and stored with std = 1 (on request).
    """

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    wavelengths: Optional[np.ndarray] = None
    nonfinite_count: Optional[np.ndarray] = None
    nodata_count: Optional[np.ndarray] = None
    coverage: Optional[StatsCoverage] = field(default=None)
    constant_channels: Tuple[int, ...] = ()

    @property
    def num_channels(self) -> int:
        return int(self.mean.shape[0])

    def channel_slice(self, start: int, stop: int) -> "ChannelStats":
        """Statistics of channels ``[start, stop)``."""
        if not 0 <= start < stop <= self.num_channels:
            raise ValueError(f"channel range [{start}, {stop}) is outside [0, {self.num_channels})")
        cut = lambda a: None if a is None else a[start:stop]  # noqa: E731
        return ChannelStats(self.mean[start:stop], self.std[start:stop], self.count[start:stop], cut(self.wavelengths),
                            cut(self.nonfinite_count), cut(self.nodata_count), self.coverage,
                            tuple(c - start for c in self.constant_channels if start <= c < stop))

    def normalization(self, start: int = 0, stop: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(mean, 1/std)`` as float32 ``[c, 1, 1]`` for channels ``[start, stop)``.

        A channel with zero variance gets ``1/std = 1`` (it normalizes to 0 instead of NaN); files
        holding one are refused by :func:`load_channel_stats`.
        """
        s = self.channel_slice(start, self.num_channels if stop is None else stop)
        inv_std = np.where(s.std > 0, 1.0 / np.where(s.std > 0, s.std, 1.0), 1.0)
        return s.mean.astype(np.float32)[:, None, None], inv_std.astype(np.float32)[:, None, None]


class RunningChannelMoments:
    """Streaming per-channel count / mean / M2 in float64, merged with Chan et al.'s parallel formula.

    ``update(block, channel_start, nodata)`` takes any block ``[c, ...]`` of values of channels
    ``[channel_start, channel_start + c)``; blocks may come in any order and any size. Missing
    values are skipped and counted: ``nodata`` (a boolean array like ``block``, as
    :meth:`~megatron_dchag.data.hyperspectral.formats.CubeReader.read_with_nodata` returns it)
    marks the declared no-data values, every other non-finite value counts as non-finite.
    """

    def __init__(self, num_channels: int):
        self.num_channels = num_channels
        self.count = np.zeros(num_channels, dtype=np.int64)
        self.mean = np.zeros(num_channels, dtype=np.float64)
        self.m2 = np.zeros(num_channels, dtype=np.float64)
        self.nonfinite = np.zeros(num_channels, dtype=np.int64)
        self.nodata = np.zeros(num_channels, dtype=np.int64)

    def update(self, block: np.ndarray, channel_start: int = 0, nodata: Optional[np.ndarray] = None) -> None:
        c = block.shape[0]
        if channel_start < 0 or channel_start + c > self.num_channels:
            raise ValueError(
                f"block channels [{channel_start}, {channel_start + c}) outside [0, {self.num_channels})"
            )
        sl = slice(channel_start, channel_start + c)
        x = np.asarray(block, dtype=np.float64).reshape(c, -1)
        finite = np.isfinite(x)
        if finite.all():
            n_b = np.full(c, x.shape[1], dtype=np.int64)
            mean_b = x.mean(axis=1)
            m2_b = np.square(x - mean_b[:, None]).sum(axis=1)
        else:
            n_b = finite.sum(axis=1).astype(np.int64)
            declared = np.zeros(c, dtype=np.int64) if nodata is None else nodata.reshape(c, -1).sum(axis=1)
            self.nodata[sl] += declared
            self.nonfinite[sl] += x.shape[1] - n_b - declared
            x = np.where(finite, x, 0.0)
            mean_b = x.sum(axis=1) / np.maximum(n_b, 1)
            m2_b = np.where(finite, np.square(x - mean_b[:, None]), 0.0).sum(axis=1)
        self._merge(sl, n_b, mean_b, m2_b)

    def merge(self, other: "RunningChannelMoments") -> None:
        if other.num_channels != self.num_channels:
            raise ValueError(f"cannot merge moments of {other.num_channels} channels into {self.num_channels}")
        self._merge(slice(0, self.num_channels), other.count, other.mean, other.m2)
        self.nonfinite += other.nonfinite
        self.nodata += other.nodata

    def _merge(self, sl: slice, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a, mean_a, m2_a = self.count[sl], self.mean[sl], self.m2[sl]
        n = n_a + n_b
        safe_n = np.maximum(n, 1).astype(np.float64)
        delta = mean_b - mean_a
        self.mean[sl] = mean_a + delta * (n_b / safe_n)
        self.m2[sl] = m2_a + m2_b + delta * delta * (n_a.astype(np.float64) * n_b / safe_n)
        self.count[sl] = n

    def finalize(self, wavelengths: Optional[np.ndarray] = None, allow_constant_channels: bool = False,
                 coverage: Optional[StatsCoverage] = None) -> ChannelStats:
        """The statistics; :class:`ConstantChannelError` for a channel with std = 0, unless
        ``allow_constant_channels`` (then its std is stored as 1: it normalizes to 0)."""
        empty = np.flatnonzero(self.count == 0)
        if empty.size:
            raise CubeFormatError(
                f"channel{'s' if empty.size > 1 else ''} {', '.join(str(c) for c in empty[:10])}"
                f"{' ...' if empty.size > 10 else ''} hold{'s' if empty.size == 1 else ''} no valid value "
                f"(every value is NaN/inf or the files' no-data value); cannot compute statistics"
            )
        std = np.sqrt(np.maximum(self.m2, 0.0) / self.count)
        constant = constant_channels(self.mean, std)
        if constant.size:
            if not allow_constant_channels:
                c = int(constant[0])
                others = f" ({constant.size} constant channels in all: {constant[:10].tolist()})" if constant.size > 1 else ""
                raise ConstantChannelError(
                    f"channel {c} is constant (std = 0 over {int(self.count[c])} values, all {self.mean[c]:.9g}): "
                    f"it cannot be normalized{others}"
                )
            std[constant] = 1.0
        wl = None if wavelengths is None else np.asarray(wavelengths, dtype=np.float64)
        return ChannelStats(self.mean.copy(), std, self.count.copy(), wl, self.nonfinite.copy(), self.nodata.copy(),
                            coverage, tuple(int(c) for c in constant))


def save_channel_stats(stats: ChannelStats, path: PathLike) -> Path:
    """Write ``stats`` atomically (temp file in the same directory, then ``os.replace``).

    Format by extension:

    * ``.json``: ``{"format": "megatron_dchag.channel_stats", "version": 2, "num_channels": C,
      "mean": [C floats], "std": [C floats], "count": [C ints], "wavelengths": [C floats] | null,
      "std_ddof": 0, "wavelength_units": "nm", "nonfinite_count": [C ints] | null,
      "nodata_count": [C ints] | null, "constant_channels": [ints stored with std = 1], "coverage": {"split", "split_options", "fingerprint",
      "num_files", "files": [stems], "missing": [{"stem", "path", "nonfinite", "nodata",
      "first_channel", "first_channel_count"}]} | null}``
    * ``.npz``: the same keys as arrays (``format``/``version``/``num_channels``/``std_ddof`` 0-d;
      ``wavelengths``, the counts and ``coverage`` absent when unknown; ``coverage`` as a 0-d JSON
      string).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".npz"):
        raise ValueError(f"{path}: statistics file must end in .json or .npz")
    coverage = None if stats.coverage is None else stats.coverage.to_dict()
    as_ints = lambda a: None if a is None else [int(v) for v in a]  # noqa: E731
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
                    "nonfinite_count": as_ints(stats.nonfinite_count),
                    "nodata_count": as_ints(stats.nodata_count),
                    "constant_channels": list(stats.constant_channels),
                    "coverage": coverage,
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
                for key in ("nonfinite_count", "nodata_count"):
                    if getattr(stats, key) is not None:
                        arrays[key] = np.asarray(getattr(stats, key), dtype=np.int64)
                arrays["constant_channels"] = np.asarray(stats.constant_channels, dtype=np.int64)
                if coverage is not None:
                    arrays["coverage"] = np.array(json.dumps(coverage))
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
    """Read and validate a statistics file written by :func:`save_channel_stats` (version 1 or 2).

    Refused, naming the file: missing fields, counts that do not match ``num_channels``, a
    non-finite mean or std, and a channel with std = 0 (:class:`ConstantChannelError`).
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            raw: Dict[str, Any] = json.loads(path.read_text())
        elif path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
            if "coverage" in raw:
                raw["coverage"] = json.loads(str(raw["coverage"]))
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
    arrays: Dict[str, Optional[np.ndarray]] = {}
    for key, dtype, optional in (("mean", np.float64, False), ("std", np.float64, False), ("count", np.int64, False),
                                 ("wavelengths", np.float64, True), ("nonfinite_count", np.int64, True),
                                 ("nodata_count", np.int64, True)):
        if raw.get(key) is None:
            arrays[key] = None
            continue
        values = np.asarray(raw[key], dtype=dtype).reshape(-1)
        if values.size != num_channels:
            raise CubeFormatError(
                f"{path}: field {key!r} has {values.size} values but num_channels = {num_channels}"
            )
        arrays[key] = values
    mean, std = arrays["mean"], arrays["std"]
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()):
        raise CubeFormatError(f"{path}: 'mean' and 'std' must be finite and 'std' non-negative")
    constant = constant_channels(mean, std)
    if constant.size:
        c = int(constant[0])
        others = f" ({constant.size} such channels: {constant[:10].tolist()})" if constant.size > 1 else ""
        raise ConstantChannelError(
            f"{path}: channel {c} has std = {std[c]:g} (a constant band){others}; normalizing by it divides by zero: "
            "recompute the file with dchag-compute-stats --allow-constant-channels (stores std = 1), or drop the band"
        )
    if num_channels_expected is not None and num_channels != num_channels_expected:
        raise CubeFormatError(
            f"{path}: statistics are for {num_channels} channels but the data has {num_channels_expected} channels"
        )
    coverage = None if raw.get("coverage") is None else StatsCoverage.from_dict(raw["coverage"], str(path))
    constant_stored = tuple(int(c) for c in np.asarray(raw.get("constant_channels", []), dtype=np.int64).reshape(-1))
    return ChannelStats(mean, std, arrays["count"], arrays["wavelengths"], arrays["nonfinite_count"],
                        arrays["nodata_count"], coverage, constant_stored)


def held_out_overlap(stats: ChannelStats, split: FileSplit) -> Dict[str, List[Path]]:
    """The run's validation and test cubes that ``stats`` covers (by stem), per split; empty lists
    when it covers none, or when the file does not record its coverage."""
    if stats.coverage is None:
        return {"val": [], "test": []}
    covered = set(stats.coverage.files)
    return {name: [p for p in getattr(split, name) if cube_stem(p) in covered] for name in ("val", "test")}


def coverage_warning(stats: ChannelStats, split: FileSplit, stats_path: PathLike, fix: str) -> Optional[str]:
    """One line when ``stats`` includes validation or test cubes of ``split`` (else None)."""
    overlap = held_out_overlap(stats, split)
    parts = [f"{len(files)} of the run's {len(getattr(split, name))} {label} cubes (e.g. {cube_stem(files[0])})"
             for name, label in (("val", "validation"), ("test", "test")) for files in [overlap[name]] if files]
    if not parts:
        return None
    assert stats.coverage is not None
    return (f"data.stats_file '{stats_path}' covers {len(stats.coverage.files)} cubes including "
            f"{' and '.join(parts)}: the normalization has seen held-out data; {fix}")


def recorded_missing(stats: ChannelStats, files: Sequence[Path]) -> List[Tuple[Path, MissingValues]]:
    """The cubes of ``files`` that ``stats`` records as holding missing values (matched by stem)."""
    if stats.coverage is None or not stats.coverage.missing:
        return []
    by_stem = {m.stem: m for m in stats.coverage.missing}
    return [(p, by_stem[cube_stem(p)]) for p in files if cube_stem(p) in by_stem]

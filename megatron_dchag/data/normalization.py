"""The normalization a model was trained with, as a small record that travels with its weights.

A run normalizes its inputs per channel with its statistics file (``data.stats_file``): a
hyperspectral :class:`~megatron_dchag.data.hyperspectral.statistics.ChannelStats` file (``.json`` or
``.npz``) or an ERA5 :class:`~megatron_dchag.data.era5.statistics.ERA5Stats` file (``.npz`` or
``.nc``). A model is only usable on raw data with those numbers, so checkpoints
(``normalization.json`` in each checkpoint directory) and portable exports (the ``normalization``
metadata entry) carry them as a :class:`Normalization`: the per-channel mean and std exactly as
read from the file (float64, JSON round-trips them bit for bit), the ERA5 channel names, and the
source file's name and sha256. The climatology of an ERA5 file is not part of it (it scores
forecasts, it does not normalize them).

:meth:`Normalization.hyperspectral_affine` and :meth:`Normalization.era5_affine` give the float32
factors computed exactly as the datasets compute them, so a model sees the same inputs at
inference as in training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

NORMALIZATION_FORMAT = "megatron_dchag.normalization"
NORMALIZATION_VERSION = 1
KINDS = ("hyperspectral", "era5", "none")


class NormalizationError(ValueError):
    """A normalization record or statistics file is malformed or does not fit the model."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` / ``std`` (float64 ``[C]``) of a run's statistics file.

    ``kind``: ``hyperspectral`` (channels by index), ``era5`` (channels by ``channels`` names) or
    ``none`` (the run trained on raw values: no statistics file). ``source`` / ``sha256``: the
    file's name and content hash, to tell which file it was."""

    kind: str
    mean: Optional[np.ndarray] = None
    std: Optional[np.ndarray] = None
    channels: Optional[Tuple[str, ...]] = None
    source: Optional[str] = None
    sha256: Optional[str] = None

    @property
    def num_channels(self) -> Optional[int]:
        return None if self.mean is None else int(self.mean.shape[0])

    # -- serialization ------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": NORMALIZATION_FORMAT,
            "version": NORMALIZATION_VERSION,
            "kind": self.kind,
            "mean": None if self.mean is None else [float(v) for v in self.mean],
            "std": None if self.std is None else [float(v) for v in self.std],
            "channels": None if self.channels is None else list(self.channels),
            "source": self.source,
            "sha256": self.sha256,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], where: str) -> "Normalization":
        if not isinstance(raw, dict) or raw.get("format") != NORMALIZATION_FORMAT:
            raise NormalizationError(f"{where}: not a normalization record (format={raw.get('format') if isinstance(raw, dict) else None!r})")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise NormalizationError(f"{where}: normalization kind {kind!r} is not one of {KINDS}")
        if kind == "none":
            return cls("none", source=raw.get("source"), sha256=raw.get("sha256"))
        try:
            mean = np.asarray(raw["mean"], dtype=np.float64).reshape(-1)
            std = np.asarray(raw["std"], dtype=np.float64).reshape(-1)
        except (KeyError, TypeError, ValueError) as err:
            raise NormalizationError(f"{where}: normalization record has no usable mean/std ({err})") from None
        channels = raw.get("channels")
        if mean.shape != std.shape or (channels is not None and len(channels) != mean.size):
            raise NormalizationError(f"{where}: normalization record has {mean.size} means, {std.size} stds"
                                     + ("" if channels is None else f" and {len(channels)} channel names"))
        return cls(kind, mean, std, None if channels is None else tuple(str(c) for c in channels),
                   raw.get("source"), raw.get("sha256"))

    @classmethod
    def from_json(cls, text: str, where: str) -> "Normalization":
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise NormalizationError(f"{where}: normalization record is not JSON ({err})") from None
        return cls.from_dict(raw, where)

    # -- the factors the datasets use -----------------------------------------------------------
    def hyperspectral_affine(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(mean, 1/std)`` float32 ``[c, 1, 1]`` of channels ``[start, stop)``, as
        :class:`~megatron_dchag.data.hyperspectral.dataset.HyperspectralDataset` applies them
        (``(x - mean) * inv_std``); identity for ``kind="none"``."""
        if self.kind == "none":
            return np.zeros((stop - start, 1, 1), np.float32), np.ones((stop - start, 1, 1), np.float32)
        if self.kind != "hyperspectral":
            raise NormalizationError(f"a {self.kind} normalization cannot normalize hyperspectral cubes")
        if not 0 <= start < stop <= self.mean.size:
            raise NormalizationError(f"channels [{start}, {stop}) are outside the statistics' {self.mean.size} channels")
        std = self.std[start:stop]
        inv_std = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0)
        return self.mean[start:stop].astype(np.float32)[:, None, None], inv_std.astype(np.float32)[:, None, None]

    def era5_affine(self, names: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` float32 ``[c, 1, 1]`` of the ERA5 channels ``names`` (std 0 -> 1), as
        :class:`~megatron_dchag.data.era5.dataset.ERA5Dataset` applies them (``(x - mean) / std``)."""
        from megatron_dchag.data.era5.naming import parse_channel

        if self.kind == "none":
            return np.zeros((len(names), 1, 1), np.float32), np.ones((len(names), 1, 1), np.float32)
        if self.kind != "era5" or self.channels is None:
            raise NormalizationError(f"a {self.kind} normalization has no ERA5 channel names")
        lookup = {c: i for i, c in enumerate(self.channels)}
        wanted = [parse_channel(n).name for n in names]
        missing = [n for n in wanted if n not in lookup]
        if missing:
            raise NormalizationError(f"the statistics have no channels {missing[:5]} (they have {len(lookup)})")
        idx = [lookup[n] for n in wanted]
        std = np.where(self.std[idx] > 0, self.std[idx], 1.0)
        return self.mean[idx].astype(np.float32)[:, None, None], std.astype(np.float32)[:, None, None]


NO_NORMALIZATION = Normalization("none")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_era5_npz(path: Path) -> bool:
    with np.load(path, allow_pickle=False) as npz:
        return "channels" in npz.files and "format" not in npz.files


def normalization_from_stats_file(path: Optional[str]) -> Normalization:
    """The record of a statistics file of either workload (told apart by suffix and contents);
    ``None`` (a run without statistics file) gives ``kind="none"``."""
    if not path:
        return NO_NORMALIZATION
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"statistics file '{path}' does not exist")
    suffix = file.suffix.lower()
    if suffix in (".nc", ".nc4", ".netcdf") or (suffix == ".npz" and _is_era5_npz(file)):
        from megatron_dchag.data.era5.statistics import load_era5_stats

        era5 = load_era5_stats(file)
        return Normalization("era5", np.asarray(era5.mean, np.float64), np.asarray(era5.std, np.float64),
                             tuple(era5.channels), file.name, _sha256(file))
    from megatron_dchag.data.hyperspectral.statistics import load_channel_stats

    stats = load_channel_stats(file)
    return Normalization("hyperspectral", np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64),
                         None, file.name, _sha256(file))


"""The hyperspectral dataset: normalized crops of cubes, restricted to one TP rank's channels.

:class:`HyperspectralDataset` takes a list of cube files validated up front (same channel count
everywhere, crop fits, stats match), a deterministic train/val/test split by file
(:mod:`~megatron_dchag.data.hyperspectral.splits`), a deterministic random crop that is a pure
function of ``(seed, epoch, index)`` (:func:`crop_origin`), a contiguous channel range (the
rank's slice, the only channels it ever reads) and a no-data policy
(:mod:`~megatron_dchag.data.hyperspectral.nodata`).

Nothing here knows about the model or the trainer; the channel range a rank should read comes
from the model's channel-group plan (``ChannelGroupPlan.rank_channel_range``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_dchag.data.hyperspectral.discovery import scan_cubes
from megatron_dchag.data.hyperspectral.formats import CubeFormatError, CubeReader, PathLike
from megatron_dchag.data.hyperspectral.labels import read_labels
from megatron_dchag.data.hyperspectral.nodata import check_policy, missing_value_error
from megatron_dchag.data.hyperspectral.splits import SplitOptions, split_collection
from megatron_dchag.data.hyperspectral.statistics import ChannelStats, load_channel_stats

CROP_MODES = ("auto", "random", "fixed", "center")


def crop_origin(
    seed: int, epoch: int, index: int, cube_hw: Tuple[int, int], crop_hw: Tuple[int, int]
) -> Tuple[int, int]:
    """Top-left corner of the random crop: a pure function of ``(seed, epoch, index)`` and the shapes."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x43524F50])
    y0 = int(rng.integers(0, cube_hw[0] - crop_hw[0] + 1))
    x0 = int(rng.integers(0, cube_hw[1] - crop_hw[1] + 1))
    return y0, x0


class HyperspectralDataset(torch.utils.data.Dataset):
    """Crops of hyperspectral cubes, restricted to one contiguous channel range (a TP rank's slice).

    Item ``idx`` (``0 <= idx < num_files * samples_per_file``) is a crop of file
    ``idx // samples_per_file``. The crop corner is :func:`crop_origin` of ``(seed, epoch, idx)``:
    resuming at the same epoch reproduces it, and all TP ranks (different ``channel_range``) cut the
    same window. ``crop``: ``"random"`` (depends on the epoch), ``"fixed"`` (random per item, same
    every epoch), ``"center"``; ``"auto"`` is ``fixed`` for the val and test splits (the same
    crops at every evaluation) and ``random`` otherwise.

    ``dataset[idx]`` uses the epoch set by :meth:`set_epoch`; ``dataset[(epoch, idx)]`` uses the
    given epoch (what :class:`~megatron_dchag.data.sampler.DistributedResumableSampler` yields with
    ``yield_epoch=True``, so DataLoader worker processes need no ``set_epoch``).

    Returns ``{"image": float32 [c_local, h, w], "wavelengths": float32 [c_local] (empty ``[0]``
    when the data has none), "index": idx, "epoch": epoch}``, plus ``"valid": bool [c_local, h, w]``
    (False at missing values) under ``nodata="mask"``, and ``"labels": int64 [h, w]`` (the same
    window of the file's label map, :mod:`~megatron_dchag.data.hyperspectral.labels`) when
    ``label_dataset`` names one. The image is normalized per channel with
    ``stats_file`` (``(x - mean) / std`` of the rank's channels) when given, raw values cast to
    float32 otherwise. Missing values (NaN/inf, or the file's no-data value) raise
    :class:`~megatron_dchag.data.hyperspectral.nodata.NoDataError` under ``nodata="error"`` and
    are 0 (the channel mean after normalization) under ``fill`` and ``mask``.

    ``split`` is ``train``, ``val``, ``test`` or ``all``, chosen by ``val_fraction`` or
    ``val_files`` and ``test_files`` (see :func:`~megatron_dchag.data.hyperspectral.splits.split_collection`).
    """

    def __init__(
        self,
        path_or_dir: Union[PathLike, Sequence[PathLike]],
        crop_size: Tuple[int, int],
        channel_range: Optional[Tuple[int, int]] = None,
        num_channels_expected: Optional[int] = None,
        stats_file: Optional[PathLike] = None,
        dataset_name: str = "cube",
        layout: str = "CHW",
        file_format: str = "auto",
        split: str = "train",
        val_fraction: float = 0.1,
        seed: int = 1234,
        split_seed: int = 0,
        crop: str = "auto",
        samples_per_file: int = 1,
        val_files: Optional[Sequence[str]] = None,
        test_files: Optional[Sequence[str]] = None,
        nodata: str = "error",
        label_dataset: Optional[str] = None,
    ):
        super().__init__()
        crop_h, crop_w = (int(v) for v in crop_size)
        if crop_h < 1 or crop_w < 1:
            raise ValueError(f"crop_size={tuple(crop_size)} must be positive")
        if crop not in CROP_MODES:
            raise ValueError(f"crop={crop!r} must be one of {CROP_MODES}")
        if samples_per_file < 1:
            raise ValueError(f"samples_per_file={samples_per_file} must be >= 1")
        self.nodata = check_policy(nodata)
        self.file_split = split_collection(
            path_or_dir, file_format,
            SplitOptions(val_fraction=val_fraction, val_files=val_files, test_files=test_files, split_seed=split_seed),
        )
        # Validate every file (all splits), so train and val agree on the contract.
        collection = scan_cubes(
            self.file_split.all,
            file_format=file_format,
            dataset_name=dataset_name,
            layout=layout,
            num_channels_expected=num_channels_expected,
            min_spatial_shape=(crop_h, crop_w),
        )
        chosen = set(self.file_split.files("all") if split == "all" else self.file_split.require(split))
        self.readers: List[CubeReader] = [r for r in collection.readers if r.path in chosen]
        self.files: List[Path] = [r.path for r in self.readers]
        self.num_channels = collection.num_channels
        start, stop = (0, self.num_channels) if channel_range is None else (int(channel_range[0]), int(channel_range[1]))
        if not 0 <= start < stop <= self.num_channels:
            raise ValueError(
                f"channel_range=({start}, {stop}) must satisfy 0 <= start < stop <= {self.num_channels} "
                f"(the cubes have {self.num_channels} channels)"
            )
        self.channel_range = (start, stop)
        self.crop_size = (crop_h, crop_w)
        self.split = split
        self.seed = int(seed)
        self.crop_mode = ("fixed" if split in ("val", "test") else "random") if crop == "auto" else crop
        self.samples_per_file = samples_per_file
        self.label_dataset = label_dataset
        self.epoch = 0

        self.all_wavelengths: Optional[np.ndarray] = collection.wavelengths
        self.stats: Optional[ChannelStats] = None
        self._mean: Optional[np.ndarray] = None
        self._inv_std: Optional[np.ndarray] = None
        if stats_file is not None:
            stats = load_channel_stats(stats_file, num_channels_expected=self.num_channels)
            if stats.wavelengths is not None and self.all_wavelengths is not None:
                if not np.allclose(stats.wavelengths, self.all_wavelengths, rtol=0, atol=1e-3):
                    raise CubeFormatError(
                        f"{stats_file}: the statistics' wavelengths differ from the cubes' wavelengths "
                        f"(e.g. {collection.files[0]}); they were computed for another band set"
                    )
            if self.all_wavelengths is None:
                self.all_wavelengths = stats.wavelengths
            self.stats = stats
            self._mean, self._inv_std = stats.normalization(start, stop)
        wl = self.all_wavelengths
        self._local_wavelengths = torch.from_numpy(
            np.asarray(wl[start:stop], dtype=np.float32) if wl is not None else np.zeros(0, dtype=np.float32)
        )

    # -- sizes -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.readers) * self.samples_per_file

    @property
    def num_local_channels(self) -> int:
        return self.channel_range[1] - self.channel_range[0]

    @property
    def wavelengths(self) -> Optional[np.ndarray]:
        """Wavelengths (nm) of this dataset's channel range, or None."""
        wl = self.all_wavelengths
        return None if wl is None else wl[self.channel_range[0] : self.channel_range[1]].copy()

    @property
    def bytes_read(self) -> int:
        """Bytes touched by all reads of this dataset's readers (see :class:`CubeReader`)."""
        return sum(r.bytes_read for r in self.readers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- items -------------------------------------------------------------------------------
    def crop_window(self, index: int, epoch: Optional[int] = None) -> Tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of item ``index`` at ``epoch`` (default: the current epoch)."""
        reader = self.readers[index // self.samples_per_file]
        hw = (reader.height, reader.width)
        ch, cw = self.crop_size
        if self.crop_mode == "center":
            y0, x0 = (hw[0] - ch) // 2, (hw[1] - cw) // 2
        else:
            e = (self.epoch if epoch is None else epoch) if self.crop_mode == "random" else 0
            y0, x0 = crop_origin(self.seed, e, index, hw, self.crop_size)
        return y0, y0 + ch, x0, x0 + cw

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        if isinstance(item, (tuple, list)):
            epoch, index = int(item[0]), int(item[1])
        else:
            epoch, index = self.epoch, int(item)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        y0, y1, x0, x1 = self.crop_window(index, epoch)
        reader = self.readers[index // self.samples_per_file]
        block = reader.read(self.channel_range[0], self.channel_range[1], y0, y1, x0, x1)
        finite: Optional[np.ndarray] = np.isfinite(block)
        if finite.all():
            finite = None
        elif self.nodata == "error":
            raise missing_value_error(reader, self.channel_range[0], finite)
        if self._mean is not None:
            block -= self._mean
            block *= self._inv_std
        if finite is not None:
            block[~finite] = 0.0  # the channel mean, after normalization
        item = {
            "image": torch.from_numpy(block),
            "wavelengths": self._local_wavelengths.clone(),
            "index": index,
            "epoch": epoch,
        }
        if self.nodata == "mask":
            item["valid"] = torch.from_numpy(np.ones(block.shape, dtype=bool) if finite is None else finite)
        if self.label_dataset is not None:
            item["labels"] = torch.from_numpy(read_labels(reader.path, self.label_dataset, y0, y1, x0, x1))
        return item

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def __repr__(self) -> str:
        return (
            f"HyperspectralDataset(split={self.split!r}, files={len(self.readers)}, samples={len(self)}, "
            f"channels={self.channel_range[0]}:{self.channel_range[1]} of {self.num_channels}, "
            f"crop={self.crop_size[0]}x{self.crop_size[1]} ({self.crop_mode}))"
        )

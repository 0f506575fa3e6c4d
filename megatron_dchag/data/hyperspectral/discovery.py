"""Which cube files make up a collection: listing and the metadata scan.

:func:`list_cube_files` finds the cubes of a directory (or takes a file or a list), and
:func:`scan_cubes` opens every file's metadata and checks the contract across files (same channel
count, the crop fits, one band set) before any training step, with errors naming the offending
file. How a collection is split into train / validation / test files is
:mod:`~megatron_dchag.data.hyperspectral.splits`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_dchag.data.hyperspectral.formats import (
    ENVI_HEADER_EXTENSION,
    FILE_FORMATS,
    HDF5_EXTENSIONS,
    CubeFormatError,
    CubeReader,
    CubeReadError,
    PathLike,
    open_cube,
)


def list_cube_files(path_or_files: Union[PathLike, Sequence[PathLike]], file_format: str = "auto") -> List[Path]:
    """Cube files from a directory (non-recursive, sorted), a single file, or a list of files.

    In a directory, HDF5 files are ``*.h5`` / ``*.hdf5`` and ENVI cubes are found by their ``*.hdr``.
    With ``file_format="auto"`` a directory holding both kinds is ambiguous and an error.
    """
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format={file_format!r} must be one of {FILE_FORMATS}")
    if isinstance(path_or_files, (str, os.PathLike)):
        root = Path(path_or_files)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise CubeReadError(f"{root}: data path does not exist")
        entries = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        hdf5 = [p for p in entries if p.suffix.lower() in HDF5_EXTENSIONS]
        envi = [p for p in entries if p.suffix.lower() == ENVI_HEADER_EXTENSION]
        if file_format == "auto":
            if hdf5 and envi:
                raise CubeFormatError(
                    f"{root}: holds both HDF5 ({len(hdf5)}) and ENVI ({len(envi)}) cubes; set "
                    "data.file_format to 'hdf5' or 'envi'"
                )
            files = hdf5 or envi
        else:
            files = hdf5 if file_format == "hdf5" else envi
        if not files:
            raise CubeFormatError(
                f"{root}: no cube files found (HDF5 {HDF5_EXTENSIONS} or ENVI {ENVI_HEADER_EXTENSION}, "
                f"file_format={file_format!r})"
            )
        return files
    files = [Path(p) for p in path_or_files]
    if not files:
        raise ValueError("empty list of cube files")
    return files


@dataclass
class CubeCollection:
    """Validated metadata of a list of cube files (one reader per file, handles closed)."""

    files: List[Path]
    readers: List[CubeReader]
    num_channels: int
    spatial_shapes: List[Tuple[int, int]]
    wavelengths: Optional[np.ndarray] = field(default=None)


def scan_cubes(
    files: Sequence[PathLike],
    file_format: str = "auto",
    dataset_name: str = "cube",
    layout: str = "CHW",
    num_channels_expected: Optional[int] = None,
    min_spatial_shape: Optional[Tuple[int, int]] = None,
) -> CubeCollection:
    """Open every file's metadata and check the contract before any training step.

    Every cube must have the same channel count (equal to ``num_channels_expected`` when given),
    be at least ``min_spatial_shape`` (the crop), and carry the same wavelengths when it carries
    any. Errors name the offending file and both numbers.
    """
    readers: List[CubeReader] = []
    wavelengths: Optional[np.ndarray] = None
    wavelength_source: Optional[Path] = None
    for f in files:
        reader = open_cube(f, file_format=file_format, dataset_name=dataset_name, layout=layout)
        c, h, w = reader.shape
        if num_channels_expected is not None and c != num_channels_expected:
            raise CubeFormatError(
                f"{reader.path}: cube has {c} channels but {num_channels_expected} channels are expected "
                "(model.num_channels / num_channels_expected)"
            )
        if readers and c != readers[0].num_channels:
            raise CubeFormatError(
                f"{reader.path}: cube has {c} channels but {readers[0].path} has "
                f"{readers[0].num_channels} channels (every cube must have the same channel count)"
            )
        if min_spatial_shape is not None and (h < min_spatial_shape[0] or w < min_spatial_shape[1]):
            raise CubeFormatError(
                f"{reader.path}: cube is {h} x {w} (H x W) but the crop is "
                f"{min_spatial_shape[0]} x {min_spatial_shape[1]}; the crop must fit in every cube"
            )
        wl = reader.wavelengths
        if wl is not None:
            if wavelengths is None:
                wavelengths, wavelength_source = wl, reader.path
            elif not np.allclose(wl, wavelengths, rtol=0, atol=1e-3):
                worst = int(np.argmax(np.abs(wl - wavelengths)))
                raise CubeFormatError(
                    f"{reader.path}: wavelength of channel {worst} is {wl[worst]:.4f} nm but "
                    f"{wavelength_source} has {wavelengths[worst]:.4f} nm (all cubes must share one band set)"
                )
        readers.append(reader)
    if not readers:
        raise ValueError("no cube files to scan")
    return CubeCollection(
        files=[r.path for r in readers],
        readers=readers,
        num_channels=readers[0].num_channels,
        spatial_shapes=[(r.height, r.width) for r in readers],
        wavelengths=wavelengths,
    )


"""Zarr stores of ERA5 data: which zarr formats the installed zarr-python writes, the format of a
store on disk, and the encodings valid for a store that is written.

zarr-python 3 reads and writes zarr formats 2 and 3; zarr-python 2 only format 2. An encoding
read from one store (format 3's ``serializer``, ``compressors``, ``shards``; format 2's
``compressor``, ``filters``; netCDF's ``zlib``, ``scale_factor`` packing) is not valid for, or not
wanted in, another: :func:`clean_encoding` keeps only the chunk layout, so what is written is the
data itself, with the output format's default compression.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Optional, Tuple

import xarray as xr

__all__ = ["ZARR_FORMATS", "installed_zarr_version", "check_zarr_format", "zarr_format_of", "clean_encoding"]

ZARR_FORMATS: Tuple[int, ...] = (2, 3)


def installed_zarr_version() -> Optional[str]:
    """The installed zarr-python version, or ``None`` when zarr is not installed."""
    try:
        return importlib.metadata.version("zarr")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_zarr_format(zarr_format: int, what: str = "--zarr-format") -> int:
    """``zarr_format`` if the installed zarr-python can write it, else a ValueError naming ``what``."""
    if zarr_format not in ZARR_FORMATS:
        raise ValueError(f"{what}={zarr_format!r}: zarr formats are {' or '.join(map(str, ZARR_FORMATS))}")
    version = installed_zarr_version()
    if version is None:
        raise ValueError(f"{what}={zarr_format}: zarr-python is not installed (pip install zarr)")
    if zarr_format == 3 and int(version.split(".")[0]) < 3:
        raise ValueError(f"{what}=3 needs zarr-python >= 3; the installed zarr-python is {version} (use {what}=2)")
    return zarr_format


def zarr_format_of(path: os.PathLike) -> Optional[int]:
    """3 for a format-3 store (``zarr.json``), 2 for a format-2 store (``.zgroup``/``.zarray``), else None."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        return 3
    if (path / ".zgroup").is_file() or (path / ".zmetadata").is_file() or (path / ".zarray").is_file():
        return 2
    return None


def clean_encoding(ds: xr.Dataset) -> xr.Dataset:
    """A shallow copy of ``ds`` whose variables and coordinates carry no encoding from their source
    (see the module docstring); the writer sets the chunks it wants."""
    out = ds.copy(deep=False)
    for variable in out.variables.values():
        variable.encoding = {}
    out.encoding = {}
    return out

"""Per-pixel class labels stored beside a cube: an ``H x W`` integer dataset in the cube's HDF5 file.

The label map has the cube's spatial shape whatever the cube's layout (CHW or HWC); an optional
``class_names`` attribute on it names the classes in order. :func:`check_label_map` validates one
file's map (present, 2-D, integer, the cube's height and width) and returns its per-value pixel
counts, :func:`read_labels` reads a crop. Problems raise
:class:`~megatron_dchag.data.hyperspectral.formats.CubeFormatError` naming the file and dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from megatron_dchag.data.hyperspectral.formats import CubeFormatError, PathLike

CLASS_NAMES_ATTRIBUTE = "class_names"


def _open(path: PathLike, dataset: str):
    import h5py

    path = Path(path)
    if not h5py.is_hdf5(str(path)):
        raise CubeFormatError(f"{path}: label maps are read from the cube's HDF5 file; this cube is not HDF5")
    f = h5py.File(path, "r")
    if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
        f.close()
        raise CubeFormatError(
            f"{path}: no label dataset '{dataset}' (an H x W integer map of each pixel's class; "
            "set segmentation.label_dataset to its name)"
        )
    return f


def check_label_map(path: PathLike, dataset: str, shape_hw: Tuple[int, int]) -> Dict[int, int]:
    """Validate ``path``'s label map against the cube's ``(height, width)``; returns
    ``{label value: pixel count}``."""
    f = _open(path, dataset)
    try:
        ds = f[dataset]
        if ds.ndim != 2 or tuple(ds.shape) != tuple(shape_hw):
            raise CubeFormatError(
                f"{path}: label dataset '{dataset}' has shape {tuple(ds.shape)}, but the cube is "
                f"{shape_hw[0]} x {shape_hw[1]} (height x width)"
            )
        if not np.issubdtype(ds.dtype, np.integer):
            raise CubeFormatError(f"{path}: label dataset '{dataset}' holds {ds.dtype} values, not integers")
        values, counts = np.unique(ds[()], return_counts=True)
        return {int(v): int(n) for v, n in zip(values, counts)}
    finally:
        f.close()


def label_class_names(path: PathLike, dataset: str) -> Optional[List[str]]:
    """The ``class_names`` attribute of ``path``'s label map, if it has one."""
    f = _open(path, dataset)
    try:
        names = f[dataset].attrs.get(CLASS_NAMES_ATTRIBUTE)
        if names is None:
            return None
        return [n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(names)]
    finally:
        f.close()


def read_labels(path: PathLike, dataset: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Labels of the crop ``[y0:y1, x0:x1]`` as int64 ``[h, w]``."""
    f = _open(path, dataset)
    try:
        return np.asarray(f[dataset][y0:y1, x0:x1], dtype=np.int64)
    finally:
        f.close()

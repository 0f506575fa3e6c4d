"""The train / validation / test split of a cube collection, by whole files.

Validation files come either from a list (``val_files``) or, by default, from a hash of each
cube's *split key*; test files only from a list (``test_files``). Test files are in neither train
nor validation. A list holds entries of three kinds, tried in this order:

* a folder (absolute, or relative to the data directory, then to the working directory): every
  cube in it, which need not be in the data directory (``val/``, ``/data/tiles_2021``);
* a file, looked up the same way (``cube_017.h5``, ``../extra/tile_9.hdr``);
* a glob pattern matched against the names and the stems of the data directory's cubes
  (``tile_0*``, ``*_val``, ``scene_12``): a stem matches the cube in any format.

An entry that matches nothing is an error naming it.

The hash split: the ``round(n * val_fraction)`` cubes (at least one when ``val_fraction > 0`` and
there are two or more) with the smallest ``sha1(f"{split_seed}:{split key}")`` are the validation
set. The split key is the cube's stem with ``.h5`` appended (:func:`split_key`), so the same cube
stored as ``.h5``, ``.hdf5`` or ENVI (``.hdr`` + data) lands in the same split, and a collection
of ``.h5`` files keeps the split it had when the key was the file name. The validation sets of
increasing fractions are nested, and the split depends on the keys only: not on the listing
order, the training seed or the rank.

A split that leaves the part a run needs empty raises :class:`SplitError`, naming the options
that fill it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from megatron_dchag.data.hyperspectral.discovery import list_cube_files
from megatron_dchag.data.hyperspectral.formats import (
    ENVI_DATA_EXTENSIONS,
    ENVI_HEADER_EXTENSION,
    HDF5_EXTENSIONS,
    CubeFormatError,
    PathLike,
    find_envi_files,
)

SPLITS = ("train", "val", "test", "all")
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test", "all": "whole"}


class SplitError(CubeFormatError):
    """A split option matches no cube, or a split a run needs is empty. Names the options."""


def cube_stem(path: PathLike) -> str:
    """The cube's name without its format's extensions: ``tile_7`` for ``tile_7.h5``, ``tile_7.hdf5``,
    ``tile_7.hdr`` (+ ``tile_7.img``), ``tile_7.img.hdr`` and the data file ``tile_7.img``."""
    name = Path(path).name
    lower = name.lower()
    if lower.endswith(ENVI_HEADER_EXTENSION):
        name = name[: -len(ENVI_HEADER_EXTENSION)]
        lower = name.lower()
    for ext in (*HDF5_EXTENSIONS, *ENVI_DATA_EXTENSIONS[1:]):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


def split_key(path: PathLike) -> str:
    """What the hash split hashes: the stem plus ``.h5`` (an ``.h5`` cube's own file name)."""
    return cube_stem(path) + ".h5"


@dataclass(frozen=True)
class SplitOptions:
    """How a collection is split (``data.val_fraction``, ``data.val_files``, ``data.test_files``)."""

    val_fraction: float = 0.1
    val_files: Optional[Tuple[str, ...]] = None
    test_files: Optional[Tuple[str, ...]] = None
    split_seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        for name in ("val_files", "test_files"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                object.__setattr__(self, name, (os.fspath(value),))
            elif value is not None:
                object.__setattr__(self, name, tuple(os.fspath(v) for v in value))

    def describe(self) -> str:
        """The options as the config words them, e.g. ``data.val_fraction=0.2``."""
        parts = [f"data.val_files={list(self.val_files)}" if self.val_files is not None
                 else f"data.val_fraction={self.val_fraction:g}"]
        if self.test_files is not None:
            parts.append(f"data.test_files={list(self.test_files)}")
        if self.split_seed:
            parts.append(f"split seed {self.split_seed}")
        return ", ".join(parts)

    def to_dict(self) -> Dict[str, object]:
        return {"val_fraction": self.val_fraction,
                "val_files": None if self.val_files is None else list(self.val_files),
                "test_files": None if self.test_files is None else list(self.test_files),
                "split_seed": self.split_seed}


@dataclass(frozen=True)
class FileSplit:
    """The cube files of each split, each in listing order (the data directory's cubes first, then
    those of named folders); ``all`` is every cube of the collection in that order."""

    train: Tuple[Path, ...]
    val: Tuple[Path, ...]
    test: Tuple[Path, ...]
    all: Tuple[Path, ...]
    options: SplitOptions = field(default_factory=SplitOptions)

    def files(self, split: str) -> List[Path]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        return list(getattr(self, split))

    def require(self, split: str, fix: str = "") -> List[Path]:
        """:meth:`files`, or :class:`SplitError` when empty, naming the options and ``fix``."""
        files = self.files(split)
        if files:
            return files
        n = len(self.all)
        if split == "val" and self.options.val_files is None:
            if self.options.val_fraction == 0:
                why = "data.val_fraction=0 holds out no cube"
            else:  # a fraction > 0 holds out at least one cube whenever two or more can be split
                why = f"there {'is' if n == 1 else 'are'} {n} cube{'' if n == 1 else 's'}, which training needs"
            message = (f"the validation split is empty: {why}; set data.val_fraction > 0 with at least 2 cubes, "
                       "or name validation cubes with data.val_files")
        else:
            message = (f"the {SPLIT_NAMES[split]} split is empty: {self.options.describe()} leaves no cube for it "
                       f"({n} cube{'' if n == 1 else 's'} in all)")
        raise SplitError(message + (f", {fix}" if fix else ""))


def _hash_validation(files: Sequence[Path], val_fraction: float, split_seed: int) -> List[Path]:
    n = len(files)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = min(n_val, max(n - 1, 0))
    keys = [hashlib.sha1(f"{split_seed}:{split_key(f)}".encode()).hexdigest() for f in files]
    order = sorted(range(n), key=lambda i: (keys[i], str(files[i])))
    return [files[i] for i in sorted(order[:n_val])]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _named_files(entries: Sequence[str], where: str, listed: Sequence[Path], data_dir: Optional[Path],
                 file_format: str) -> List[Path]:
    """The cubes named by ``entries`` (see the module docstring); listed cubes keep their listed path."""
    chosen: List[Path] = []

    def add(path: Path) -> None:
        for known in listed:  # the same cube as listed (its header, or its data file for ENVI)
            if _same_file(known, path) or (cube_stem(known) == cube_stem(path) and known.parent.resolve()
                                           == path.parent.resolve()):
                path = known
                break
        else:
            if path.suffix.lower() not in (*HDF5_EXTENSIONS, ENVI_HEADER_EXTENSION):
                path = find_envi_files(path)[0]  # an ENVI data file: the cube is its header
        if path not in chosen:
            chosen.append(path)

    for entry in entries:
        given = Path(entry).expanduser()
        candidates = [given] if given.is_absolute() else [*([data_dir / given] if data_dir else []), given]
        found = next((c for c in candidates if c.exists()), None)
        if found is not None and found.is_dir():
            for path in list_cube_files(found, file_format):
                add(path)
            continue
        if found is not None and found.is_file():
            add(found)
            continue
        matches = [p for p in listed if fnmatch.fnmatchcase(p.name, entry) or fnmatch.fnmatchcase(cube_stem(p), entry)]
        if not matches:
            looked = f"'{data_dir}' and the working directory" if data_dir else "the working directory"
            raise SplitError(
                f"{where} entry '{entry}' matches no cube: it is no folder or file (looked in {looked}) and no "
                "cube of data.data_path has that name or stem"
            )
        for path in matches:
            add(path)
    return chosen


def split_collection(
    path_or_files: Union[PathLike, Sequence[PathLike]],
    file_format: str = "auto",
    options: Optional[SplitOptions] = None,
) -> FileSplit:
    """List the cubes of ``path_or_files`` (a data directory, one file or a list) and split them.

    Cubes named by ``options.val_files`` / ``test_files`` outside the data directory join the
    collection in their split. A cube named by both lists is an error.
    """
    options = options or SplitOptions()
    listed = list_cube_files(path_or_files, file_format)
    data_dir: Optional[Path] = None
    if isinstance(path_or_files, (str, os.PathLike)):
        root = Path(path_or_files)
        data_dir = root if root.is_dir() else root.parent
    test = (_named_files(options.test_files, "data.test_files", listed, data_dir, file_format)
            if options.test_files is not None else [])
    if options.val_files is not None:
        val = _named_files(options.val_files, "data.val_files", listed, data_dir, file_format)
        both = [p for p in val if p in test]
        if both:
            raise SplitError(f"{both[0]} is named by both data.val_files and data.test_files; a cube belongs to one split")
    else:
        val = _hash_validation([p for p in listed if p not in test], options.val_fraction, options.split_seed)
    held = set(val) | set(test)
    every = listed + [p for p in [*val, *test] if p not in set(listed)]
    order = {p: i for i, p in enumerate(every)}
    in_order = lambda paths: tuple(sorted(paths, key=order.__getitem__))  # noqa: E731
    train = [p for p in listed if p not in held]
    return FileSplit(train=in_order(train), val=in_order(val), test=in_order(test), all=tuple(every), options=options)


def split_files(files: Sequence[Path], split: str, val_fraction: float, split_seed: int = 0) -> List[Path]:
    """The hash split of a list of files: the ``split`` part (:class:`SplitError` when it is empty)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    result = split_collection(files, options=SplitOptions(val_fraction=val_fraction, split_seed=split_seed))
    return result.files("all") if split == "all" else result.require(split)

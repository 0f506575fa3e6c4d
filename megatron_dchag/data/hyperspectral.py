"""Hyperspectral cube data: the on-disk contract, readers, channel statistics and the dataset.

This module owns everything between a directory of hyperspectral cubes and a normalized
``[c_local, h, w]`` float32 tensor for one tensor-parallel rank:

* **The on-disk contract.** One cube per file.

  - HDF5 (``.h5`` / ``.hdf5``): a 3-D dataset (default name ``cube``), layout ``CHW`` (channels
    first, the recommended layout) or ``HWC``; any integer or float dtype (typically ``uint16``
    or ``float32``). Optional ``wavelengths`` attribute (nm; one value per channel) on the
    dataset or on the file, with an optional ``wavelength_units`` attribute (``nm`` or
    ``micrometers``). Chunking one chunk per channel plane (``chunks=(1, H, W)``) or contiguous
    storage makes a channel slice cost exactly its share of the file.
  - ENVI: a text header (``.hdr``) next to a raw binary file (``.img``, ``.dat``, ``.raw``, ``.bsq``,
    ``.bil``, ``.bip``, ``.bin`` or no extension). Interleave BSQ/BIL/BIP, ENVI data type codes
    1, 2, 3, 4, 5, 12, 13, 14, 15, byte order, header offset, ``wavelength = {...}`` with
    ``wavelength units`` (nanometers or micrometers; converted to nm).

  :func:`write_hdf5_cube` and :func:`write_envi_cube` write that contract (atomically).

* **Readers** (:class:`CubeReader`, :class:`HDF5CubeReader`, :class:`ENVICubeReader`). A reader
  reads *only* the requested channel slice and spatial window (an h5py hyperslab, or a slice of a
  ``np.memmap``); it never loads the whole cube. Each reader counts the bytes it touched
  (``bytes_read``) so tests can show that a TP rank of ``T`` reads ``1/T`` of the data. Any I/O
  failure raises :class:`CubeReadError` naming the file; a file that breaks the contract raises
  :class:`CubeFormatError` naming the file and the field.

* **Channel statistics** (:class:`ChannelStats`, :class:`RunningChannelMoments`). Per-channel
  mean / std (population, ``ddof=0``) / count, plus wavelengths when known, stored as ``.npz`` or
  ``.json`` (see :func:`save_channel_stats` for the exact keys). ``tools/compute_stats.py``
  computes them by streaming.

* **The dataset** (:class:`HyperspectralDataset`). A list of cube files validated up front (same
  channel count everywhere, crop fits, stats match), a deterministic train/val split by file, a
  deterministic random crop that is a pure function of ``(seed, epoch, index)`` and a contiguous
  channel range: the rank's slice, the only channels it ever reads.

Nothing here knows about the model or the trainer; the channel range a rank should read comes
from the model's channel-group plan (``ChannelGroupPlan.rank_channel_range``).
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

HDF5_EXTENSIONS = (".h5", ".hdf5")
ENVI_HEADER_EXTENSION = ".hdr"
ENVI_DATA_EXTENSIONS = ("", ".img", ".dat", ".raw", ".bsq", ".bil", ".bip", ".bin")
LAYOUTS = ("CHW", "HWC")
FILE_FORMATS = ("auto", "hdf5", "envi")
SPLITS = ("train", "val", "all")
CROP_MODES = ("auto", "random", "fixed", "center")
STATS_FORMAT_NAME = "megatron_dchag.channel_stats"
STATS_FORMAT_VERSION = 1

# ENVI ``data type`` codes -> numpy dtypes (complex types 6 and 9 are not supported).
ENVI_DTYPES: Dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int16),
    3: np.dtype(np.int32),
    4: np.dtype(np.float32),
    5: np.dtype(np.float64),
    12: np.dtype(np.uint16),
    13: np.dtype(np.uint32),
    14: np.dtype(np.int64),
    15: np.dtype(np.uint64),
}
ENVI_INTERLEAVES = ("bsq", "bil", "bip")


class CubeFormatError(ValueError):
    """A cube file (or statistics file) does not satisfy the data contract. Names the file."""


class CubeReadError(OSError):
    """Reading a cube file failed (missing, truncated or corrupt file). Names the file."""


# ------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------


def _wavelength_scale_to_nm(units: Optional[str], values: np.ndarray, where: str) -> Optional[float]:
    """Factor converting wavelengths in ``units`` to nm; None when they are band indices, not wavelengths.

    Unknown or missing units are guessed from the values: a maximum below 100 can only be
    micrometers for optical sensors, otherwise nanometers.
    """
    if units is not None:
        u = units.strip().lower().replace("\u00b5", "u").replace("\u03bc", "u")
        if u in ("nm", "nanometer", "nanometers", "nanometre", "nanometres"):
            return 1.0
        if u in ("um", "micrometer", "micrometers", "micrometre", "micrometres", "micron", "microns"):
            return 1000.0
        if u == "index":
            return None
        if u not in ("", "unknown"):
            raise CubeFormatError(f"{where}: wavelength units {units!r} are not nm or micrometers")
    return 1000.0 if values.size and float(np.nanmax(values)) < 100.0 else 1.0


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _as_str(value.item())
    return str(value)


class CubeReader(abc.ABC):
    """Random access to one hyperspectral cube ``[C, H, W]`` stored in one file.

    ``read(c0, c1, y0, y1, x0, x1)`` returns channels ``[c0, c1)`` of the window
    ``[y0, y1) x [x0, x1)`` as a C-contiguous float32 array ``[c1 - c0, y1 - y0, x1 - x0]`` and reads
    nothing else. Counters: ``bytes_read`` (bytes of stored data the reads touched, see each
    implementation), ``bytes_selected`` (bytes of the selected elements at the stored dtype) and
    ``num_reads``.

    File handles are opened lazily on the first read and are not pickled, so a reader (and a
    dataset holding readers) can be sent to DataLoader worker processes; a reader used in a forked
    child opens its own handle.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.bytes_read = 0
        self.bytes_selected = 0
        self.num_reads = 0
        self._owner_pid: Optional[int] = None

    # -- metadata ----------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` whatever the storage layout."""

    @property
    @abc.abstractmethod
    def wavelengths(self) -> Optional[np.ndarray]:
        """Per-channel center wavelengths in nm (float64 ``[C]``), or None when the file has none."""

    @property
    @abc.abstractmethod
    def dtype(self) -> np.dtype:
        """Stored element type."""

    @property
    def num_channels(self) -> int:
        return self.shape[0]

    @property
    def height(self) -> int:
        return self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[2]

    # -- reading -----------------------------------------------------------------------------
    def read(self, channel_start: int, channel_stop: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Channels ``[channel_start, channel_stop)`` of window ``[y0, y1) x [x0, x1)`` as float32 ``[c, h, w]``."""
        c, h, w = self.shape
        for name, lo, hi, size in (
            ("channel", channel_start, channel_stop, c),
            ("row", y0, y1, h),
            ("column", x0, x1, w),
        ):
            if not (0 <= lo < hi <= size):
                raise ValueError(
                    f"{self.path}: {name} range [{lo}, {hi}) is empty or outside the cube "
                    f"(cube shape C x H x W = {c} x {h} x {w})"
                )
        if self._owner_pid != os.getpid():
            # First read, or a forked child: never reuse a handle opened by another process.
            self._drop_handles()
            self._owner_pid = os.getpid()
        block = self._read_block(channel_start, channel_stop, y0, y1, x0, x1)
        expected = (channel_stop - channel_start, y1 - y0, x1 - x0)
        if block.shape != expected:
            raise CubeReadError(f"{self.path}: read returned shape {block.shape}, expected {expected}")
        self.num_reads += 1
        self.bytes_selected += int(np.prod(expected)) * self.dtype.itemsize
        return np.ascontiguousarray(block, dtype=np.float32)

    def read_channels(self, channel_start: int, channel_stop: int) -> np.ndarray:
        """Channels ``[channel_start, channel_stop)`` over the full spatial extent."""
        return self.read(channel_start, channel_stop, 0, self.height, 0, self.width)

    def reset_counters(self) -> None:
        self.bytes_read = self.bytes_selected = self.num_reads = 0

    @abc.abstractmethod
    def _read_block(self, c0: int, c1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Return the block as ``[c, h, w]`` (any dtype) and add to ``self.bytes_read``."""

    @abc.abstractmethod
    def _drop_handles(self) -> None:
        """Forget open handles without closing them (they may belong to another process)."""

    def close(self) -> None:
        self._drop_handles()
        self._owner_pid = None

    def __enter__(self) -> "CubeReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_owner_pid"] = None
        for key in self._handle_attributes():
            state[key] = None
        return state

    def _handle_attributes(self) -> Tuple[str, ...]:
        return ()

    def __repr__(self) -> str:
        c, h, w = self.shape
        return f"{type(self).__name__}({str(self.path)!r}, C={c}, H={h}, W={w}, dtype={self.dtype})"


class _CountingFileIO(io.FileIO):
    """A raw file that counts the bytes the HDF5 library actually reads through it."""

    def __init__(self, path: PathLike):
        super().__init__(os.fspath(path), "r")
        self.bytes_read = 0

    def readinto(self, buffer: Any) -> Optional[int]:  # type: ignore[override]
        n = super().readinto(buffer)
        self.bytes_read += n or 0
        return n

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        data = super().read(size)
        self.bytes_read += len(data or b"")
        return data


class HDF5CubeReader(CubeReader):
    """One cube in one HDF5 file, read with h5py hyperslabs.

    ``bytes_read`` counts the stored bytes a read touches: the selected elements for contiguous
    storage, whole chunks (uncompressed size) for chunked storage, because HDF5 reads whole chunks.
    With ``count_file_io=True`` the file is opened through a counting Python file object and
    ``file_bytes_read`` is the number of bytes the HDF5 library really read from the file
    (metadata included); slower, meant for tests and diagnostics.
    """

    def __init__(
        self,
        path: PathLike,
        dataset_name: str = "cube",
        layout: str = "CHW",
        count_file_io: bool = False,
    ):
        super().__init__(path)
        layout = layout.upper()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
        self.dataset_name = dataset_name
        self.layout = layout
        self.count_file_io = count_file_io
        self.file_bytes_read = 0
        self._file: Any = None
        self._dataset: Any = None
        self._raw: Optional[_CountingFileIO] = None
        self._shape, self._dtype, self._chunks, self._wavelengths = self._read_metadata()

    def _open(self) -> Any:
        import h5py

        if not self.path.is_file():
            raise CubeReadError(f"{self.path}: HDF5 cube file does not exist")
        try:
            if self.count_file_io:
                self._raw = _CountingFileIO(self.path)
                return h5py.File(self._raw, "r")
            return h5py.File(self.path, "r")
        except OSError as err:
            if self._raw is not None:
                self._raw.close()
                self._raw = None
            raise CubeReadError(f"{self.path}: cannot open HDF5 file (truncated or corrupt?): {err}") from err

    def _read_metadata(self) -> Tuple[Tuple[int, int, int], np.dtype, Optional[Tuple[int, ...]], Optional[np.ndarray]]:
        f = self._open()
        try:
            if self.dataset_name not in f:
                names: List[str] = []
                f.visit(names.append)
                raise CubeFormatError(
                    f"{self.path}: no dataset named {self.dataset_name!r} (found: {names}); "
                    "set data.dataset_name"
                )
            ds = f[self.dataset_name]
            if not hasattr(ds, "shape") or len(ds.shape) != 3:
                raise CubeFormatError(
                    f"{self.path}: dataset {self.dataset_name!r} must be 3-D ({self.layout}), "
                    f"got shape {getattr(ds, 'shape', None)}"
                )
            dtype = np.dtype(ds.dtype)
            if dtype.kind not in "uif":
                raise CubeFormatError(
                    f"{self.path}: dataset {self.dataset_name!r} has dtype {dtype}; expected an integer or float type"
                )
            s = tuple(int(v) for v in ds.shape)
            shape = (s[0], s[1], s[2]) if self.layout == "CHW" else (s[2], s[0], s[1])
            wavelengths = None
            for obj in (ds, f):
                for key in ("wavelengths", "wavelength"):
                    if key in obj.attrs:
                        values = np.asarray(obj.attrs[key], dtype=np.float64).reshape(-1)
                        units = None
                        for ukey in ("wavelength_units", "wavelength units", "units"):
                            if ukey in obj.attrs:
                                units = _as_str(obj.attrs[ukey])
                                break
                        scale = _wavelength_scale_to_nm(units, values, f"{self.path}: attribute {key!r}")
                        wavelengths = None if scale is None else values * scale
                        break
                if wavelengths is not None:
                    break
            if wavelengths is not None and wavelengths.size != shape[0]:
                raise CubeFormatError(
                    f"{self.path}: the wavelengths attribute has {wavelengths.size} values but the cube "
                    f"has {shape[0]} channels"
                )
            chunks = tuple(int(v) for v in ds.chunks) if ds.chunks is not None else None
            return shape, dtype, chunks, wavelengths
        except (KeyError, RuntimeError, OSError) as err:
            raise CubeReadError(f"{self.path}: cannot read HDF5 metadata: {err}") from err
        finally:
            f.close()
            if self._raw is not None:
                self.file_bytes_read += self._raw.bytes_read
                self._raw.close()
                self._raw = None

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def wavelengths(self) -> Optional[np.ndarray]:
        return None if self._wavelengths is None else self._wavelengths.copy()

    @property
    def chunks(self) -> Optional[Tuple[int, ...]]:
        """Chunk shape in storage order, or None for contiguous storage."""
        return self._chunks

    def _handle_attributes(self) -> Tuple[str, ...]:
        return ("_file", "_dataset", "_raw")

    def _drop_handles(self) -> None:
        self._file = self._dataset = self._raw = None

    def close(self) -> None:
        if self._file is not None and self._owner_pid == os.getpid():
            self._file.close()
            if self._raw is not None:
                self._raw.close()
        super().close()

    def _storage_bytes(self, selection: Tuple[slice, slice, slice]) -> int:
        item = self._dtype.itemsize
        if self._chunks is None:
            return int(np.prod([s.stop - s.start for s in selection])) * item
        touched = 1
        for s, chunk in zip(selection, self._chunks):
            touched *= (s.stop - 1) // chunk - s.start // chunk + 1
        return touched * int(np.prod(self._chunks)) * item

    def _read_block(self, c0: int, c1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._file is None:
            self._file = self._open()
            self._dataset = self._file[self.dataset_name]
        if self.layout == "CHW":
            selection = (slice(c0, c1), slice(y0, y1), slice(x0, x1))
        else:
            selection = (slice(y0, y1), slice(x0, x1), slice(c0, c1))
        before = self._raw.bytes_read if self._raw is not None else 0
        try:
            block = self._dataset[selection]
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise CubeReadError(
                f"{self.path}: reading dataset {self.dataset_name!r} channels [{c0}, {c1}) window "
                f"rows [{y0}, {y1}) cols [{x0}, {x1}) failed (truncated or corrupt file?): {err}"
            ) from err
        if self._raw is not None:
            self.file_bytes_read += self._raw.bytes_read - before
        self.bytes_read += self._storage_bytes(selection)
        return block if self.layout == "CHW" else block.transpose(2, 0, 1)


def parse_envi_header(path: PathLike) -> Dict[str, str]:
    """Parse an ENVI ``.hdr`` file into ``{lower-case key: raw value}``; ``{...}`` values may span lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise CubeReadError(f"{path}: cannot read ENVI header: {err}") from err
    lines = text.splitlines()
    if not lines or not lines[0].strip().upper().startswith("ENVI"):
        raise CubeFormatError(f"{path}: not an ENVI header (the first line must be 'ENVI')")
    header: Dict[str, str] = {}
    i = 1
    while i < len(lines):
        line = lines[i]
        i += 1
        if "=" not in line or line.lstrip().startswith(";"):
            continue
        key, value = line.split("=", 1)
        key = " ".join(key.strip().lower().split())
        value = value.strip()
        if value.startswith("{"):
            while "}" not in value and i < len(lines):
                value += "\n" + lines[i]
                i += 1
            if "}" not in value:
                raise CubeFormatError(f"{path}: unterminated '{{' in ENVI header field {key!r}")
            value = value[1 : value.index("}")].strip()
        header[key] = value
    return header


def _envi_int(header: Mapping[str, str], key: str, path: Path, default: Optional[int] = None) -> int:
    if key not in header:
        if default is None:
            raise CubeFormatError(f"{path}: ENVI header has no {key!r} field")
        return default
    try:
        return int(header[key])
    except ValueError:
        raise CubeFormatError(f"{path}: ENVI header field {key!r} = {header[key]!r} is not an integer") from None


def find_envi_files(path: PathLike) -> Tuple[Path, Path]:
    """``(header, data file)`` for an ENVI cube given either its ``.hdr`` or its data file."""
    path = Path(path)
    if path.suffix.lower() == ENVI_HEADER_EXTENSION:
        header = path
        stem = path.with_suffix("")
        candidates = [stem] if stem.suffix.lower() in ENVI_DATA_EXTENSIONS[1:] else []
        for ext in ENVI_DATA_EXTENSIONS:
            candidates += [Path(str(stem) + ext), Path(str(stem) + ext.upper())]
        for candidate in candidates:
            if candidate.is_file() and candidate != header:
                return header, candidate
        raise CubeReadError(
            f"{header}: no ENVI data file next to the header (looked for {stem.name} with extensions "
            f"{', '.join(e or '(none)' for e in ENVI_DATA_EXTENSIONS)})"
        )
    for header in (Path(str(path) + ".hdr"), path.with_suffix(".hdr"), Path(str(path) + ".HDR"), path.with_suffix(".HDR")):
        if header.is_file():
            return header, path
    raise CubeReadError(f"{path}: no ENVI header (.hdr) found for this data file")


class ENVICubeReader(CubeReader):
    """One ENVI cube (``.hdr`` + raw binary), read through a read-only ``np.memmap``.

    ``bytes_read`` counts the selected elements' bytes. For BSQ and BIL those are exactly the byte
    runs that are read; for BIP a channel slice is strided inside every pixel, so the operating
    system pages in the whole window whatever the channel slice (prefer BSQ for channel-sharded
    training).
    """

    def __init__(self, path: PathLike):
        super().__init__(path)
        self.header_path, self.data_path = find_envi_files(path)
        self.path = self.header_path
        header = parse_envi_header(self.header_path)
        self.header = header
        hp = self.header_path
        samples = _envi_int(header, "samples", hp)
        lines = _envi_int(header, "lines", hp)
        bands = _envi_int(header, "bands", hp)
        if min(samples, lines, bands) < 1:
            raise CubeFormatError(f"{hp}: samples={samples}, lines={lines}, bands={bands} must all be >= 1")
        code = _envi_int(header, "data type", hp)
        if code not in ENVI_DTYPES:
            raise CubeFormatError(
                f"{hp}: ENVI data type {code} is not supported (supported codes: {sorted(ENVI_DTYPES)})"
            )
        byte_order = _envi_int(header, "byte order", hp, default=0)
        if byte_order not in (0, 1):
            raise CubeFormatError(f"{hp}: ENVI byte order must be 0 (little endian) or 1 (big endian), got {byte_order}")
        self.header_offset = _envi_int(header, "header offset", hp, default=0)
        self.interleave = header.get("interleave", "bsq").strip().lower()
        if self.interleave not in ENVI_INTERLEAVES:
            raise CubeFormatError(f"{hp}: ENVI interleave {self.interleave!r} must be one of {ENVI_INTERLEAVES}")
        self._dtype = ENVI_DTYPES[code].newbyteorder("<" if byte_order == 0 else ">")
        self._shape = (bands, lines, samples)
        self._storage_shape = {
            "bsq": (bands, lines, samples),
            "bil": (lines, bands, samples),
            "bip": (lines, samples, bands),
        }[self.interleave]
        expected = self.header_offset + bands * lines * samples * self._dtype.itemsize
        try:
            actual = self.data_path.stat().st_size
        except OSError as err:
            raise CubeReadError(f"{self.data_path}: cannot stat ENVI data file: {err}") from err
        if actual < expected:
            raise CubeReadError(
                f"{self.data_path}: ENVI data file is truncated: {actual} bytes, the header {hp.name} "
                f"describes {expected} bytes ({bands} bands x {lines} lines x {samples} samples x "
                f"{self._dtype.itemsize} bytes + {self.header_offset} header offset)"
            )
        if actual > expected:
            raise CubeFormatError(
                f"{self.data_path}: ENVI data file has {actual} bytes but the header {hp.name} describes "
                f"{expected} bytes; check 'data type', 'header offset' and the dimensions"
            )
        self._wavelengths = None
        if "wavelength" in header:
            try:
                values = np.array([float(v) for v in header["wavelength"].replace("\n", " ").split(",") if v.strip()])
            except ValueError:
                raise CubeFormatError(f"{hp}: ENVI 'wavelength' field is not a list of numbers") from None
            if values.size != bands:
                raise CubeFormatError(f"{hp}: ENVI 'wavelength' has {values.size} values but bands = {bands}")
            scale = _wavelength_scale_to_nm(header.get("wavelength units"), values, f"{hp}: 'wavelength units'")
            self._wavelengths = None if scale is None else values * scale
        self._memmap: Optional[np.memmap] = None

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def wavelengths(self) -> Optional[np.ndarray]:
        return None if self._wavelengths is None else self._wavelengths.copy()

    def _handle_attributes(self) -> Tuple[str, ...]:
        return ("_memmap",)

    def _drop_handles(self) -> None:
        self._memmap = None

    def _read_block(self, c0: int, c1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            if self._memmap is None:
                self._memmap = np.memmap(
                    self.data_path, dtype=self._dtype, mode="r", offset=self.header_offset, shape=self._storage_shape
                )
            mm = self._memmap
            if self.interleave == "bsq":
                block = np.array(mm[c0:c1, y0:y1, x0:x1])
            elif self.interleave == "bil":
                block = np.array(mm[y0:y1, c0:c1, x0:x1]).transpose(1, 0, 2)
            else:
                block = np.array(mm[y0:y1, x0:x1, c0:c1]).transpose(2, 0, 1)
        except (OSError, ValueError) as err:
            raise CubeReadError(
                f"{self.data_path}: reading ENVI channels [{c0}, {c1}) window rows [{y0}, {y1}) "
                f"cols [{x0}, {x1}) failed: {err}"
            ) from err
        self.bytes_read += block.size * self._dtype.itemsize
        return block


def detect_file_format(path: PathLike) -> str:
    """``"hdf5"`` or ``"envi"`` from the file extension (``.hdr`` means ENVI)."""
    suffix = Path(path).suffix.lower()
    if suffix in HDF5_EXTENSIONS:
        return "hdf5"
    if suffix == ENVI_HEADER_EXTENSION or suffix in ENVI_DATA_EXTENSIONS[1:]:
        return "envi"
    raise CubeFormatError(
        f"{path}: cannot tell the cube format from the extension {suffix!r} "
        f"(HDF5: {HDF5_EXTENSIONS}, ENVI: {ENVI_HEADER_EXTENSION}); set data.file_format"
    )


def open_cube(
    path: PathLike,
    file_format: str = "auto",
    dataset_name: str = "cube",
    layout: str = "CHW",
    count_file_io: bool = False,
) -> CubeReader:
    """Open a cube file with the reader for its format (``auto``: by extension)."""
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format={file_format!r} must be one of {FILE_FORMATS}")
    fmt = detect_file_format(path) if file_format == "auto" else file_format
    if fmt == "hdf5":
        return HDF5CubeReader(path, dataset_name=dataset_name, layout=layout, count_file_io=count_file_io)
    return ENVICubeReader(path)


# ------------------------------------------------------------------------------------------------
# Writers (the same contract, written atomically)
# ------------------------------------------------------------------------------------------------


def _atomic_target(path: Path) -> Tuple[int, str]:
    """A temporary file next to ``path`` (same file system, so ``os.replace`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _publish(tmp: str, path: Path) -> None:
    """Give ``tmp`` the permissions of a normally created file (mkstemp makes it 0600), then rename."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_hdf5_cube(
    path: PathLike,
    cube_chw: np.ndarray,
    wavelengths: Optional[Sequence[float]] = None,
    dataset_name: str = "cube",
    layout: str = "CHW",
    chunks: Union[str, Tuple[int, int, int], None] = "channel",
    compression: Optional[str] = None,
    attrs: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``cube_chw`` ``[C, H, W]`` as one HDF5 cube file (temp file + ``os.replace``).

    ``chunks``: ``"channel"`` (one chunk per channel plane, ``(1, H, W)`` for CHW and ``(H, W, 1)``
    for HWC: a channel slice reads exactly its share), ``"contiguous"`` / None (no chunking), or an
    explicit chunk shape in storage order. ``wavelengths`` (nm) go into the dataset's
    ``wavelengths`` attribute with ``wavelength_units = "nm"``.
    """
    import h5py

    path = Path(path)
    layout = layout.upper()
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if cube_chw.ndim != 3:
        raise ValueError(f"cube must be [C, H, W], got shape {cube_chw.shape}")
    c, h, w = cube_chw.shape
    data = cube_chw if layout == "CHW" else np.ascontiguousarray(cube_chw.transpose(1, 2, 0))
    if chunks == "channel":
        chunk_shape: Optional[Tuple[int, int, int]] = (1, h, w) if layout == "CHW" else (h, w, 1)
    elif chunks in ("contiguous", None):
        chunk_shape = None
    elif isinstance(chunks, str):
        raise ValueError(f"chunks={chunks!r} must be 'channel', 'contiguous' or a chunk shape")
    else:
        chunk_shape = tuple(int(v) for v in chunks)  # type: ignore[assignment]
    if compression is not None and chunk_shape is None:
        raise ValueError("compression needs chunked storage (chunks='channel' or a chunk shape)")
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset(dataset_name, data=data, chunks=chunk_shape, compression=compression)
            ds.attrs["layout"] = layout
            if wavelengths is not None:
                wl = np.asarray(wavelengths, dtype=np.float64)
                if wl.size != c:
                    raise ValueError(f"got {wl.size} wavelengths for {c} channels")
                ds.attrs["wavelengths"] = wl
                ds.attrs["wavelength_units"] = "nm"
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_envi_cube(
    header_path: PathLike,
    cube_chw: np.ndarray,
    wavelengths: Optional[Sequence[float]] = None,
    interleave: str = "bsq",
    byte_order: int = 0,
    header_offset: int = 0,
    data_extension: str = ".img",
    wavelength_units: str = "Nanometers",
    description: str = "megatron_dchag hyperspectral cube",
) -> Tuple[Path, Path]:
    """Write ``cube_chw`` ``[C, H, W]`` as ENVI (``.hdr`` + binary); returns ``(header, data file)``.

    The data type code follows the array's dtype (uint8, int16, int32, float32, float64, uint16,
    ...). ``wavelengths`` are given in nm and written in ``wavelength_units`` (Nanometers or
    Micrometers). ``header_offset`` bytes of zeros precede the data. Both files are written to
    temporary names first and renamed (data first, header last).
    """
    header_path = Path(header_path)
    if header_path.suffix.lower() != ENVI_HEADER_EXTENSION:
        raise ValueError(f"{header_path}: the ENVI header path must end in .hdr")
    interleave = interleave.lower()
    if interleave not in ENVI_INTERLEAVES:
        raise ValueError(f"interleave={interleave!r} must be one of {ENVI_INTERLEAVES}")
    if byte_order not in (0, 1):
        raise ValueError(f"byte_order={byte_order} must be 0 (little endian) or 1 (big endian)")
    codes = {dt.str[1:]: code for code, dt in ENVI_DTYPES.items()}
    dtype = np.dtype(cube_chw.dtype)
    key = dtype.newbyteorder("<").str[1:]
    if key not in codes:
        raise ValueError(f"dtype {dtype} has no ENVI data type code (supported: {sorted(codes)})")
    c, h, w = cube_chw.shape
    storage = {"bsq": (0, 1, 2), "bil": (1, 0, 2), "bip": (1, 2, 0)}[interleave]
    data = np.ascontiguousarray(cube_chw.transpose(storage)).astype(dtype.newbyteorder("<" if byte_order == 0 else ">"))
    data_path = header_path.with_suffix(data_extension)
    lines = [
        "ENVI",
        f"description = {{{description}}}",
        f"samples = {w}",
        f"lines = {h}",
        f"bands = {c}",
        f"header offset = {header_offset}",
        "file type = ENVI Standard",
        f"data type = {codes[key]}",
        f"interleave = {interleave}",
        f"byte order = {byte_order}",
    ]
    if wavelengths is not None:
        wl = np.asarray(wavelengths, dtype=np.float64)
        if wl.size != c:
            raise ValueError(f"got {wl.size} wavelengths for {c} channels")
        units = wavelength_units.strip().lower()
        if units not in ("nanometers", "nm", "micrometers", "um"):
            raise ValueError(f"wavelength_units={wavelength_units!r} must be Nanometers or Micrometers")
        scale = 1.0 if units in ("nanometers", "nm") else 1e-3
        lines.append(f"wavelength units = {wavelength_units}")
        lines.append("wavelength = {" + ", ".join(f"{v * scale:.10g}" for v in wl) + "}")
    tmp_data: Optional[str] = None
    tmp_header: Optional[str] = None
    try:
        fd, tmp_data = _atomic_target(data_path)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * header_offset)
            data.tofile(f)
        _publish(tmp_data, data_path)
        fd, tmp_header = _atomic_target(header_path)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        _publish(tmp_header, header_path)
    except BaseException:
        for tmp in (tmp_data, tmp_header):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return header_path, data_path


# ------------------------------------------------------------------------------------------------
# Channel statistics
# ------------------------------------------------------------------------------------------------


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
    fd, tmp = _atomic_target(path)
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
        _publish(tmp, path)
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


# ------------------------------------------------------------------------------------------------
# File discovery, validation and split
# ------------------------------------------------------------------------------------------------


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


def split_files(files: Sequence[Path], split: str, val_fraction: float, split_seed: int = 0) -> List[Path]:
    """Deterministic train/val split by file.

    The ``round(n * val_fraction)`` files (at least one when ``val_fraction > 0`` and there are at
    least two files) with the smallest ``sha1(split_seed, file name)`` form the validation set. The
    result depends on the file names only: not on listing order, the training seed or the rank.
    Returned in the input order.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if split == "all":
        return list(files)
    n = len(files)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = min(n_val, max(n - 1, 0))
    keys = [hashlib.sha1(f"{split_seed}:{Path(f).name}".encode()).hexdigest() for f in files]
    val_ids = set(sorted(range(n), key=lambda i: (keys[i], str(files[i])))[:n_val])
    chosen = [f for i, f in enumerate(files) if (i in val_ids) == (split == "val")]
    if not chosen:
        raise ValueError(
            f"split={split!r} is empty: {n} files with val_fraction={val_fraction} gives {n_val} validation files"
        )
    return chosen


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


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


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
    every epoch), ``"center"``; ``"auto"`` is ``fixed`` for the val split (the same validation
    crops at every evaluation) and ``random`` otherwise.

    ``dataset[idx]`` uses the epoch set by :meth:`set_epoch`; ``dataset[(epoch, idx)]`` uses the
    given epoch (what :class:`~megatron_dchag.data.sampler.DistributedResumableSampler` yields with
    ``yield_epoch=True``, so DataLoader worker processes need no ``set_epoch``).

    Returns ``{"image": float32 [c_local, h, w], "wavelengths": float32 [c_local] (empty ``[0]``
    when the data has none), "index": idx, "epoch": epoch}``. The image is normalized per channel
    with ``stats_file`` (``(x - mean) / std`` of the rank's channels) when given, raw values cast to
    float32 otherwise.
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
    ):
        super().__init__()
        crop_h, crop_w = (int(v) for v in crop_size)
        if crop_h < 1 or crop_w < 1:
            raise ValueError(f"crop_size={tuple(crop_size)} must be positive")
        if crop not in CROP_MODES:
            raise ValueError(f"crop={crop!r} must be one of {CROP_MODES}")
        if samples_per_file < 1:
            raise ValueError(f"samples_per_file={samples_per_file} must be >= 1")
        all_files = list_cube_files(path_or_dir, file_format)
        # Validate every file (both splits), so train and val agree on the contract.
        collection = scan_cubes(
            all_files,
            file_format=file_format,
            dataset_name=dataset_name,
            layout=layout,
            num_channels_expected=num_channels_expected,
            min_spatial_shape=(crop_h, crop_w),
        )
        chosen = set(split_files(collection.files, split, val_fraction, split_seed))
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
        self.crop_mode = ("fixed" if split == "val" else "random") if crop == "auto" else crop
        self.samples_per_file = samples_per_file
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
        if self._mean is not None:
            block -= self._mean
            block *= self._inv_std
        return {
            "image": torch.from_numpy(block),
            "wavelengths": self._local_wavelengths.clone(),
            "index": index,
            "epoch": epoch,
        }

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def __repr__(self) -> str:
        return (
            f"HyperspectralDataset(split={self.split!r}, files={len(self.readers)}, samples={len(self)}, "
            f"channels={self.channel_range[0]}:{self.channel_range[1]} of {self.num_channels}, "
            f"crop={self.crop_size[0]}x{self.crop_size[1]} ({self.crop_mode}))"
        )

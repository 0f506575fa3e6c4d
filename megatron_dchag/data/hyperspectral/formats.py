"""Hyperspectral cube files: the on-disk contract, its readers and writers, and the error types.

* **The on-disk contract.** One cube per file.

  - HDF5 (``.h5`` / ``.hdf5``): a 3-D dataset (default name ``cube``), layout ``CHW`` (channels
    first, the recommended layout) or ``HWC``; any integer or float dtype (typically ``uint16``
    or ``float32``). Optional ``wavelengths`` attribute (nm; one value per channel) on the
    dataset or on the file, with an optional ``wavelength_units`` attribute (``nm`` or
    ``micrometers``). Chunking one chunk per channel plane (``chunks=(1, H, W)``) or contiguous
    storage makes a channel slice cost exactly its share of the file. Optional no-data value: a
    fill-value attribute (:data:`HDF5_NODATA_ATTRIBUTES`, e.g. ``_FillValue`` or ``nodata``) on the
    dataset or the file; optional ``reflectance_scale_factor`` attribute (ENVI's meaning, below).
  - ENVI: a text header (``.hdr``) next to a raw binary file (``.img``, ``.dat``, ``.raw``, ``.bsq``,
    ``.bil``, ``.bip``, ``.bin`` or no extension). Interleave BSQ/BIL/BIP, ENVI data type codes
    1, 2, 3, 4, 5, 12, 13, 14, 15, byte order, header offset, ``wavelength = {...}`` with
    ``wavelength units`` (nanometers or micrometers; converted to nm), ``data ignore value`` (the
    no-data value) and ``reflectance scale factor``.
  - Values as read: ``stored / reflectance scale factor`` in float32 (``stored`` when there is no
    factor), and NaN wherever the stored value equals the no-data value (compared before scaling,
    in the stored type). NaN and infinities stored in float cubes stay as they are. The same
    stored data and metadata therefore read bit-identically from HDF5 and from ENVI.

  :func:`write_hdf5_cube` and :func:`write_envi_cube` write that contract (atomically).

* **Readers** (:class:`CubeReader`, :class:`HDF5CubeReader`, :class:`ENVICubeReader`, opened by
  :func:`open_cube`). A reader reads *only* the requested channel slice and spatial window (an
  h5py hyperslab, or a slice of a ``np.memmap``); it never loads the whole cube. Each reader
  counts the bytes it touched (``bytes_read``) so tests can show that a TP rank of ``T`` reads
  ``1/T`` of the data. :meth:`CubeReader.read_with_nodata` also returns where the file's no-data
  value was found (statistics count it apart from stored NaN). Any I/O failure raises :class:`CubeReadError` naming the file; a file that
  breaks the contract raises :class:`CubeFormatError` naming the file and the field.

This is the format layer only: which files form a collection lives in
:mod:`~megatron_dchag.data.hyperspectral.discovery`, the samples in
:mod:`~megatron_dchag.data.hyperspectral.dataset`.
"""

from __future__ import annotations

import abc
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

HDF5_EXTENSIONS = (".h5", ".hdf5")
ENVI_HEADER_EXTENSION = ".hdr"
ENVI_DATA_EXTENSIONS = ("", ".img", ".dat", ".raw", ".bsq", ".bil", ".bip", ".bin")
LAYOUTS = ("CHW", "HWC")
FILE_FORMATS = ("auto", "hdf5", "envi")

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
# Attributes (on the dataset, else on the file) that hold an HDF5 cube's no-data value, first match wins.
HDF5_NODATA_ATTRIBUTES = ("_FillValue", "fill_value", "FillValue", "missing_value", "nodata", "no_data_value",
                          "NoDataValue", "data_ignore_value", "data ignore value")
# Attributes that hold an HDF5 cube's reflectance scale factor (ENVI's meaning: divide by it).
HDF5_SCALE_ATTRIBUTES = ("reflectance_scale_factor", "reflectance scale factor")


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


def _metadata_number(value: Any, where: str) -> float:
    """A numeric metadata value (a number, a one-element array, or its text) as a float."""
    try:
        array = np.asarray(_as_str(value) if isinstance(value, bytes) else value).reshape(-1)
        if array.size != 1:
            raise ValueError
        item = array[0]
        return float(item.decode() if isinstance(item, bytes) else item)
    except (TypeError, ValueError):
        raise CubeFormatError(f"{where} = {value!r} is not a number") from None


def _scale_factor(value: Any, where: str) -> float:
    factor = _metadata_number(value, where)
    if not (np.isfinite(factor) and factor > 0):
        raise CubeFormatError(f"{where} = {factor!r} must be a finite number > 0")
    return factor


def stored_value_mask(raw: np.ndarray, value: float) -> Optional[np.ndarray]:
    """Where ``raw`` (stored dtype) equals ``value`` as that dtype stores it; None when it cannot occur.

    Float cubes compare with ``value`` rounded to the stored precision (a ``-9999.0`` fill value
    of a float32 cube is ``float32(-9999)``); a NaN value is no extra marker (NaN is always
    no-data). Integer cubes compare only with an integral value inside the dtype's range.
    """
    dtype = raw.dtype
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            target = np.array(value, dtype=np.float64).astype(dtype)
        if np.isnan(target):
            return None
        return raw == target
    info = np.iinfo(dtype)
    if not (float(value).is_integer() and info.min <= value <= info.max):
        return None
    return raw == dtype.type(int(value))


class CubeReader(abc.ABC):
    """Random access to one hyperspectral cube ``[C, H, W]`` stored in one file.

    ``read(c0, c1, y0, y1, x0, x1)`` returns channels ``[c0, c1)`` of the window
    ``[y0, y1) x [x0, x1)`` as a C-contiguous float32 array ``[c1 - c0, y1 - y0, x1 - x0]`` and reads
    nothing else: stored values divided by :attr:`scale_factor` (when the file gives one), NaN where
    they equal :attr:`nodata_value` (when it declares one). Counters: ``bytes_read`` (bytes of stored data the reads touched, see each
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
        # The file's no-data value in stored units (HDF5 fill-value attribute, ENVI ``data ignore
        # value``) and its reflectance scale factor; None: the file declares none.
        self.nodata_value: Optional[float] = None
        self.scale_factor: Optional[float] = None

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
        return self.read_with_nodata(channel_start, channel_stop, y0, y1, x0, x1)[0]

    def read_with_nodata(
        self, channel_start: int, channel_stop: int, y0: int, y1: int, x0: int, x1: int
    ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """:meth:`read`, plus a boolean ``[c, h, w]`` array that is True where the stored value was the
        file's no-data value (those values read as NaN), or None where it was nowhere."""
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
        nodata = None if self.nodata_value is None else stored_value_mask(block, self.nodata_value)
        if nodata is not None and not nodata.any():
            nodata = None
        values = np.ascontiguousarray(block, dtype=np.float32)
        if self.scale_factor is not None:  # in place: the block is this read's own array
            values /= np.float32(self.scale_factor)
        if nodata is not None:
            values[nodata] = np.nan
        return values, nodata

    def read_channels(self, channel_start: int, channel_stop: int) -> np.ndarray:
        """Channels ``[channel_start, channel_stop)`` over the full spatial extent."""
        return self.read(channel_start, channel_stop, 0, self.height, 0, self.width)

    def reset_counters(self) -> None:
        self.bytes_read = self.bytes_selected = self.num_reads = 0

    @abc.abstractmethod
    def _read_block(self, c0: int, c1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Return the block as a new array ``[c, h, w]`` (any dtype; never a view of a file mapping)
        and add to ``self.bytes_read``."""

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
            self.nodata_value = self._first_attribute(ds, f, HDF5_NODATA_ATTRIBUTES, _metadata_number)
            self.scale_factor = self._first_attribute(ds, f, HDF5_SCALE_ATTRIBUTES, _scale_factor)
            return shape, dtype, chunks, wavelengths
        except (KeyError, RuntimeError, OSError) as err:
            raise CubeReadError(f"{self.path}: cannot read HDF5 metadata: {err}") from err
        finally:
            f.close()
            if self._raw is not None:
                self.file_bytes_read += self._raw.bytes_read
                self._raw.close()
                self._raw = None

    def _first_attribute(self, ds: Any, f: Any, names: Sequence[str], parse: Any) -> Optional[float]:
        """The first of ``names`` found on the dataset, else on the file, parsed; None if absent."""
        for obj, where in ((ds, f"dataset {self.dataset_name!r}"), (f, "the file")):
            for name in names:
                if name in obj.attrs:
                    return parse(obj.attrs[name], f"{self.path}: attribute {name!r} of {where}")
        return None

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
        if header.get("data ignore value", "").strip():
            self.nodata_value = _metadata_number(header["data ignore value"], f"{hp}: ENVI 'data ignore value'")
        if header.get("reflectance scale factor", "").strip():
            self.scale_factor = _scale_factor(header["reflectance scale factor"],
                                              f"{hp}: ENVI 'reflectance scale factor'")
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


def temp_file_beside(path: Path) -> Tuple[int, str]:
    """A temporary file next to ``path`` (same file system, so ``os.replace`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def publish_temp_file(tmp: str, path: Path) -> None:
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
    nodata_value: Optional[float] = None,
    nodata_attribute: str = "_FillValue",
    scale_factor: Optional[float] = None,
) -> Path:
    """Write ``cube_chw`` ``[C, H, W]`` as one HDF5 cube file (temp file + ``os.replace``).

    ``chunks``: ``"channel"`` (one chunk per channel plane, ``(1, H, W)`` for CHW and ``(H, W, 1)``
    for HWC: a channel slice reads exactly its share), ``"contiguous"`` / None (no chunking), or an
    explicit chunk shape in storage order. ``wavelengths`` (nm) go into the dataset's
    ``wavelengths`` attribute with ``wavelength_units = "nm"``. ``attrs`` go on the file;
    ``nodata_value`` goes into the dataset attribute ``nodata_attribute`` (one of
    :data:`HDF5_NODATA_ATTRIBUTES`) in the stored dtype, ``scale_factor`` into
    ``reflectance_scale_factor``.
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
    fd, tmp = temp_file_beside(path)
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
            if nodata_value is not None:
                if nodata_attribute not in HDF5_NODATA_ATTRIBUTES:
                    raise ValueError(f"nodata_attribute={nodata_attribute!r} must be one of {HDF5_NODATA_ATTRIBUTES}")
                ds.attrs[nodata_attribute] = np.array(nodata_value).astype(data.dtype)
            if scale_factor is not None:
                ds.attrs["reflectance_scale_factor"] = float(scale_factor)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        publish_temp_file(tmp, path)
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
    data_ignore_value: Optional[float] = None,
    reflectance_scale_factor: Optional[float] = None,
) -> Tuple[Path, Path]:
    """Write ``cube_chw`` ``[C, H, W]`` as ENVI (``.hdr`` + binary); returns ``(header, data file)``.

    The data type code follows the array's dtype (uint8, int16, int32, float32, float64, uint16,
    ...). ``wavelengths`` are given in nm and written in ``wavelength_units`` (Nanometers or
    Micrometers). ``header_offset`` bytes of zeros precede the data. ``data_ignore_value`` and
    ``reflectance_scale_factor`` become the header fields of those names. Both files are written to
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
    if data_ignore_value is not None:
        lines.append(f"data ignore value = {float(data_ignore_value):.17g}")
    if reflectance_scale_factor is not None:
        lines.append(f"reflectance scale factor = {float(reflectance_scale_factor):.17g}")
    tmp_data: Optional[str] = None
    tmp_header: Optional[str] = None
    try:
        fd, tmp_data = temp_file_beside(data_path)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * header_offset)
            data.tofile(f)
        publish_temp_file(tmp_data, data_path)
        fd, tmp_header = temp_file_beside(header_path)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        publish_temp_file(tmp_header, header_path)
    except BaseException:
        for tmp in (tmp_data, tmp_header):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return header_path, data_path


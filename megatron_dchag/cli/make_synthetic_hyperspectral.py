"""Write synthetic hyperspectral cubes in the project's HDF5 contract (and optionally as ENVI).

Each cube is a linear mixture of four endmember reflectance spectra over 400-900 nm:

* ``vegetation``: low visible reflectance with a green bump near 550 nm and chlorophyll
  absorption near 450 and 675 nm, a steep red edge (680-730 nm) up to a near-infrared plateau;
* ``soil``: a smooth monotone rise with wavelength;
* ``water``: low, decreasing into the near infrared;
* ``shadow``: dark and flat.

Abundances are spatially smooth random fields passed through a softmax (vegetation dominant, as
in plant phenotyping images); a smooth illumination field and a per-cube brightness scale the
mixture; sensor noise is signal dependent (shot + read noise), stronger at the spectral edges.
Values are reflectance (float32) or reflectance x 10000 rounded to uint16 or int16.

Cubes can also carry what real ones do: ``--scale-factor S`` stores reflectance x S as integers
and records S as the reflectance scale factor (HDF5 attribute ``reflectance_scale_factor``, ENVI
``reflectance scale factor``), so that readers return reflectance; ``--nodata-fraction F`` makes
a fraction F of each cube's pixels (whole spectra, at seeded random places) missing: NaN, or
``--nodata-value V`` recorded as the file's no-data value (HDF5 ``--nodata-attribute``, default
``_FillValue``; ENVI ``data ignore value``). The other pixels are the same as without it.

Usage::

    python tools/make_synthetic_hyperspectral.py --out data/synth --num-cubes 8 --channels 500 \
        --height 192 --width 384 --seed 0 [--dtype uint16|int16|float32] [--layout CHW|HWC] \
        [--envi --interleave bsq|bil|bip] [--scale-factor 10000] \
        [--nodata-fraction 0.05 [--nodata-value -9999 [--nodata-attribute _FillValue]]]

(installed as the console script ``dchag-make-synthetic-hyperspectral`` with the same flags).
HDF5 files are ``<out>/cube_00000.h5`` (dataset ``cube``, ``wavelengths`` attribute in nm, and
dataset ``labels``: each pixel's dominant endmember, its index into ``ENDMEMBER_NAMES``, as an
``H x W`` uint8 map whose ``class_names`` attribute lists the names; ``--label-dataset`` renames
it; the cube itself is the same as without it); with
``--envi`` the same cubes are also written as ``<out>/envi/cube_00000.hdr`` + ``.img`` (a separate
directory, so each directory holds one format).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import gaussian_filter

from megatron_dchag.data.hyperspectral.formats import HDF5_NODATA_ATTRIBUTES, write_envi_cube, write_hdf5_cube
from megatron_dchag.data.hyperspectral.labels import CLASS_NAMES_ATTRIBUTE

ENDMEMBER_NAMES: Tuple[str, ...] = ("vegetation", "soil", "water", "shadow")
UINT16_REFLECTANCE_SCALE = 10000.0  # the integer cubes' default reflectance scale
DTYPES = ("uint16", "int16", "float32")


@dataclass
class SyntheticCube:
    """One synthetic cube and the ground truth it was made from."""

    cube: np.ndarray  # [C, H, W], float32 reflectance or integer reflectance x reflectance_scale
    wavelengths: np.ndarray  # [C] nm
    abundances: np.ndarray  # [K, H, W] float32, sums to 1 over K
    endmembers: Dict[str, np.ndarray]  # name -> [C] reflectance (before illumination and noise)
    reflectance_scale: float  # cube value of reflectance 1.0

    @property
    def labels(self) -> np.ndarray:
        """Each pixel's dominant endmember (index into ``ENDMEMBER_NAMES``): uint8 ``[H, W]``."""
        return np.argmax(self.abundances, axis=0).astype(np.uint8)


def band_wavelengths(num_channels: int, wavelength_range: Tuple[float, float] = (400.0, 900.0)) -> np.ndarray:
    """Band centers evenly spaced over ``wavelength_range`` (nm), endpoints included."""
    return np.linspace(wavelength_range[0], wavelength_range[1], num_channels, dtype=np.float64)


def _gauss(x: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - center) / width) ** 2)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def endmember_spectra(wavelengths: np.ndarray, rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
    """Reflectance spectra (0..1) of the four endmembers, with small per-cube variation from ``rng``."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    jitter = (lambda lo, hi: rng.uniform(lo, hi)) if rng is not None else (lambda lo, hi: 0.5 * (lo + hi))
    red_edge = jitter(700.0, 712.0)
    nir_plateau = jitter(0.42, 0.52)
    green = jitter(0.06, 0.10)
    vegetation = (
        0.03
        + green * _gauss(wl, 550.0, 30.0)
        - 0.010 * _gauss(wl, 450.0, 25.0)
        - 0.012 * _gauss(wl, 675.0, 18.0)
        + nir_plateau * _sigmoid((wl - red_edge) / 11.0) * (1.0 - 0.06 * np.clip((wl - 760.0) / 140.0, 0.0, 1.0))
    )
    soil_brightness = jitter(0.8, 1.2)
    soil = soil_brightness * (0.07 + 0.28 * np.clip((wl - 380.0) / 520.0, 0.0, None) ** 0.75)
    water = 0.005 + jitter(0.04, 0.07) * np.exp(-(wl - 400.0) / 120.0)
    shadow = np.full_like(wl, jitter(0.015, 0.025))
    spectra = {"vegetation": vegetation, "soil": soil, "water": water, "shadow": shadow}
    return {k: np.clip(v, 0.002, 1.0) for k, v in spectra.items()}


def _smooth_fields(rng: np.random.Generator, count: int, height: int, width: int, sigma: float) -> np.ndarray:
    """``count`` smooth random fields ``[count, H, W]`` with zero mean and unit std."""
    noise = rng.standard_normal((count, height, width), dtype=np.float32)
    fields = gaussian_filter(noise, sigma=(0.0, sigma, sigma), mode="wrap", truncate=3.0)
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-12
    return fields


def make_cube(
    num_channels: int,
    height: int,
    width: int,
    seed: int = 0,
    dtype: str = "float32",
    wavelength_range: Tuple[float, float] = (400.0, 900.0),
    noise_level: float = 0.004,
    feature_size: Optional[float] = None,
    reflectance_scale: Optional[float] = None,
) -> SyntheticCube:
    """One synthetic cube ``[C, H, W]``; deterministic in ``seed``.

    ``feature_size`` is the smoothing length (pixels) of the abundance maps (default
    ``min(H, W) / 12``). ``noise_level`` is the read-noise std in reflectance units at mid-spectrum.
    ``reflectance_scale``: cube value of reflectance 1 (default 10000 for integer dtypes, 1 for float).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {DTYPES}")
    if min(num_channels, height, width) < 1:
        raise ValueError(f"channels, height and width must be >= 1, got {num_channels}, {height}, {width}")
    rng = np.random.default_rng(seed)
    wl = band_wavelengths(num_channels, wavelength_range)
    spectra = endmember_spectra(wl, rng)
    endmembers = np.stack([spectra[name] for name in ENDMEMBER_NAMES], axis=1).astype(np.float32)  # [C, K]

    sigma = feature_size if feature_size is not None else max(1.0, min(height, width) / 12.0)
    k = len(ENDMEMBER_NAMES)
    logits = _smooth_fields(rng, k, height, width, sigma)
    sharpness = rng.uniform(2.0, 3.5)
    bias = np.array([1.0, 0.0, -0.6, -0.3], dtype=np.float32) + rng.normal(0.0, 0.3, k).astype(np.float32)
    logits = sharpness * logits + bias[:, None, None]
    logits -= logits.max(axis=0, keepdims=True)
    abundances = np.exp(logits)
    abundances /= abundances.sum(axis=0, keepdims=True)

    illumination = 1.0 + 0.12 * _smooth_fields(rng, 1, height, width, 2.0 * sigma)[0]
    illumination = np.clip(illumination, 0.6, 1.4) * np.float32(rng.uniform(0.85, 1.15))

    reflectance = (endmembers @ abundances.reshape(k, -1)).reshape(num_channels, height, width)
    reflectance *= illumination[None]

    # Signal-dependent noise: shot noise ~ sqrt(signal), read noise larger at the spectral edges.
    center, half = 0.5 * (wl[0] + wl[-1]), max(0.5 * (wl[-1] - wl[0]), 1e-6)
    read_sigma = (noise_level * (1.0 + 2.0 * ((wl - center) / half) ** 4)).astype(np.float32)
    variance = np.float32(noise_level * 0.5) * reflectance
    variance += np.square(read_sigma)[:, None, None]
    noise = rng.standard_normal(reflectance.shape, dtype=np.float32)
    noise *= np.sqrt(variance, out=variance)
    reflectance += noise
    np.maximum(reflectance, 0.0, out=reflectance)

    if dtype == "float32":
        scale = 1.0 if reflectance_scale is None else float(reflectance_scale)
        if scale != 1.0:
            reflectance *= np.float32(scale)
        cube = reflectance
    else:
        scale = UINT16_REFLECTANCE_SCALE if reflectance_scale is None else float(reflectance_scale)
        reflectance *= np.float32(scale)
        np.rint(reflectance, out=reflectance)
        np.minimum(reflectance, float(np.iinfo(dtype).max), out=reflectance)
        cube = reflectance.astype(dtype)
    return SyntheticCube(cube=cube, wavelengths=wl, abundances=abundances, endmembers=spectra, reflectance_scale=scale)


def write_dataset(
    out_dir: str | Path,
    num_cubes: int,
    channels: int,
    height: int,
    width: int,
    seed: int = 0,
    dtype: str = "uint16",
    layout: str = "CHW",
    envi: bool = False,
    interleave: str = "bsq",
    chunks: str = "channel",
    compression: Optional[str] = None,
    dataset_name: str = "cube",
    feature_size: Optional[float] = None,
    scale_factor: Optional[float] = None,
    nodata_fraction: float = 0.0,
    nodata_value: Optional[float] = None,
    nodata_attribute: str = "_FillValue",
    label_dataset: str = "labels",
) -> List[Path]:
    """Write ``num_cubes`` cubes to ``out_dir``; returns the HDF5 paths (ENVI copies go to ``out_dir/envi``).

    Cube ``i`` uses seed ``SeedSequence([seed, i])``, so cube ``i`` is the same whatever ``num_cubes``.
    ``scale_factor`` is the stored value of reflectance 1, recorded in both formats; without it the
    integer cubes hold reflectance x 10000 and record no factor. ``nodata_fraction`` of the pixels
    of every cube are missing: ``nodata_value``, recorded (HDF5 attribute ``nodata_attribute``,
    ENVI ``data ignore value``), or NaN when it is None (float32 only). Each HDF5 file also gets
    the per-pixel labels (:attr:`SyntheticCube.labels`) as dataset ``label_dataset``.
    """
    if not 0.0 <= nodata_fraction < 1.0:
        raise ValueError(f"nodata_fraction={nodata_fraction} must be in [0, 1)")
    if nodata_fraction > 0 and nodata_value is None and dtype != "float32":
        raise ValueError(f"missing pixels of a {dtype} cube need a nodata_value (NaN is a float value)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: List[Path] = []
    for i in range(num_cubes):
        cube_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        synth = make_cube(channels, height, width, seed=cube_seed, dtype=dtype, feature_size=feature_size,
                          reflectance_scale=scale_factor)
        if nodata_fraction > 0:
            holes = np.random.default_rng([cube_seed, 0x4E4F44]).choice(
                height * width, size=max(1, int(round(nodata_fraction * height * width))), replace=False)
            ys, xs = np.unravel_index(holes, (height, width))
            synth.cube[:, ys, xs] = np.nan if nodata_value is None else nodata_value
        path = write_hdf5_cube(
            out / f"cube_{i:05d}.h5",
            synth.cube,
            wavelengths=synth.wavelengths,
            dataset_name=dataset_name,
            layout=layout,
            chunks=chunks,
            compression=compression,
            attrs={"generator": "tools/make_synthetic_hyperspectral.py", "seed": cube_seed,
                   "reflectance_scale": synth.reflectance_scale},
            nodata_value=nodata_value if nodata_fraction > 0 else None, nodata_attribute=nodata_attribute,
            scale_factor=scale_factor,
        )
        _add_label_map(path, label_dataset, synth.labels)
        paths.append(path)
        if envi:
            write_envi_cube(out / "envi" / f"cube_{i:05d}.hdr", synth.cube, synth.wavelengths, interleave=interleave,
                            data_ignore_value=nodata_value if nodata_fraction > 0 else None,
                            reflectance_scale_factor=scale_factor)
    return paths


def _add_label_map(path: Path, name: str, labels: np.ndarray) -> None:
    """Add the label map to a written cube file (the cube dataset is left as it is)."""
    import h5py

    with h5py.File(path, "a") as f:
        ds = f.create_dataset(name, data=labels)
        ds.attrs[CLASS_NAMES_ATTRIBUTE] = np.array(ENDMEMBER_NAMES, dtype=h5py.string_dtype())


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-cubes", type=int, default=4)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="uint16",
                        help="integer types hold reflectance x 10000 (or x --scale-factor)")
    parser.add_argument("--layout", choices=("CHW", "HWC"), default="CHW")
    parser.add_argument("--dataset-name", default="cube")
    parser.add_argument("--chunks", choices=("channel", "contiguous"), default="channel",
                        help="HDF5 storage: one chunk per channel plane (default) or contiguous")
    parser.add_argument("--compression", choices=("gzip", "lzf"), default=None)
    parser.add_argument("--envi", action="store_true", help="also write each cube as ENVI under OUT/envi/")
    parser.add_argument("--interleave", choices=("bsq", "bil", "bip"), default="bsq")
    parser.add_argument("--feature-size", type=float, default=None,
                        help="smoothing length of the abundance maps in pixels (default min(H, W) / 12)")
    parser.add_argument("--scale-factor", type=float, default=None,
                        help="store reflectance x S and record S as the reflectance scale factor (readers divide)")
    parser.add_argument("--nodata-fraction", type=float, default=0.0,
                        help="fraction of each cube's pixels (whole spectra) made missing")
    parser.add_argument("--nodata-value", type=float, default=None,
                        help="value of the missing pixels, recorded as the file's no-data value (default: NaN)")
    parser.add_argument("--nodata-attribute", choices=HDF5_NODATA_ATTRIBUTES, default="_FillValue",
                        help="HDF5 attribute that records --nodata-value")
    parser.add_argument("--label-dataset", default="labels",
                        help="HDF5 dataset of the per-pixel labels (each pixel's dominant endmember)")
    args = parser.parse_args(argv)
    for name in ("num_cubes", "channels", "height", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.nodata_fraction < 1.0:
        parser.error(f"--nodata-fraction must be in [0, 1), got {args.nodata_fraction}")
    if args.nodata_fraction > 0 and args.nodata_value is None and args.dtype != "float32":
        parser.error(f"--nodata-fraction with --dtype {args.dtype} needs --nodata-value (NaN is a float value)")
    if not args.label_dataset.strip() or args.label_dataset == args.dataset_name:
        parser.error(f"--label-dataset {args.label_dataset!r} must be a non-empty name other than --dataset-name")
    if args.scale_factor is not None and not (np.isfinite(args.scale_factor) and args.scale_factor > 0):
        parser.error(f"--scale-factor must be a finite number > 0, got {args.scale_factor}")
    if args.nodata_value is not None and args.dtype != "float32":
        info = np.iinfo(args.dtype)
        if not (float(args.nodata_value).is_integer() and info.min <= args.nodata_value <= info.max):
            parser.error(f"--nodata-value {args.nodata_value:g} is not a {args.dtype} value "
                         f"(an integer in [{info.min}, {info.max}])")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    paths = write_dataset(
        args.out, args.num_cubes, args.channels, args.height, args.width, seed=args.seed, dtype=args.dtype,
        layout=args.layout, envi=args.envi, interleave=args.interleave, chunks=args.chunks,
        compression=args.compression, dataset_name=args.dataset_name, feature_size=args.feature_size,
        scale_factor=args.scale_factor, nodata_fraction=args.nodata_fraction, nodata_value=args.nodata_value,
        nodata_attribute=args.nodata_attribute, label_dataset=args.label_dataset,
    )
    print(
        f"wrote {len(paths)} cubes of {args.channels} x {args.height} x {args.width} ({args.dtype}, {args.layout}) "
        f"to {args.out}{' (+ ENVI ' + args.interleave + ' in envi/)' if args.envi else ''} "
        f"in {time.perf_counter() - start:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

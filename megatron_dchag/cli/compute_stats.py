"""Per-channel mean / std of a hyperspectral cube collection, computed by streaming.

One file at a time, and within a file one block of channels at a time (bounded memory whatever
the cube size); block moments are computed in float64 and merged with Chan et al.'s parallel
formula, so the result does not depend on how the data are blocked. The statistics file
(``.npz`` or ``.json``, see ``megatron_dchag.data.hyperspectral.statistics.save_channel_stats``) is written
atomically: a temporary file in the same directory, then ``os.replace``.

Usage::

    python tools/compute_stats.py --data-path DIR --out stats.npz [--dataset-name cube] [--layout CHW]
        [--file-format auto|hdf5|envi] [--split all|train --val-fraction 0.1 --split-seed 0]

(installed as the console script ``dchag-compute-stats`` with the same flags).
``--split train`` uses the same deterministic file split as ``HyperspectralDataset`` so validation
cubes do not leak into the normalization.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from megatron_dchag.data.hyperspectral.discovery import list_cube_files, split_files
from megatron_dchag.data.hyperspectral.formats import CubeFormatError, open_cube
from megatron_dchag.data.hyperspectral.statistics import (
    ChannelStats,
    RunningChannelMoments,
    save_channel_stats,
)

DEFAULT_BLOCK_BYTES = 64 * 2**20  # float64 working set per channel block


def compute_channel_stats(
    paths: Sequence[Union[str, Path]],
    dataset_name: str = "cube",
    layout: str = "CHW",
    file_format: str = "auto",
    channel_block: Optional[int] = None,
    progress: Optional[Callable[[int, int, Path], None]] = None,
) -> ChannelStats:
    """Per-channel statistics over all pixels of all cubes in ``paths``.

    ``channel_block``: channels read at once (default: as many as fit in ~64 MiB of float64).
    ``progress(i, n, path)`` is called after each file. Every cube must have the same channel
    count; wavelengths are taken from the first cube that has them and must agree across cubes.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no cube files given")
    moments: Optional[RunningChannelMoments] = None
    wavelengths: Optional[np.ndarray] = None
    first: Optional[Path] = None
    for i, path in enumerate(paths):
        with open_cube(path, file_format=file_format, dataset_name=dataset_name, layout=layout) as reader:
            c, h, w = reader.shape
            if moments is None:
                moments, first = RunningChannelMoments(c), reader.path
            elif c != moments.num_channels:
                raise CubeFormatError(
                    f"{reader.path}: cube has {c} channels but {first} has {moments.num_channels} channels"
                )
            wl = reader.wavelengths
            if wl is not None:
                if wavelengths is None:
                    wavelengths = wl
                elif not np.allclose(wl, wavelengths, rtol=0, atol=1e-3):
                    raise CubeFormatError(f"{reader.path}: wavelengths differ from those of the earlier cubes")
            block = channel_block or max(1, DEFAULT_BLOCK_BYTES // (8 * h * w))
            for c0 in range(0, c, block):
                c1 = min(c, c0 + block)
                moments.update(reader.read_channels(c0, c1), channel_start=c0)
        if progress is not None:
            progress(i + 1, len(paths), path)
    assert moments is not None
    return moments.finalize(wavelengths)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True, help="directory of cubes (or one cube file)")
    parser.add_argument("--out", required=True, help="statistics file to write (.npz or .json)")
    parser.add_argument("--dataset-name", default="cube", help="HDF5 dataset holding the cube")
    parser.add_argument("--layout", choices=("CHW", "HWC"), default="CHW", help="HDF5 dataset layout")
    parser.add_argument("--file-format", choices=("auto", "hdf5", "envi"), default="auto")
    parser.add_argument("--channel-block", type=int, default=None, help="channels read at once")
    parser.add_argument("--split", choices=("all", "train"), default="all",
                        help="'train': only the training files of the dataset's split")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.out).suffix.lower() not in (".npz", ".json"):
        parser.error(f"--out {args.out}: must end in .npz or .json")
    if args.channel_block is not None and args.channel_block < 1:
        parser.error(f"--channel-block must be >= 1, got {args.channel_block}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        files = list_cube_files(args.data_path, args.file_format)
        files = split_files(files, args.split, args.val_fraction, args.split_seed)
        start = time.perf_counter()

        def report(i: int, n: int, path: Path) -> None:
            if not args.quiet:
                print(f"[{i}/{n}] {path.name}", file=sys.stderr, flush=True)

        stats = compute_channel_stats(
            files, dataset_name=args.dataset_name, layout=args.layout, file_format=args.file_format,
            channel_block=args.channel_block, progress=report,
        )
        save_channel_stats(stats, args.out)
    except (OSError, ValueError) as err:
        print(f"compute_stats: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote statistics of {stats.num_channels} channels over {len(files)} cubes "
        f"({int(stats.count[0])} values per channel) to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

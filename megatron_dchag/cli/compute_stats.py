"""Per-channel mean / std of a hyperspectral cube collection, computed by streaming over the run's
training split.

One file at a time, and within a file one block of channels at a time (bounded memory whatever
the cube size); block moments are computed in float64 and merged with Chan et al.'s parallel
formula, so the result does not depend on how the data are blocked. Missing values (NaN/inf, or
the file's no-data value) are left out of the moments, counted per channel and per cube, reported
and recorded in the statistics file; so are the cubes it covers (their stems, the split and its
options, a fingerprint), which lets a run warn when the statistics have seen its validation data.
A constant channel (std = 0) is refused unless ``--allow-constant-channels`` (stores std = 1).
The file (``.npz`` or ``.json``, see
``megatron_dchag.data.hyperspectral.statistics.save_channel_stats``) is written atomically: a
temporary file in the same directory, then ``os.replace``.

Usage::

    # the files a run trains on: its config (and overrides) give the data and the split
    python tools/compute_stats.py --config configs/hyperspectral/tiny.yaml [section.field=value ...] \\
        [--data-path DIR] [--out stats.json]
    # without a config
    python tools/compute_stats.py --data-path DIR --out stats.npz [--val-fraction 0.2 | --val-files ENTRY ...]
        [--test-files ENTRY ...] [--split train|all] [--dataset-name cube] [--layout CHW]
        [--file-format auto|hdf5|envi] [--allow-constant-channels]

(installed as the console script ``dchag-compute-stats`` with the same flags). The default split
is ``train``, the files :class:`~megatron_dchag.data.hyperspectral.dataset.HyperspectralDataset`
trains on under the same options: ``--config`` takes them from the run's config (flags given here
win); without one, ``--val-fraction`` defaults to 0.2, the value of
``configs/hyperspectral/tiny.yaml`` (``paper.yaml`` uses 0.05: pass its ``--config``).
``--out`` defaults to the config's ``data.stats_file``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from megatron_dchag.data.hyperspectral.formats import CubeFormatError, open_cube
from megatron_dchag.data.hyperspectral.splits import SplitOptions, cube_stem, split_collection
from megatron_dchag.data.hyperspectral.statistics import (
    ChannelStats,
    ConstantChannelError,
    MissingValues,
    RunningChannelMoments,
    StatsCoverage,
    save_channel_stats,
)

DEFAULT_BLOCK_BYTES = 64 * 2**20  # float64 working set per channel block
DEFAULT_VAL_FRACTION = 0.2  # without --config: configs/hyperspectral/tiny.yaml's (and make demo's) split
EXIT_BAD_INPUT = 2
REPORT_LINES = 10  # cubes and channels listed one by one in the missing-value report


def compute_channel_stats(
    paths: Sequence[Union[str, Path]],
    dataset_name: str = "cube",
    layout: str = "CHW",
    file_format: str = "auto",
    channel_block: Optional[int] = None,
    progress: Optional[Callable[[int, int, Path], None]] = None,
    allow_constant_channels: bool = False,
    split: str = "files",
    split_options: Optional[Dict[str, Any]] = None,
) -> ChannelStats:
    """Per-channel statistics over all valid pixels of all cubes in ``paths``.

    ``channel_block``: channels read at once (default: as many as fit in ~64 MiB of float64).
    ``progress(i, n, path)`` is called after each file. Every cube must have the same channel
    count; wavelengths are taken from the first cube that has them and must agree across cubes.
    The result records its coverage (``split`` and ``split_options`` as given) and the cubes that
    hold missing values.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no cube files given")
    moments: Optional[RunningChannelMoments] = None
    wavelengths: Optional[np.ndarray] = None
    first: Optional[Path] = None
    missing: List[MissingValues] = []
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
            nonfinite_before, nodata_before = moments.nonfinite.copy(), moments.nodata.copy()
            block = channel_block or max(1, DEFAULT_BLOCK_BYTES // (8 * h * w))
            for c0 in range(0, c, block):
                c1 = min(c, c0 + block)
                values, nodata = reader.read_with_nodata(c0, c1, 0, h, 0, w)
                moments.update(values, channel_start=c0, nodata=nodata)
            nonfinite, nodata_count = moments.nonfinite - nonfinite_before, moments.nodata - nodata_before
            per_channel = nonfinite + nodata_count
            if per_channel.any():
                channel = int(np.flatnonzero(per_channel)[0])
                missing.append(MissingValues(cube_stem(reader.path), str(reader.path), int(nonfinite.sum()),
                                             int(nodata_count.sum()), channel, int(per_channel[channel])))
        if progress is not None:
            progress(i + 1, len(paths), path)
    assert moments is not None
    coverage = StatsCoverage(files=tuple(sorted(cube_stem(p) for p in paths)), split=split,
                             split_options=split_options, missing=tuple(missing))
    return moments.finalize(wavelengths, allow_constant_channels=allow_constant_channels, coverage=coverage)


def missing_value_report(stats: ChannelStats) -> List[str]:
    """Readable lines on the missing values the statistics left out (none when there were none)."""
    nonfinite = stats.nonfinite_count if stats.nonfinite_count is not None else np.zeros(stats.num_channels, int)
    nodata = stats.nodata_count if stats.nodata_count is not None else np.zeros(stats.num_channels, int)
    per_channel = nonfinite + nodata
    if not per_channel.any():
        return []
    cubes = stats.coverage.missing if stats.coverage is not None else ()
    n_files = len(stats.coverage.files) if stats.coverage is not None else 0
    lines = [f"missing values (left out of the statistics): {int(nonfinite.sum())} NaN/inf and {int(nodata.sum())} "
             f"equal to the files' no-data value, in {len(cubes)} of {n_files} cubes and "
             f"{int(np.count_nonzero(per_channel))} of {stats.num_channels} channels"]
    for record in cubes[:REPORT_LINES]:
        lines.append(f"  {record.path}: {record.nonfinite} NaN/inf, {record.nodata} no-data; first in channel "
                     f"{record.first_channel} ({record.first_channel_count} values)")
    if len(cubes) > REPORT_LINES:
        lines.append(f"  ... and {len(cubes) - REPORT_LINES} more cubes")
    worst = np.argsort(-per_channel, kind="stable")[: min(REPORT_LINES, int(np.count_nonzero(per_channel)))]
    lines.append("  per channel (channel: missing / valid): " + ", ".join(
        f"{int(c)}: {int(per_channel[c])} / {int(stats.count[c])}" for c in worst)
        + (" ..." if np.count_nonzero(per_channel) > len(worst) else "")
        + " (all counts are in the statistics file)")
    return lines


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="dotted overrides of the --config (as for the pretrain_*.py entry points)")
    parser.add_argument("--config", default=None,
                        help="the run's YAML config: data path, reading options and split come from it")
    parser.add_argument("--data-path", default=None, help="directory of cubes (or one cube file); default: data.data_path")
    parser.add_argument("--out", default=None, help="statistics file to write (.npz or .json); default: data.stats_file")
    parser.add_argument("--dataset-name", default=None, help="HDF5 dataset holding the cube (default: cube)")
    parser.add_argument("--layout", choices=("CHW", "HWC"), default=None, help="HDF5 dataset layout (default: CHW)")
    parser.add_argument("--file-format", choices=("auto", "hdf5", "envi"), default=None)
    parser.add_argument("--channel-block", type=int, default=None, help="channels read at once")
    parser.add_argument("--split", choices=("train", "all"), default="train",
                        help="'train' (default): the run's training files; 'all': every file, validation included")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"hash split: fraction of cubes held out (default: data.val_fraction, else "
                             f"{DEFAULT_VAL_FRACTION})")
    parser.add_argument("--val-files", nargs="+", default=None, metavar="ENTRY",
                        help="validation cubes: folders, files or globs of names/stems (as data.val_files)")
    parser.add_argument("--test-files", nargs="+", default=None, metavar="ENTRY",
                        help="test cubes, left out of the statistics (as data.test_files)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the hash split (runs use 0)")
    parser.add_argument("--allow-constant-channels", action="store_true",
                        help="store std = 1 for a channel with std = 0 (it normalizes to 0) instead of refusing it")
    parser.add_argument("--quiet", action="store_true", help="no per-file progress")
    args = parser.parse_args(argv)
    if args.channel_block is not None and args.channel_block < 1:
        parser.error(f"--channel-block must be >= 1, got {args.channel_block}")
    return args


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Data path, output, reading and split options: the flags, else the config, else the defaults."""
    data: Any = None
    if args.config is not None or args.overrides:
        from megatron_dchag.config import load_config

        # The paths given here as overrides, as the entry points do with --data-path: a config
        # whose path is an unset ${oc.env:...} still loads.
        paths = [f"data.{field}={value}" for field, value in (("data_path", args.data_path), ("stats_file", args.out))
                 if value is not None]
        data = load_config(args.config, [*args.overrides, *paths], workload_sections=("mae",)).data
    pick = lambda flag, field, default: flag if flag is not None else (  # noqa: E731
        getattr(data, field) if data is not None and getattr(data, field) is not None else default)
    settings = dict(
        data_path=pick(args.data_path, "data_path", None),
        out=pick(args.out, "stats_file", None),
        dataset_name=pick(args.dataset_name, "dataset_name", "cube"),
        layout=pick(args.layout, "layout", "CHW"),
        file_format=pick(args.file_format, "file_format", "auto"),
        val_fraction=pick(args.val_fraction, "val_fraction", DEFAULT_VAL_FRACTION),
        val_files=pick(args.val_files, "val_files", None),
        test_files=pick(args.test_files, "test_files", None),
    )
    if settings["data_path"] is None:
        raise ValueError("--data-path is not given (nor data.data_path in a --config)")
    if settings["out"] is None:
        raise ValueError("--out is not given (nor data.stats_file in a --config)")
    if Path(settings["out"]).suffix.lower() not in (".npz", ".json"):
        raise ValueError(f"--out {settings['out']}: must end in .npz or .json")
    if not 0.0 <= settings["val_fraction"] < 1.0:
        raise ValueError(f"--val-fraction={settings['val_fraction']} must be in [0, 1)")
    return settings


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        s = _settings(args)
        options = SplitOptions(val_fraction=s["val_fraction"], val_files=s["val_files"], test_files=s["test_files"],
                               split_seed=args.split_seed)
        split = split_collection(s["data_path"], s["file_format"], options)
        files = split.files("all") if args.split == "all" else split.require("train")
        start = time.perf_counter()

        def report(i: int, n: int, path: Path) -> None:
            if not args.quiet:
                print(f"[{i}/{n}] {path.name}", file=sys.stderr, flush=True)

        stats = compute_channel_stats(
            files, dataset_name=s["dataset_name"], layout=s["layout"], file_format=s["file_format"],
            channel_block=args.channel_block, progress=report, allow_constant_channels=args.allow_constant_channels,
            split=args.split, split_options=options.to_dict(),
        )
        save_channel_stats(stats, s["out"])
    except ConstantChannelError as err:
        print(f"error: {err}; drop the band, or pass --allow-constant-channels to store std = 1 for it "
              "(it then normalizes to 0)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in missing_value_report(stats):
        print(line, file=sys.stderr)
    unit = list(stats.constant_channels)
    if unit:
        print(f"note: channel{'s' if len(unit) > 1 else ''} {', '.join(str(c) for c in unit[:10])}"
              f"{' ...' if len(unit) > 10 else ''} constant: stored with std = 1 (--allow-constant-channels)",
              file=sys.stderr)
    held = {"train": f"the training split, {options.describe()}", "all": "all files"}[args.split]
    print(
        f"wrote statistics of {stats.num_channels} channels over {len(files)} cubes ({held}; "
        f"{int(stats.count[0])} valid values in channel 0) to {s['out']} in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embed every cube of a directory with a pretrained model, into one HDF5 file.

    python tools/extract_features.py --load RUN_DIR_OR_EXPORT --data-path CUBES --out features.h5 \\
        [--per-patch] [--stats-file STATS] [--batch-size 8] [--overwrite]
    torchrun --nproc-per-node 2 tools/extract_features.py ...   # TP=2: each rank reads only its channels

The model comes from a checkpoint (any layout it was saved at) or an exported ``.safetensors``
file, with the normalization stored with it (:func:`megatron_dchag.inference.load_pretrained`;
``--stats-file`` for checkpoints saved before the statistics were stored). Each cube is read raw
(its centre crop of the model's image size, only this rank's channels) and normalized as in
training. The file holds

- ``embeddings``: float32 ``[N, D]`` (the mean over patches), or ``[N, L, D]`` with ``--per-patch``
  (one per patch, row-major over the patch grid);
- ``names``: the N cube file names, in the order of the rows; ``crop_windows``: int ``[N, 4]``,
  each cube's ``(y0, y1, x0, x1)``;
- attributes ``source``, ``task``, ``iteration``, ``config`` (the model's YAML config),
  ``normalization`` (JSON), ``pooling`` (``mean`` or ``none``), ``patch_grid``.

The file is written to a temporary file beside ``--out`` and renamed when complete: a failure
leaves no partial output. An existing ``--out`` is refused unless ``--overwrite``. Under torchrun
the TP size is the number of processes (one model copy); rank 0 writes. A progress bar is drawn
on a terminal. Installed as the console script ``dchag-extract-features`` with the same flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

HDF5_SUFFIXES = (".h5", ".hdf5")


class _Progress:
    """A one-line bar on stderr, drawn only when it is a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start = total, enabled and sys.stderr.isatty(), time.time()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        rate = done / max(time.time() - self.start, 1e-9)
        bar = "#" * int(30 * done / max(self.total, 1))
        sys.stderr.write(f"\r\033[K[{bar:<30}] {done}/{self.total} cubes | {rate:.2f} cubes/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _check_output(args) -> None:
    from megatron_dchag.config import ConfigError

    if Path(args.out).suffix.lower() not in HDF5_SUFFIXES:
        raise ConfigError(f"--out '{args.out}': the features file must end in {' or '.join(HDF5_SUFFIXES)} (HDF5)")
    if os.path.exists(args.out) and not args.overwrite:
        raise ConfigError(f"--out '{args.out}' exists; give --overwrite to replace it")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size}: must be at least 1")


def extract(args) -> dict:
    """Embed the cubes; rank 0 writes the file. Returns what was written."""
    import h5py
    import torch.distributed as dist

    from megatron_dchag.config import ConfigError
    from megatron_dchag.data.hyperspectral.discovery import list_cube_files
    from megatron_dchag.data.hyperspectral.formats import open_cube, publish_temp_file, temp_file_beside
    from megatron_dchag.distributed import initialize_distributed
    from megatron_dchag.inference import MAE_TASK, load_pretrained
    from megatron_dchag.launch_env import resolve_launch_env

    world = resolve_launch_env().world_size
    tp = args.tensor_model_parallel_size or world
    if tp != world:
        raise ConfigError(f"--tensor-model-parallel-size={tp}: extract_features runs one model copy; launch {tp} "
                          f"processes (this launch has {world})")
    initialize_distributed(tp, 1)
    rank = dist.get_rank()
    model = load_pretrained(args.load, args.stats_file)
    if model.task != MAE_TASK:
        raise ConfigError(f"--load '{args.load}' is a {model.task} model; extract_features embeds hyperspectral cubes")
    d = model.config.data
    files: List[Path] = list_cube_files(args.data_path, d.file_format)
    windows = []
    for f in files:  # every window first: a cube too small fails before anything is computed
        with open_cube(f, file_format=d.file_format, dataset_name=d.dataset_name, layout=d.layout) as reader:
            try:
                windows.append(model.crop_window(reader.height, reader.width))
            except ValueError as exc:
                raise ConfigError(f"{f}: {exc}") from None
    grid = model.model.grid
    hidden = model.config.model.hidden_size
    shape = (len(files), grid[0] * grid[1], hidden) if args.per_patch else (len(files), hidden)
    out = Path(args.out)
    tmp = None
    progress = _Progress(len(files), enabled=rank == 0)
    try:
        if rank == 0:
            fd, tmp = temp_file_beside(out)
            os.close(fd)
            fh = h5py.File(tmp, "w")
            embeddings = fh.create_dataset("embeddings", shape=shape, dtype="float32")
        for start in range(0, len(files), args.batch_size):
            batch = files[start: start + args.batch_size]
            cubes = np.stack([model.read_cube(str(f), windows[start + i]) for i, f in enumerate(batch)])
            try:
                values = model.tokens(cubes) if args.per_patch else model.embed(cubes)
            except ValueError as exc:  # missing values under data.nodata=error, named by the file
                raise ConfigError(f"{batch[0].parent}/{{{','.join(f.name for f in batch)}}}: {exc}") from None
            if rank == 0:
                embeddings[start: start + len(batch)] = values.numpy()
            progress.update(start + len(batch))
        progress.close()
        if rank == 0:
            fh.create_dataset("names", data=np.array([f.name for f in files], dtype=h5py.string_dtype()))
            fh.create_dataset("crop_windows", data=np.asarray(windows, dtype=np.int64))
            for key, value in model.describe().items():
                fh.attrs[key] = value
            fh.attrs["pooling"] = "none" if args.per_patch else "mean"
            fh.attrs["patch_grid"] = np.asarray(grid, dtype=np.int64)
            fh.close()
            publish_temp_file(tmp, out)
            tmp = None
    finally:
        if tmp is not None:
            try:
                fh.close()
            except Exception:
                pass
            os.unlink(tmp)
    return {"cubes": len(files), "shape": shape}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint (save or iter_* directory) or exported .safetensors")
    parser.add_argument("--data-path", required=True, help="directory of cubes (or one cube file)")
    parser.add_argument("--out", required=True, help="HDF5 file to write (.h5 / .hdf5)")
    parser.add_argument("--per-patch", action="store_true", help="one embedding per patch instead of the mean")
    parser.add_argument("--stats-file", default=None,
                        help="the run's statistics file (for checkpoints saved before they stored it)")
    parser.add_argument("--batch-size", type=int, default=8, help="cubes per forward pass")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None, help="default: the number of processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    from megatron_dchag.config import ConfigError

    try:
        _check_output(args)  # before torch is imported: a refused --out costs nothing
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    from megatron_dchag.distributed import destroy_distributed
    from megatron_dchag.training.entry_point import report_user_error, user_errors

    try:
        result = extract(args)
    except (ValueError, KeyError, *user_errors()) as exc:
        if args.debug:
            raise
        return report_user_error(exc)
    finally:
        destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {args.out}: {result['cubes']} cubes, embeddings {list(result['shape'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reshard, export, import and inspect megatron_dchag checkpoints (both workloads, detected from the checkpoint).

    # reshard to another TP (any size dividing the channel groups) and/or PP size
    python tools/convert_checkpoint.py --load RUN --save RUN_TP4 --target-tensor-model-parallel-size 4 \
        [--target-pipeline-model-parallel-size 2 [--target-virtual-pipeline-model-parallel-size 2]]
    # one portable file: full unsharded weights + the model config as metadata (for inference)
    python tools/convert_checkpoint.py --load RUN --export model.safetensors [--overwrite]
    # back to a (weights-only) sharded checkpoint, optionally at another layout
    python tools/convert_checkpoint.py --import model.safetensors --save RUN2 [--target-tensor-model-parallel-size 2]
    # every tensor's global shape and dtype, and the saved config
    python tools/convert_checkpoint.py --load RUN --inspect

The conversion runs TP x PP gloo ranks on this machine (CPU is enough; a one-rank step runs in this
process, more ranks are forked from a server that imported torch and megatron-core once). Errors print one line
and exit with status 2 (``--debug`` shows the traceback); outputs are written atomically. The rank
work itself lives in :mod:`megatron_dchag.training.checkpoint_conversion`; this module is the command
line (installed as the console script ``dchag-convert-checkpoint`` with the same flags).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence


def _inspect(load: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_dchag.training.checkpoint_conversion import checkpoint_description

    ckpt, config, state = checkpoint_description(load)
    metadata = dist_checkpointing.load_tensors_metadata(ckpt)
    print(f"checkpoint {ckpt}")
    print(f"task {state.get('task')}  iteration {state.get('iteration')}  layout {state.get('layout')}  "
          f"optimizer state {'yes' if state.get('has_optimizer', True) else 'no (weights only)'}")
    model_keys = sorted(k for k in metadata if not k.startswith("optimizer."))
    other = len(metadata) - len(model_keys)
    total = 0
    print(f"\n{'tensor':<72} {'global shape':<22} dtype")
    for key in model_keys:
        t = metadata[key]
        n = 1
        for dim in t.global_shape:
            n *= dim
        total += n
        print(f"{key:<72} {str(tuple(t.global_shape)):<22} {str(t.dtype).replace('torch.', '')}")
    print(f"\n{len(model_keys)} model tensors, {total:,} values; {other} optimizer-state tensors")
    import yaml

    print("\nsaved config:")
    print(yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120))


def _check_export_target(path: str, overwrite: bool) -> None:
    """``--export FILE``: a new file in a writable directory, or an existing file with ``--overwrite``."""
    from megatron_dchag.config import ConfigError

    if os.path.isdir(path):
        raise ConfigError(f"--export {path}: is a directory; name the file to write")
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"--export {path}: the file exists; give --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--export {path}: cannot be written ('{parent}' is not a writable directory)")


def _check_save_target(path: str) -> None:
    """``--save DIR``: a new directory, or an empty one."""
    from megatron_dchag.config import ConfigError

    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--save {path}: is a file, not a directory")
    if os.path.exists(path) and os.listdir(path):
        raise ConfigError(f"--save directory '{path}' exists and is not empty")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", help="checkpoint: a --save directory or one iter_* directory")
    parser.add_argument("--save", help="output checkpoint directory")
    parser.add_argument("--export", metavar="FILE", help="write one portable .safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="let --export replace an existing file")
    parser.add_argument("--import", dest="import_file", metavar="FILE", help="read a portable .safetensors file")
    parser.add_argument("--inspect", action="store_true", help="print tensors, shapes, dtypes and the config")
    parser.add_argument("--target-tensor-model-parallel-size", type=int, default=None)
    parser.add_argument("--target-pipeline-model-parallel-size", type=int, default=None)
    parser.add_argument("--target-virtual-pipeline-model-parallel-size", type=int, default=None,
                        help="interleaved stages per pipeline rank at the target (0: none; default: keep the "
                             "checkpoint's where PP > 1)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if not args.debug:
        # the rank processes inherit this: no import-time warnings (e.g. "Apex not installed") x ranks
        os.environ.setdefault("PYTHONWARNINGS", "ignore")

    from megatron_dchag.config import ConfigError
    from megatron_dchag.training.checkpoint_paths import CheckpointError
    from megatron_dchag.training.entry_point import report_user_error

    try:
        modes = [bool(args.inspect), bool(args.export), bool(args.import_file), bool(args.load and args.save)]
        if sum(modes) != 1:
            raise ConfigError("give exactly one of: --load DIR --inspect | --load DIR --export FILE | "
                              "--import FILE --save DIR | --load DIR --save DIR --target-...")
        # the output paths first: a wrong one is reported before torch and megatron-core are imported
        if args.export:
            if not args.load:
                raise ConfigError("--export needs --load DIR")
            _check_export_target(args.export, args.overwrite)
        if args.save:
            _check_save_target(args.save)
        from megatron_dchag.training import checkpoint_conversion as conv
        from megatron_dchag.training.checkpointing import replace_dir_atomically

        if args.inspect:
            if not args.load:
                raise ConfigError("--inspect needs --load DIR")
            _inspect(args.load)
            return 0
        if args.export:
            conv.checkpoint_description(args.load)  # fail fast, before starting processes
            info = conv.run_on_local_ranks(1, 1, 1, conv.export_rank, args.load, os.path.abspath(args.export))
            print(f"exported {info['tensors']} tensors ({info['parameters']:,} values) to {args.export}")
            return 0

        vpp_arg = args.target_virtual_pipeline_model_parallel_size
        if vpp_arg is not None and vpp_arg < 0:
            raise ConfigError(f"--target-virtual-pipeline-model-parallel-size={vpp_arg}: expected 0 (none) or >= 2")
        if args.import_file:
            import yaml

            _, metadata = conv.read_portable(args.import_file)  # fail fast on a bad file
            saved, task = yaml.safe_load(metadata["config"]), metadata.get("task")
            tp = args.target_tensor_model_parallel_size or 1
            pp = args.target_pipeline_model_parallel_size or 1
        else:
            _, saved, state = conv.checkpoint_description(args.load)
            task = state.get("task")
            layout = saved.get("parallel") or {}
            tp = args.target_tensor_model_parallel_size or layout.get("tensor_model_parallel_size", 1)
            pp = args.target_pipeline_model_parallel_size or layout.get("pipeline_model_parallel_size", 1)
        # the target layout is checked before any process starts or anything is written
        target = conv.config_for_layout(saved, tp, pp, conv.SAVED if vpp_arg is None else (vpp_arg or None), task=task)
        vpp = target.parallel.virtual_pipeline_model_parallel_size
        save = os.path.abspath(args.save)
        parent = os.path.dirname(save) or "."
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(save)}.partial-", dir=parent)
        try:
            source = os.path.abspath(args.load) if args.load else None
            if args.import_file:
                source = os.path.join(staging, "tp1")
                iteration = conv.run_on_local_ranks(1, 1, 1, conv.import_rank, os.path.abspath(args.import_file), source)
            result_dir = source
            if not args.import_file or (tp, pp) != (1, 1):
                result_dir = os.path.join(staging, "out")
                iteration = conv.run_on_local_ranks(tp * pp, tp, pp, conv.reshard_rank, source, result_dir, tp, pp,
                                                    vpp, vpp=vpp)
            replace_dir_atomically(result_dir, save)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"wrote checkpoint {save} (iteration {iteration}, TP={tp}, PP={pp}{f', VPP={vpp}' if vpp else ''})")
        return 0
    except (ConfigError, CheckpointError) as exc:
        if args.debug:
            raise
        return report_user_error(exc)


if __name__ == "__main__":
    sys.exit(main())

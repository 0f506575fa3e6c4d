"""What ``pretrain_*.py`` scripts share: parse, validate, start the ranks, check the data, build,
train, report errors.

Bad input (config, data, checkpoint, launch) ends the process with one clear ``error:`` line on
stderr and exit status 2, before any compute starts where possible; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional, Sequence

from megatron_dchag.config import ConfigError, ExperimentConfig, resolve_config
from megatron_dchag.tasks.base import Task

EXIT_BAD_INPUT = 2


def _launched_world_size() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def user_errors() -> tuple:
    """Exceptions that mean "your input is wrong", reported in one line."""
    from megatron_dchag.data.hyperspectral.formats import CubeFormatError, CubeReadError
    from megatron_dchag.training.checkpointing import CheckpointError
    from megatron_dchag.training.trainer import TrainingStopped

    errors = [ConfigError, CheckpointError, CubeFormatError, CubeReadError, FileNotFoundError, TrainingStopped]
    try:
        from megatron_dchag.data.era5.store import ERA5DataError

        errors.append(ERA5DataError)
    except ImportError:
        pass
    return tuple(errors)


def report_user_error(exc: BaseException) -> int:
    """Print ``error: <first line of the message>`` on stderr (no traceback); returns the exit
    status for bad input. A ``KeyError``'s message is shown without the quotes ``str`` adds."""
    text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).strip()
    print(f"error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def report_data_warnings(task: Task) -> None:
    """Print each of the task's data warnings as one ``warning:`` line on stderr (rank 0 only)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    for line in task.data_warnings():
        print(f"warning: {line}", file=sys.stderr, flush=True)


def _quiet_shutdown() -> None:
    """After a user error, keep the one ``error:`` line the only output: libraries whose reads were
    cut short (zarr's asyncio tasks, for one) otherwise log "Task was destroyed but it is
    pending!" and "Exception ignored in ..." tracebacks while the interpreter exits."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None


def run_entry_point(
    argv: Optional[Sequence[str]], task_factory: Callable[[ExperimentConfig], Task], description: str, fault_hook=None
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        from megatron_dchag.training.arguments import parse_run_arguments

        args = parse_run_arguments(argv, description, world_size=_launched_world_size(),
                                   workload_sections=getattr(task_factory, "config_sections", None))
        cfg = resolve_config(args.config)  # the trainer and the task share this resolved config
        from megatron_dchag.distributed import destroy_distributed, initialize_distributed

        initialize_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                               seed=cfg.training.seed,
                               virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline_model_parallel_size)
        from megatron_dchag.training.builder import build_training_components
        from megatron_dchag.training.trainer import Trainer

        task = task_factory(cfg)
        start_time = time.time()
        task.prepare()  # the data checks, before any model is built
        report_data_warnings(task)
        components = build_training_components(cfg, task)
        Trainer(cfg, task, components, fault_hook=fault_hook, start_time=start_time).run()
        destroy_distributed()
        return 0
    except user_errors() as exc:
        if debug:
            raise
        status = report_user_error(exc)
        _quiet_shutdown()
        return status

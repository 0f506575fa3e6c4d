"""What ``pretrain_*.py`` scripts share: parse, validate, start the ranks, lock the save directory,
check the data, build, train, report errors.

Bad input (config, paths, data, checkpoint, a save directory in use) ends every rank with exit
status 2 and one clear ``error:`` line on stderr, printed by rank 0 only, before any compute starts
where possible; ``--debug`` shows the traceback (on every rank).

The command line is parsed and validated before torch or megatron-core is imported, so ``--help``
and config errors answer at once: give the workload as a :class:`TaskRef` (module and class name)
rather than the class itself, and keep the entry module free of torch imports. The world size for
the validation comes from the launcher's environment (``WORLD_SIZE``, ``SLURM_NTASKS``).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

from megatron_dchag.config import ConfigError, ExperimentConfig, resolve_config

EXIT_BAD_INPUT = 2
# How long the other ranks wait before exiting on a user error, for rank 0 to report it.
RANK0_REPORT_GRACE_S = 1.0


@dataclass(frozen=True)
class TaskRef:
    """A workload named without importing it: ``module:attribute`` of its :class:`Task` class, and
    its ``config_sections`` (checked against the class by the tests)."""

    module: str
    attribute: str
    config_sections: Optional[Tuple[str, ...]] = None

    def load(self) -> Callable[[ExperimentConfig], Any]:
        return getattr(importlib.import_module(self.module), self.attribute)


def _launched_world_size() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def launched_rank() -> int:
    """This process's global rank as the launcher gave it (0 for a plain ``python`` run)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


# (module, class) of the exceptions that mean "your input is wrong". Looked up only in modules
# already imported: an exception of a module never imported cannot have been raised.
_USER_ERROR_CLASSES = (
    ("megatron_dchag.config.checks", "ConfigError"),
    ("megatron_dchag.training.checkpoint_paths", "CheckpointError"),
    ("megatron_dchag.training.run_lock", "RunLockHeld"),
    ("megatron_dchag.data.hyperspectral.formats", "CubeFormatError"),
    ("megatron_dchag.data.hyperspectral.formats", "CubeReadError"),
    ("megatron_dchag.data.era5.store", "ERA5DataError"),
    ("megatron_dchag.training.trainer", "TrainingStopped"),
)


def user_errors() -> tuple:
    """Exceptions that mean "your input is wrong", reported in one line (those of the modules
    imported so far, and ``FileNotFoundError``)."""
    found = [FileNotFoundError]
    for module, name in _USER_ERROR_CLASSES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and cls not in found:
            found.append(cls)
    return tuple(found)


def report_user_error(exc: BaseException, rank: int = 0) -> int:
    """Print ``error: <first line of the message>`` on stderr (no traceback) when ``rank`` is 0;
    returns the exit status for bad input. A ``KeyError``'s message is shown without the quotes
    ``str`` adds."""
    if rank == 0:
        text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).strip()
        print(f"error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def report_data_warnings(task) -> None:
    """Print each of the task's data warnings as one ``warning:`` line on stderr (rank 0 only)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    for line in task.data_warnings():
        print(f"warning: {line}", file=sys.stderr, flush=True)


def notice(text: str) -> None:
    """One ``notice:`` line on stderr, from rank 0 only."""
    if launched_rank() == 0:
        print(f"notice: {text}", file=sys.stderr, flush=True)


def _quiet_shutdown() -> None:
    """After a user error, keep the one ``error:`` line the only output: libraries whose reads were
    cut short (zarr's asyncio tasks, for one) otherwise log "Task was destroyed but it is
    pending!" and "Exception ignored in ..." tracebacks while the interpreter exits."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None


def _check_output_dir(path: Optional[str], flag: str) -> None:
    """``path`` is a directory, or can be created: its nearest existing ancestor is a writable directory."""
    if not path:
        return
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: the directory is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: cannot be created, '{parent}' is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot be created, '{parent}' is not writable")


def check_run_paths(cfg: ExperimentConfig) -> bool:
    """Check ``--save``, ``--log-dir`` and ``--load`` before anything is started; returns whether
    ``--load`` names a directory that holds no checkpoint yet (a first launch with ``--load X
    --save X``: the run starts from scratch, as in Megatron-LM). A ``--load`` that holds something
    else than a checkpoint, or no checkpoint with ``--finetune``/``--skip-train``, is an error."""
    from megatron_dchag.training.checkpoint_paths import holds_no_checkpoint_yet, resolve_checkpoint_dir

    tr = cfg.training
    if not tr.skip_train:
        _check_output_dir(tr.save, "--save")
    _check_output_dir(tr.log_dir or (None if tr.skip_train else tr.save), "--log-dir" if tr.log_dir else "--save")
    if not tr.load:
        return False
    if not (tr.finetune or tr.skip_train) and holds_no_checkpoint_yet(tr.load):
        return True
    resolve_checkpoint_dir(tr.load)  # CheckpointError naming what is wrong
    return False


class _SaveDirectoryLock:
    """Rank 0's lock of the save directory (:mod:`megatron_dchag.training.run_lock`); every rank
    learns the outcome, so a refused run ends with the same error everywhere."""

    def __init__(self, save_dir: Optional[str]):
        self.save_dir = save_dir
        self.lock = None
        self.created_dir = save_dir is not None and not os.path.exists(save_dir)

    def acquire(self) -> None:
        import torch.distributed as dist

        from megatron_dchag.training.checkpoint_paths import remove_unfinished_saves
        from megatron_dchag.training.run_lock import RunLock, RunLockHeld

        outcome = [None, None]  # (error, notice)
        if dist.get_rank() == 0:
            lock = RunLock(self.save_dir)
            try:
                outcome[1] = lock.acquire()
                self.lock = lock
                remove_unfinished_saves(self.save_dir, only_this_process=False)  # of dead runs
            except RunLockHeld as exc:
                outcome[0] = str(exc)
            except OSError as exc:
                outcome[0] = f"--save {self.save_dir}: cannot be created or written ({exc.strerror or exc})"
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise RunLockHeld(outcome[0])
        if outcome[1] is not None:
            notice(outcome[1])

    def release(self, failed: bool) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed and self.created_dir and launched_rank() == 0:
            try:
                os.rmdir(self.save_dir)  # only if empty: a refused or failed start leaves nothing behind
            except OSError:
                pass


def run_entry_point(
    argv: Optional[Sequence[str]],
    task_factory: Union[TaskRef, Callable[[ExperimentConfig], Any]],
    description: str,
    fault_hook=None,
) -> int:
    """Run one training (or ``--skip-train`` evaluation) job; returns the exit status.
    ``task_factory``: a :class:`TaskRef`, or the Task class itself (then torch is imported with it)."""
    from megatron_dchag.training.stop_signal import STOP_SIGNALS

    # First: a signal during start-up is a stop request, not a kill (the Trainer restores the
    # handlers when it ends; after a user error they stay, so every rank exits with status 2).
    STOP_SIGNALS.install()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    rank = launched_rank()
    lock: Optional[_SaveDirectoryLock] = None
    ok = False
    try:
        try:
            from megatron_dchag.training.arguments import parse_run_arguments

            args = parse_run_arguments(argv, description, world_size=_launched_world_size(),
                                       workload_sections=getattr(task_factory, "config_sections", None))
            cfg = resolve_config(args.config)  # the trainer and the task share this resolved config
            resume_from_scratch = check_run_paths(cfg)
            if resume_from_scratch:
                notice(f"--load {cfg.training.load} holds no checkpoint yet; starting from scratch")
            from megatron_dchag.compat.quiet import silence_unactionable_warnings

            silence_unactionable_warnings()  # before torch and megatron-core are imported
            task_class = task_factory.load() if isinstance(task_factory, TaskRef) else task_factory
            from megatron_dchag.distributed import destroy_distributed, initialize_distributed

            initialize_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                                   seed=cfg.training.seed,
                                   virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline_model_parallel_size)
            if cfg.training.save and not cfg.training.skip_train:
                lock = _SaveDirectoryLock(cfg.training.save)
                lock.acquire()
            if cfg.training.load and not resume_from_scratch:
                from megatron_dchag.training.checkpointing import check_shard_files, resolve_checkpoint_dir

                check_shard_files(resolve_checkpoint_dir(cfg.training.load))  # before the model is built
            from megatron_dchag.training.builder import build_training_components
            from megatron_dchag.training.trainer import Trainer

            task = task_class(cfg)
            start_time = time.time()
            task.prepare()  # the data checks, before any model is built
            report_data_warnings(task)
            components = build_training_components(cfg, task)
            Trainer(cfg, task, components, fault_hook=fault_hook, start_time=start_time).run()
            destroy_distributed()
            ok = True
            return 0
        finally:
            if lock is not None:
                lock.release(failed=not ok)
    except user_errors() as exc:
        if debug:
            raise
        status = report_user_error(exc, rank)
        _quiet_shutdown()
        if rank != 0 and _launched_world_size() > 1:
            # A launcher ends the other ranks as soon as one fails: let rank 0 print the error first.
            time.sleep(RANK0_REPORT_GRACE_S)
        return status

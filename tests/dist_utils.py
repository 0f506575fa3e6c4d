"""Multi-process test harness: run a function on N gloo ranks and get their results back.

    from tests.dist_utils import run_distributed, run_single

    def _check_gather():                 # module level, so it pickles by reference
        ...                              # runs after initialize_distributed(tp, pp, seed)
        return some_tensor               # picklable; tensors come back on CPU

    def test_gather():
        outs = run_distributed(_check_gather, 4, tensor_model_parallel_size=2)
        assert len(outs) == 4            # one result per rank, in rank order

Every call starts fresh processes, so megatron's global state never leaks between tests. Each
child sets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (a free port per
call), uses one OpenMP thread, calls :func:`megatron_dchag.distributed.initialize_distributed`,
runs ``fn(*args, **kwargs)`` and :func:`~megatron_dchag.distributed.destroy_distributed`. If any
rank raises, dies or runs past ``timeout`` seconds, the others are killed and the parent raises
:class:`DistributedTestError` with the child's traceback (on a timeout, with the Python stack of
every rank that had not finished). It never hangs, and it leaves no process behind: each rank runs
in its own process group, which is killed at the end (this also stops helper processes a rank
started, such as the manager process of ``dist_checkpointing``'s writer).

Start-up cost: importing torch + megatron-core takes ~5 s per process on this machine, too much
for a suite of many 4-rank tests on 2 cores. Children are therefore started from a
``forkserver`` (a clean process started once per test session) that has imported those
modules already: a child costs a ``fork``, not an import (the 11 tests of test_cpu_compat.py and
test_startup.py: ~20 s instead of ~260 s with ``spawn``). The children are as clean as ``spawn``
children: nothing is inherited from the pytest process. Set ``DCHAG_TEST_START_METHOD=spawn`` to
use plain ``spawn`` instead.

``fn`` is pickled by reference, so its module must be importable in the child: test modules are
(pytest's default ``prepend`` import mode puts their directory on ``sys.path``, and multiprocessing
gives every ``forkserver`` or ``spawn`` child the parent's ``sys.path`` before it unpickles anything).
``import tests.dist_utils`` needs the repository root on ``sys.path``: run ``python -m pytest`` from
the root (as the Makefile does).
"""

from __future__ import annotations

import faulthandler
import multiprocessing.connection
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp

from tests.limits import RUN_TIMEOUT_S

__all__ = ["DistributedTestError", "run_distributed", "run_single"]

# Imported once by the forkserver so that children start without paying for the imports.
_FORKSERVER_PRELOAD = (
    "megatron_dchag.distributed",
    "megatron.core.transformer",
    "megatron.core.pipeline_parallel",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.dist_checkpointing",
)
_START_METHOD_VAR = "DCHAG_TEST_START_METHOD"
_KILL_GRACE_S = 1.0
_EXIT_GRACE_S = 10.0


class DistributedTestError(RuntimeError):
    """A rank of :func:`run_distributed` failed, died or timed out."""


def _to_cpu(obj: Any) -> Any:
    """Move tensors (also inside lists, tuples and dicts) to the CPU, detached."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_cpu(v) for v in obj)
    if isinstance(obj, tuple):  # namedtuple
        return type(obj)(*(_to_cpu(v) for v in obj))
    return obj


def _child_main(
    rank: int,
    world_size: int,
    master_port: int,
    payload: bytes,
    conn: multiprocessing.connection.Connection,
    stack_file: str,
) -> None:
    """Entry point of one rank (runs in the child)."""
    # Own process group: the parent can then clean up everything this rank starts (e.g. the
    # manager process dist_checkpointing spawns) with one killpg, and Ctrl-C reaches the parent.
    os.setpgrp()
    _die_with_parent()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    # The parent asks for every thread's stack with SIGUSR1 before killing a hung rank.
    stack_out = open(stack_file, "w")
    faulthandler.register(signal.SIGUSR1, file=stack_out, all_threads=True)
    try:
        import torch

        torch.set_num_threads(1)
        from megatron_dchag.distributed import destroy_distributed, initialize_distributed

        fn, args, kwargs, tp, pp, seed = pickle.loads(payload)
        initialize_distributed(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=seed
        )
        result = pickle.dumps(_to_cpu(fn(*args, **kwargs)))
        # Only after success: after a failure, peers may be stuck in a collective and the
        # parent kills every rank anyway, so report at once.
        destroy_distributed()
        message = ("ok", result)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        message = ("error", traceback.format_exc())
    try:
        conn.send(message)
    except Exception:  # noqa: BLE001 - e.g. an unpicklable result
        conn.send(("error", f"rank {rank} could not send its result:\n{traceback.format_exc()}"))
    finally:
        conn.close()


def _die_with_parent() -> None:
    """Linux: get SIGKILL if the parent (pytest or the forkserver) dies, so no rank outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _context() -> Any:
    method = os.environ.get(_START_METHOD_VAR, "forkserver")
    if method not in mp.get_all_start_methods():
        method = "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
    return ctx


def _free_port() -> int:
    # Not megatron_dchag.distributed.find_free_port: the parent should not import megatron-core.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_process_groups(procs: List[Any]) -> None:
    """SIGKILL every rank's process group: the rank (if still alive) and all it started."""
    for proc in procs:
        if proc.pid is None:
            continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone: the rank and its children have all exited
    for proc in procs:
        if proc.is_alive():  # killed before it made its own process group
            proc.kill()
        proc.join(_KILL_GRACE_S)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout: float = RUN_TIMEOUT_S,
    **kwargs: Any,
) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh gloo ranks; return results by rank.

    Each rank first calls ``initialize_distributed(tensor_model_parallel_size,
    pipeline_model_parallel_size, seed)``. ``fn`` must be a module-level (picklable) function;
    its return value must pickle (tensors are moved to the CPU). Raises
    :class:`DistributedTestError` with the failing rank's traceback if a rank raises, exits
    without a result, or the ranks run longer than ``timeout`` seconds in total.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    payload = pickle.dumps(
        (fn, args, kwargs, tensor_model_parallel_size, pipeline_model_parallel_size, seed)
    )
    ctx = _context()
    port = _free_port()
    procs, readers = [], []
    results: List[Any] = [None] * world_size
    pending = {}
    with tempfile.TemporaryDirectory(prefix="dchag_dist_") as tmp:
        stack_files = [os.path.join(tmp, f"rank{r}.stack") for r in range(world_size)]
        try:
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_child_main,
                    args=(rank, world_size, port, payload, writer,
                          stack_files[rank]),
                    name=f"dist-test-rank{rank}",
                    daemon=False,  # dist_checkpointing saves start their own worker processes
                )
                proc.start()
                writer.close()
                procs.append(proc)
                readers.append(reader)
                pending[reader] = rank
                pending[proc.sentinel] = rank

            deadline = time.monotonic() + timeout
            waiting_for = set(range(world_size))
            while waiting_for:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _raise_timeout(procs, waiting_for, stack_files, timeout)
                ready = multiprocessing.connection.wait(list(pending), timeout=remaining)
                for obj in ready:
                    rank = pending.pop(obj)
                    if obj is procs[rank].sentinel:
                        if rank in waiting_for and not readers[rank].poll():
                            procs[rank].join(_KILL_GRACE_S)
                            raise DistributedTestError(
                                f"rank {rank}/{world_size} exited with code "
                                f"{procs[rank].exitcode} without reporting a result"
                            )
                        continue
                    try:
                        status, body = obj.recv()
                    except EOFError:
                        status, body = "error", "(connection closed without a result)"
                    waiting_for.discard(rank)
                    if status != "ok":
                        raise DistributedTestError(
                            f"rank {rank}/{world_size} failed "
                            f"(TP={tensor_model_parallel_size}, "
                            f"PP={pipeline_model_parallel_size}):\n{body}"
                        )
                    results[rank] = pickle.loads(body)
            # Let the ranks exit on their own (their exit handlers stop helper processes).
            exit_deadline = time.monotonic() + _EXIT_GRACE_S
            for proc in procs:
                proc.join(max(0.0, exit_deadline - time.monotonic()))
        finally:
            _kill_process_groups(procs)
            for reader in readers:
                reader.close()
    return results


def _raise_timeout(procs: List[Any], waiting_for: set, stack_files: List[str],
                   timeout: float) -> None:
    for rank in sorted(waiting_for):
        if procs[rank].is_alive() and procs[rank].pid is not None:
            try:
                os.kill(procs[rank].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    time.sleep(0.5)
    stacks = "\n\n".join(
        f"--- rank {rank} stack ---\n{_read(stack_files[rank]) or '(none)'}"
        for rank in sorted(waiting_for)
    )
    raise DistributedTestError(
        f"ranks {sorted(waiting_for)} did not finish within {timeout:g} s; all ranks killed.\n"
        f"{stacks}"
    )


def run_single(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` as a one-rank job in a fresh process; return its result.

    Like :func:`run_distributed` with ``world_size=1`` (TP = PP = 1, seed 1234), so megatron's
    global state set up by ``fn`` never leaks into the test process. Keyword arguments named like
    :func:`run_distributed`'s options (``seed``, ``timeout``, ...) configure the run, not ``fn``.
    """
    return run_distributed(fn, 1, *args, **kwargs)[0]

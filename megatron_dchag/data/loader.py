"""Micro-batches loaded in background worker processes (``data.num_workers``, ``--num-workers``).

A stream is split in two. Its *plan*, in the training process, is cheap and stateful: it says
which samples the next micro-batch holds (a *description*, e.g. a list of ``(epoch, index)`` or
``(time_index, lead)`` keys) and owns the state saved in checkpoints. ``materialize(description)``
reads those samples and builds the tensors; it is a pure function of the description.

``num_workers=0`` materializes inline, in the training process (the same batches, bit for bit,
and no extra process). ``num_workers=N > 0`` materializes in N ``torch.utils.data.DataLoader``
worker processes, in order, at most ``prefetch_factor * N`` micro-batches ahead of the trainer.
Every description travels with the plan's state *after* it, so :meth:`MicroBatchLoader.state_dict`
is the state after the last micro-batch the trainer consumed, not after the prefetched ones, and a
checkpoint resumes exactly. :meth:`~MicroBatchLoader.load_state_dict` drops the prefetched batches
and stops the workers; they restart from the restored state at the next micro-batch.

Workers start on the first ``next`` (a stream that is built, then restored from a checkpoint,
starts them once) and run until :meth:`~MicroBatchLoader.close`, a restore or the end of the
process; the stream never ends, so ``persistent_workers`` has nothing to keep. On Linux they are
forked: that is quick (no re-import of torch and megatron), shares in-memory data (the ERA5 cache)
copy-on-write, and is safe after ``torch.distributed`` and CUDA set-up because workers only read
files and build CPU tensors (the datasets open their own file handles in a new process). Forked
workers ignore SIGINT and SIGTERM (SLURM sends SIGTERM to every process of a job): a stop request
is the trainer's, which finishes its step with them and saves; workers exit when the trainer
closes them or exits (or, if it is killed, within seconds, by torch's parent watchdog). Where
there is no fork (Windows) workers are spawned (the datasets pickle) and keep the default signal
handling. Worker seeds come from a private generator, so starting workers leaves torch's global
RNG untouched (the training numerics do not depend on ``num_workers``).

A data error in a worker reaches the trainer as the original exception (same type and message,
e.g. :class:`~megatron_dchag.data.hyperspectral.formats.CubeReadError` naming the file), with the
worker's traceback attached as its cause, instead of torch's "Caught ... in DataLoader worker
process 0" wrapper.
"""

from __future__ import annotations

import atexit
import copy
import multiprocessing
import pickle
import signal
import traceback
import weakref
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

PREFETCH_PER_WORKER = 2  # micro-batches each worker prepares ahead (DataLoader ``prefetch_factor``)


class MicroBatchStream:
    """An endless, resumable iterator of micro-batches for one data-parallel rank (what a task's
    ``train_stream`` / ``eval_stream`` return and the schedules draw from).

    ``state_dict()`` is the state after the last micro-batch returned by ``next`` (what a
    checkpoint saves); :class:`MicroBatchLoader` implements it with optional background worker
    processes (``data.num_workers``).
    """

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release background resources (worker processes); the stream stays usable."""


class MicroBatchPlan:
    """The training-process side of a stream: which samples the next micro-batch holds."""

    def next_description(self) -> Any:  # pragma: no cover - interface
        """Advance by one micro-batch and return what :func:`materialize` needs (small, picklable)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:  # pragma: no cover - interface
        """The state after the descriptions handed out so far (a fresh dict)."""
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class CountingPlan(MicroBatchPlan):
    """Micro-batch ``n`` (counted from ``start``) holds ``describe(n)``; the state is the counter,
    saved under ``key``."""

    def __init__(self, describe: Callable[[int], Any], key: str, start: int = 0):
        self.describe, self.key, self.count = describe, key, int(start)

    def next_description(self) -> Any:
        description = self.describe(self.count)
        self.count += 1
        return description

    def state_dict(self) -> Dict[str, Any]:
        return {self.key: self.count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.count = int(state[self.key])


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a data loader worker process (set as its cause)."""


class _WorkerFailure:
    """An exception caught in a worker, sent back as a value (picklable whatever the exception)."""

    def __init__(self, exc: Exception):
        self.type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        self.message = str(exc)
        self.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            blob = pickle.dumps(exc)
            pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt: check here
            self.blob: Optional[bytes] = blob
        except Exception:
            self.blob = None

    def exception(self) -> BaseException:
        exc: Optional[BaseException] = None
        if self.blob is not None:
            try:
                exc = pickle.loads(self.blob)
            except Exception:
                exc = None
        if exc is None:
            exc = RuntimeError(f"{self.type_name}: {self.message}")
        exc.__cause__ = WorkerTraceback("in a data loader worker process:\n" + self.traceback)
        return exc


class _Materialize(torch.utils.data.Dataset):
    """Map-style dataset whose "indices" are ``(state, description)``; runs in the workers."""

    def __init__(self, materialize: Callable[[Any], Any]):
        self.materialize = materialize

    def __getitem__(self, item: Tuple[Dict[str, Any], Any]) -> Tuple[Dict[str, Any], Any]:
        state, description = item
        try:
            return state, self.materialize(description)
        except Exception as exc:  # re-raised in the training process with its own type and message
            return state, _WorkerFailure(exc)


class _PlanSampler:
    """The DataLoader's index iterable: the plan's descriptions with the state after each one
    (iterated in the training process, ahead of the trainer by the prefetch)."""

    def __init__(self, plan: MicroBatchPlan):
        self.plan = plan

    def __iter__(self) -> Iterator[Tuple[Dict[str, Any], Any]]:
        while True:
            description = self.plan.next_description()
            yield self.plan.state_dict(), description


def _identity(x: Any) -> Any:
    return x


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CAN_MASK = hasattr(signal, "pthread_sigmask")


def _worker_init(worker_id: int) -> None:
    # A stop request (SIGINT / SIGTERM, e.g. sent to the whole job) is the trainer's to handle: it
    # still needs its workers to finish the step and save. The signals were blocked across a
    # fork (see MicroBatchLoader._start), so one sent before this point is dropped here too.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if _CAN_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


_running: "weakref.WeakSet[MicroBatchLoader]" = weakref.WeakSet()  # loaders whose workers are running
_atexit_registered = False


def _stop_all_workers() -> None:
    """At exit, before multiprocessing's own clean-up (which would SIGTERM the workers, which
    ignore it, and wait for them forever): stop every loader's workers."""
    for loader in list(_running):
        try:
            loader._stop_workers()
        except Exception:
            pass


def worker_context():
    """``fork`` where the platform has it (Linux), else ``spawn`` (see the module docstring)."""
    methods = multiprocessing.get_all_start_methods()
    return torch.multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class MicroBatchLoader(MicroBatchStream):
    """An endless, resumable stream of ``materialize(description)`` over ``plan``'s descriptions,
    inline (``num_workers=0``) or in ``num_workers`` background processes."""

    def __init__(self, plan: MicroBatchPlan, materialize: Callable[[Any], Any], num_workers: int = 0,
                 prefetch_factor: int = PREFETCH_PER_WORKER):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an integer >= 0")
        self.plan = plan
        self.materialize = materialize
        self.num_workers = num_workers
        self.prefetch_factor = int(prefetch_factor)
        self._iterator: Optional[Iterator] = None
        self._consumed: Optional[Dict[str, Any]] = None  # state after the last consumed batch (workers running)

    # -- iteration --------------------------------------------------------------------------------
    def __next__(self) -> Any:
        if self.num_workers == 0:
            return self.materialize(self.plan.next_description())
        if self._iterator is None:
            self._start()
        assert self._iterator is not None
        state, batch = next(self._iterator)
        if isinstance(batch, _WorkerFailure):
            self.close()  # back to the last consumed batch: a retry reads the failed one again
            raise batch.exception()
        self._consumed = state
        return batch

    def _start(self) -> None:
        self._consumed = self.plan.state_dict()
        context = worker_context()
        forked = context.get_start_method() == "fork"
        loader = torch.utils.data.DataLoader(
            _Materialize(self.materialize),
            batch_size=None,
            sampler=_PlanSampler(self.plan),
            num_workers=self.num_workers,
            collate_fn=_identity,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),  # faster host-to-GPU copies of the batches
            multiprocessing_context=context,
            worker_init_fn=_worker_init if forked else None,
            generator=torch.Generator().manual_seed(0),  # worker seeds; torch's global RNG untouched
        )
        global _atexit_registered
        if not _atexit_registered:
            # atexit runs last-registered first: this runs before multiprocessing's and torch's hooks.
            atexit.register(_stop_all_workers)
            _atexit_registered = True
        # Block SIGINT/SIGTERM while the workers are forked: they inherit the mask and ignore both
        # from their first instruction on; here a signal waits until the unblock, then reaches the
        # trainer.
        mask = _CAN_MASK and forked
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if mask else None
        try:
            self._iterator = iter(loader)
        finally:
            if previous is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        _running.add(self)

    def worker_pids(self) -> Tuple[int, ...]:
        """Process ids of the running workers (empty when none are running)."""
        workers = getattr(self._iterator, "_workers", None) or []
        return tuple(w.pid for w in workers)

    def _stop_workers(self) -> None:
        iterator, self._iterator = self._iterator, None
        _running.discard(self)
        if iterator is None:
            return
        workers = list(getattr(iterator, "_workers", None) or [])
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # asks the workers to exit and joins them (torch kills them with SIGTERM, ignored)
        for w in workers:
            if w.is_alive():  # e.g. stuck in a read
                w.kill()
                w.join(timeout=5)

    def close(self) -> None:
        """Stop the workers and drop the prefetched batches; the stream continues after the last
        consumed micro-batch (workers restart at the next ``next``)."""
        self._stop_workers()
        if self._consumed is not None:
            self.plan.load_state_dict(self._consumed)
            self._consumed = None

    def __del__(self) -> None:
        try:
            self._stop_workers()
        except Exception:
            pass

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if self._consumed is not None:
            return copy.deepcopy(self._consumed)
        return self.plan.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._stop_workers()  # the prefetched batches belong to another position
        self._consumed = None
        self.plan.load_state_dict(state)

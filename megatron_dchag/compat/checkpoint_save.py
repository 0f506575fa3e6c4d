"""How checkpoint shards are written: megatron-core's ``torch_dist`` format, written synchronously
in the training process itself.

megatron-core's default save strategy (``get_default_save_sharded_strategy()``, a
``TorchDistSaveShardedStrategy`` writing through ``FileSystemWriterAsync``) collects the write
results in a ``multiprocessing`` ``Manager().Queue()`` that it starts, with the ``spawn`` method,
at the first save and keeps for the life of the process (``filesystem_async``'s
``_results_queue``). That helper process:

* costs a Python start that re-imports ``__main__`` (about 20 s of the first save on 2 CPU
  cores), and
* lives in the rank's process group without its signal handlers, so a SIGTERM to the group (what
  SLURM sends before the walltime, or torch elastic's agent ``killpg``-ing each worker) kills it
  and the stop-save fails with ``BrokenPipeError``.

:class:`InProcessTorchDistSaveStrategy` is the same strategy (same planner, files, metadata and
format, so loads and older checkpoints are unaffected) with the results queue a plain in-process
``queue.Queue`` for the duration of the save, and ``thread_count=1``: one shard file per rank.

Differences between megatron-core releases, each with the releases it was seen on:

* :data:`FORKED_WRITERS_VERSIONS` (seen on 0.16.1): the writer forks one process per shard file
  (``write_preloaded_data_multiproc``). There the buckets are written in this process instead
  (:func:`_write_buckets_in_this_process`, the same per-bucket ``write_preloaded_data``).
  0.19.2 writes in threads of the calling process (``write_preloaded_data_multithread``; with one
  bucket, in the calling thread), which is kept as is.
* :data:`ASYNC_STRATEGY_ARGUMENT` (0.19.2): ``async_save`` takes ``async_strategy``; the
  synchronous save asks for ``"mcore"``, which logs "MCore's async save is deprecated" once per
  process although nothing runs asynchronously. That line is filtered out.

``tests/unit/test_checkpoint_save.py`` checks these assumptions on the installed megatron-core.
"""

from __future__ import annotations

import inspect
import logging
import queue
from contextlib import contextmanager
from functools import partial

from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

from megatron_dchag.compat.megatron import MEGATRON_CORE_VERSION, VersionRange

__all__ = [
    "ASYNC_STRATEGY_ARGUMENT",
    "FORKED_WRITERS_VERSIONS",
    "InProcessTorchDistSaveStrategy",
    "RESULTS_QUEUE_ATTRIBUTE",
]

# Releases whose FileSystemWriterAsync forks a process per shard file (seen on 0.16.1; 0.19.2
# uses threads; the releases in between were not tried).
FORKED_WRITERS_VERSIONS = VersionRange((0, 16, 0), (0, 17, 0))

# The module global of ``filesystem_async`` that holds the (lazily started) Manager queue.
RESULTS_QUEUE_ATTRIBUTE = "_results_queue"

# ``async_save``'s keyword that selects megatron-core's own implementation (0.19 and later).
ASYNC_STRATEGY_ARGUMENT = "async_strategy"
_TAKES_ASYNC_STRATEGY = ASYNC_STRATEGY_ARGUMENT in inspect.signature(TorchDistSaveShardedStrategy.async_save).parameters

_DEPRECATION_NOTE = "MCore's async save is deprecated"


class _DropSyncSaveDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _DEPRECATION_NOTE not in record.getMessage()


logging.getLogger(TorchDistSaveShardedStrategy.__module__).addFilter(_DropSyncSaveDeprecation())


@contextmanager
def _results_queue_in_this_process():
    """While the save is planned, megatron-core's writer takes an in-process queue for its
    results instead of starting (or reusing) the Manager process."""
    previous = getattr(filesystem_async, RESULTS_QUEUE_ATTRIBUTE)
    setattr(filesystem_async, RESULTS_QUEUE_ATTRIBUTE, queue.Queue())
    try:
        yield
    finally:
        setattr(filesystem_async, RESULTS_QUEUE_ATTRIBUTE, previous)


def _write_buckets_in_this_process(transform_list, use_msc, rank, write_buckets, results_queue) -> None:
    """What ``write_preloaded_data_multiproc`` does, without forking: each bucket (one shard file)
    written by ``write_preloaded_data``; the results (or the first error) go to ``results_queue``
    as ``{bucket index: [WriteResult, ...]}``."""
    results = {}
    extra = {"use_msc": use_msc} if use_msc else {}
    for index, bucket in enumerate(write_buckets):
        local_results, done = queue.Queue(), queue.Queue()
        done.put(index)  # write_preloaded_data takes it back when it has finished
        FileSystemWriterAsync.write_preloaded_data(transform_list, index, bucket, local_results, done, True, **extra)
        _, written = local_results.get_nowait()
        if isinstance(written, Exception):
            results = written
            break
        results[index] = written
    results_queue.put(results)


class InProcessTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's ``torch_dist`` save (format version 1), synchronous, without helper
    processes; pass it as ``dist_checkpointing.save(..., sharded_strategy=...)``."""

    def __init__(self):
        super().__init__("torch_dist", 1, thread_count=1)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        kwargs = {ASYNC_STRATEGY_ARGUMENT: "mcore"} if _TAKES_ASYNC_STRATEGY else {}
        with _results_queue_in_this_process():
            request = self.async_save(sharded_state_dict, checkpoint_dir, **kwargs)
        if MEGATRON_CORE_VERSION in FORKED_WRITERS_VERSIONS and request.async_fn is not None:
            # async_fn is partial(write_preloaded_data_multiproc, transform_list, use_msc)
            request = request._replace(async_fn=partial(_write_buckets_in_this_process, *request.async_fn.args))
        request.execute_sync()

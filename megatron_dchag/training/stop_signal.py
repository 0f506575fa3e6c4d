"""SIGTERM and SIGINT as a request to stop cleanly (no torch).

SLURM sends SIGTERM to every process of a job step before its time limit; torch elastic's agent
forwards the SIGTERM it gets to each rank's process group; Ctrl-C sends SIGINT to the terminal's
process group. Each of these, to any subset of the ranks, only sets :attr:`StopSignals.requested`;
the training loop checks it at every step boundary (all ranks agree through an all-reduce), saves
and exits 0.

The entry points install the handlers first thing, so a signal that arrives while the run starts
(imports, data checks, model build) is not lost: the run stops at its first step boundary. It also
keeps a rank that a launcher signals because another rank failed its config check alive long
enough to print the error. A second SIGINT raises ``KeyboardInterrupt`` (a stop that does not
wait for the save); repeated SIGTERMs (SLURM's and the agent's) change nothing.
"""

from __future__ import annotations

import signal
import threading
from typing import Dict


class StopSignals:
    def __init__(self):
        self.requested = False
        self._previous: Dict[int, object] = {}

    def install(self) -> None:
        """Install the handlers (idempotent; only from the main thread)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# The process's one instance: installed by the entry point, read by the Trainer.
STOP_SIGNALS = StopSignals()

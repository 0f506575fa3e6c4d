"""One run per save directory: a lock file held by the running job (no torch).

Two jobs writing checkpoints into one directory corrupt each other's resume (and one's saves would
delete the other's unfinished ones). That happens on clusters: torch elastic starts each rank in
its own session, so killing torchrun's process group leaves the ranks running while the user
relaunches; or one sbatch script is submitted twice.

Rank 0 of a training run with ``--save DIR`` creates ``DIR/.dchag-run.lock`` before anything else
is written, holding its host, PID, process start time and start date, and touches it every
:data:`HEARTBEAT_INTERVAL_S` seconds while it runs. The file is created by a hard link of a
finished temporary file, which is atomic on local and network file systems (NFS, Lustre, GPFS).

A second run finds the lock and stops with one line, unless the lock is stale:

* same host: its PID is not alive, or is alive with another start time (a reused PID);
* another host: not touched for :func:`heartbeat_timeout_s` seconds (default 600;
  ``MEGATRON_DCHAG_LOCK_TIMEOUT_S`` sets it). The host of a job cannot be asked whether its
  process lives, so a job on another host counts as alive while it keeps the heartbeat.

A stale lock is taken over with a notice; the new holder then removes the dead run's unfinished
saves. The lock is removed when the run ends, by any exit that runs Python's cleanup (a clean
stop, an error); after ``kill -9`` it stays, and is stale.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Optional, Tuple

from megatron_dchag.training.checkpoint_paths import LOCK_FILE, PROCESS_TAG

HEARTBEAT_INTERVAL_S = 30.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 600.0
TIMEOUT_VAR = "MEGATRON_DCHAG_LOCK_TIMEOUT_S"


class RunLockHeld(RuntimeError):
    """Another live run holds the save directory."""


def heartbeat_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_VAR, "")
    try:
        return float(value) if value else DEFAULT_HEARTBEAT_TIMEOUT_S
    except ValueError:
        return DEFAULT_HEARTBEAT_TIMEOUT_S


def process_start_ticks(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux ``/proc``; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in () may hold spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def describe_owner(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {owner.get('host', '?')}, PID {owner.get('pid', '?')}, started {when}"


def stale_reason(owner: dict, lock_age_s: float) -> Optional[str]:
    """Why the lock of ``owner`` (last touched ``lock_age_s`` ago) is stale; None if it is held."""
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int):
        if not _pid_alive(pid):
            return f"PID {pid} is not running"
        start = owner.get("process_start")
        if start is not None and process_start_ticks(pid) not in (None, start):
            return f"PID {pid} is now another process"
        return None
    timeout = heartbeat_timeout_s()
    if lock_age_s > timeout:
        return f"no heartbeat for {lock_age_s:.0f} s (more than {TIMEOUT_VAR}={timeout:.0f})"
    return None


class RunLock:
    """The lock of ``save_dir``, held by this process once :meth:`acquire` returned."""

    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self.path = os.path.join(save_dir, LOCK_FILE)
        self.owner = dict(host=socket.gethostname(), pid=os.getpid(), process_start=process_start_ticks(os.getpid()),
                          started=time.time(), tag=PROCESS_TAG)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Tuple[dict, float]:
        """The holder's record and the lock's age in seconds (an unreadable record is ``{}``)."""
        age = time.time() - os.stat(self.path).st_mtime
        try:
            with open(self.path) as fh:
                owner = json.load(fh)
        except (OSError, ValueError):
            owner = {}
        return (owner if isinstance(owner, dict) else {}), age

    def _create(self) -> bool:
        tmp = f"{self.path}.tmp-{PROCESS_TAG}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as fh:
            json.dump(self.owner, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a notice when a stale one was taken over. Raises
        :class:`RunLockHeld` when a live run holds it, ``OSError`` when the directory cannot be
        created or written."""
        os.makedirs(self.save_dir, exist_ok=True)
        notice = None
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return notice
            try:
                owner, age = self._read()
            except FileNotFoundError:  # released meanwhile
                continue
            reason = stale_reason(owner, age)
            if reason is None:
                raise RunLockHeld(
                    f"--save {self.save_dir} is in use by another run ({describe_owner(owner)}; lock {self.path}); "
                    "stop that run first (its ranks may outlive a killed launcher), or save elsewhere"
                )
            aside = f"{self.path}.stale-{PROCESS_TAG}"
            try:
                os.rename(self.path, aside)  # of two runs taking it over, one wins this rename
            except FileNotFoundError:
                continue
            os.remove(aside)
            notice = f"took over the stale lock of --save {self.save_dir} ({describe_owner(owner)}: {reason})"
        raise RunLockHeld(f"--save {self.save_dir}: could not take the lock {self.path} (another run keeps taking it)")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_INTERVAL_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if it is still this process's (idempotent)."""
        self._stop.set()
        try:
            owner, _ = self._read()
        except OSError:
            return
        if owner.get("tag") == PROCESS_TAG and owner.get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except OSError:
                pass

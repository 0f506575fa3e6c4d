"""The save directory's run lock and what counts as "no checkpoint yet" (no torch, no processes
besides one short-lived ``true`` for a dead PID)."""

import json
import os
import socket
import subprocess
import time

import pytest

from megatron_dchag.training import checkpoint_paths, run_lock
from megatron_dchag.training.checkpoint_paths import LOCK_FILE, holds_no_checkpoint_yet, remove_unfinished_saves
from megatron_dchag.training.run_lock import RunLock, RunLockHeld


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_lock(save_dir, **owner):
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, LOCK_FILE)
    with open(path, "w") as fh:
        json.dump(dict(dict(host=socket.gethostname(), pid=os.getpid(), process_start=None, started=time.time(),
                            tag="other"), **owner), fh)
    return path


def test_lock_is_created_refuses_a_second_holder_and_is_released(tmp_path):
    save = str(tmp_path / "run")
    lock = RunLock(save)
    assert lock.acquire() is None
    with open(os.path.join(save, LOCK_FILE)) as fh:
        owner = json.load(fh)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunLockHeld) as info:
        RunLock(save).acquire()  # this process is alive: the lock is held
    message = str(info.value)
    assert message.startswith(f"--save {save} is in use by another run") and f"PID {os.getpid()}" in message
    assert "\n" not in message
    lock.release()
    assert os.listdir(save) == []  # no temporary files left either
    assert RunLock(save).acquire() is None


@pytest.mark.parametrize("owner, reason", [
    (dict(pid=None), "is not running"),  # pid filled in with a dead one below
    (dict(process_start=-1), "is now another process"),  # this PID, another start time: a reused PID
    (dict(host="elsewhere.invalid"), "no heartbeat"),
])
def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, owner, reason):
    save = str(tmp_path / "run")
    if owner.get("pid", 0) is None:
        owner = dict(pid=_dead_pid())
    path = _write_lock(save, **owner)
    old = time.time() - 2 * run_lock.DEFAULT_HEARTBEAT_TIMEOUT_S
    os.utime(path, (old, old))
    lock = RunLock(save)
    notice = lock.acquire()
    assert notice.startswith(f"took over the stale lock of --save {save}") and reason in notice, notice
    with open(path) as fh:
        assert json.load(fh)["tag"] == checkpoint_paths.PROCESS_TAG
    lock.release()
    assert not os.path.exists(path)


def test_a_lock_of_another_host_is_held_while_its_heartbeat_is_fresh(tmp_path, monkeypatch):
    save = str(tmp_path / "run")
    path = _write_lock(save, host="elsewhere.invalid")
    with pytest.raises(RunLockHeld):
        RunLock(save).acquire()
    monkeypatch.setenv(run_lock.TIMEOUT_VAR, "5")
    old = time.time() - 10
    os.utime(path, (old, old))
    assert "no heartbeat for" in RunLock(save).acquire()


def test_release_leaves_another_runs_lock(tmp_path):
    save = str(tmp_path / "run")
    lock = RunLock(save)
    lock.acquire()
    path = _write_lock(save, tag="other")  # taken over meanwhile by another run
    lock.release()
    assert os.path.exists(path)


def test_no_checkpoint_yet_means_missing_empty_or_only_run_outputs(tmp_path):
    run = tmp_path / "run"
    assert holds_no_checkpoint_yet(str(run))
    run.mkdir()
    assert holds_no_checkpoint_yet(str(run))
    for name in (LOCK_FILE, "config.yaml", "metrics.jsonl", "iter_0000002.partial-deadbeef-0000"):
        (run / name).write_text("")
    (run / "tensorboard").mkdir()
    assert holds_no_checkpoint_yet(str(run))
    (run / "notes.txt").write_text("mine")
    assert not holds_no_checkpoint_yet(str(run))  # not ours: stays an error
    assert not holds_no_checkpoint_yet(str(run / "notes.txt"))


def test_unfinished_saves_are_removed_per_process_or_all(tmp_path):
    ours = f"iter_0000004.partial-{checkpoint_paths.PROCESS_TAG}-0001"
    theirs = "iter_0000004.partial-0123abcd-0001"
    for name in (ours, theirs, "iter_0000002"):
        (tmp_path / name).mkdir()
    remove_unfinished_saves(str(tmp_path), only_this_process=True)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", theirs]
    remove_unfinished_saves(str(tmp_path), only_this_process=False)
    assert os.listdir(tmp_path) == ["iter_0000002"]

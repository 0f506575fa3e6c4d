"""Crash-safe saves, clean stops on signals (any launcher), one run per save directory, first launches with
--load X --save X, non-finite steps, warm starts and bad input (pretrain_hyperspectral.py)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.limits import RUN_TIMEOUT_S

from tests.integration.conftest import (REPO, TINY_MAE, free_port, read_metrics, run_script, train_losses,
                                        wait_for_step)


def _args(data, *extra):
    return [*TINY_MAE, "--data-path", data["data"], f"data.stats_file={data['stats']}", *extra]


def test_kill_during_save_keeps_previous_checkpoint_and_resumes_exactly(hyperspectral_data, tmp_path):
    common = ["--train-iters", "12", "--save-interval", "4"]
    straight = tmp_path / "straight"
    assert run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--log-dir", str(straight)),
                      nproc=2).returncode == 0
    run = tmp_path / "run"
    crashed = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--save", str(run)), nproc=2,
                         env_extra={"MEGATRON_DCHAG_FAULT": "kill_in_save:8:after_write",
                                    "MEGATRON_DCHAG_FAULT_RANK": "1"})
    assert crashed.returncode != 0 and "kill_in_save:8" in crashed.stderr
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not (run / "iter_0000008").exists()  # the interrupted save never became visible
    resumed = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--save", str(run),
                                                            "--load", str(run)), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = train_losses(straight), train_losses(run)
    for step in range(1, 13):
        assert got[step] == expected[step], step
    assert not [p for p in os.listdir(run) if ".partial-" in p]  # leftovers of the crash were cleaned


def _start(args, nproc: int) -> subprocess.Popen:
    """A training run in its own session and process group (as a batch job's step is); its
    output goes to files, read back by :func:`_finish`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, "pretrain_hyperspectral.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "pretrain_hyperspectral.py", *args]
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
    proc.outputs = (out, err)
    return proc


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        _kill_group(proc.pid, signal.SIGKILL)
    out, err = proc.outputs
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(proc.args, returncode, out.read(), err.read())


def _kill_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _job_process_groups(launcher_pid: int) -> list:
    """The process groups of a run: the launcher's, and under torchrun each rank's own (torch
    elastic starts every rank in a new session)."""
    groups = {launcher_pid}
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True, text=True)
    for pid in children.stdout.split():
        try:
            groups.add(os.getpgid(int(pid)))
        except ProcessLookupError:
            pass
    return sorted(groups)


# Launcher, TP size, what receives SIGTERM, and the periodic save interval (1000: the stop is the
# first save). "group": the launcher's process group (Ctrl-C in a terminal, kill -TERM -PGID);
# "job": every process of the run, as SLURM signals a job step before its time limit.
SIGNAL_CASES = {
    "python-group-before-any-save": ("python", 1, "group", 1000),
    "python-group-after-a-periodic-save": ("python", 1, "group", 2),
    "torchrun-group-before-any-save": ("torchrun", 2, "group", 1000),
    "torchrun-job-after-a-periodic-save": ("torchrun", 2, "job", 2),
}
RESUME_TO = 20  # the uninterrupted reference and the resumed run stop here
_references: dict = {}


def _reference_losses(data, tmp_path_factory, launcher: str, tp: int) -> dict:
    """Train losses of an uninterrupted run to RESUME_TO (one per launcher, shared by its cases)."""
    if launcher not in _references:
        ref = tmp_path_factory.mktemp(f"reference_{launcher}")
        run_script("pretrain_hyperspectral.py",
                   _args(data, "--train-iters", "500", "--tensor-model-parallel-size", str(tp), "--log-dir", str(ref)),
                   nproc=tp, env_extra={"MEGATRON_DCHAG_FAULT": f"exit_after_iteration:{RESUME_TO}"})
        _references[launcher] = train_losses(ref)
    return _references[launcher]


@pytest.mark.parametrize("case", list(SIGNAL_CASES))
def test_sigterm_to_the_job_saves_exits_zero_and_resumes_exactly(hyperspectral_data, tmp_path, tmp_path_factory,
                                                                 case):
    launcher, tp, target, save_interval = SIGNAL_CASES[case]
    run = tmp_path / "run"
    common = ["--train-iters", "500", "--tensor-model-parallel-size", str(tp)]
    proc = _start(_args(hyperspectral_data, *common, "--save-interval", str(save_interval), "--save", str(run)),
                  nproc=tp)
    try:
        wait_for_step(run, 3, proc)
        groups = _job_process_groups(proc.pid) if target == "job" else [proc.pid]
        for pgid in groups:
            _kill_group(pgid, signal.SIGTERM)
    finally:
        res = _finish(proc)
    stopped_at = int((run / "latest_checkpointed_iteration.txt").read_text())
    names = os.listdir(run)
    assert 3 <= stopped_at < RESUME_TO, res.stderr[-2000:]
    assert f"iter_{stopped_at:07d}" in names and not [n for n in names if ".partial-" in n or "lock" in n], names
    assert (run / f"iter_{stopped_at:07d}" / "metadata.json").is_file()
    assert any(r.get("event") == "exit" for r in read_metrics(run))
    assert "BrokenPipe" not in res.stderr and "Unable to shutdown process" not in res.stderr, res.stderr[-2000:]
    if launcher == "python":
        assert res.returncode == 0, res.stderr[-2000:]
    else:
        # torchrun's agent forwards SIGTERM to the ranks, waits for them (they save and exit 0),
        # then re-raises the signal as its own SignalException: exit status 1 (docs/cluster.md).
        assert res.returncode == 1 and "SignalException" in res.stderr, res.stderr[-2000:]
        assert "ChildFailedError" not in res.stderr and 'pretrain_hyperspectral.py", line' not in res.stderr, \
            res.stderr[-2000:]
    # the sbatch pattern: --load X --save X, again and again
    resumed = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--load", str(run), "--save",
                                                            str(run)),
                         nproc=tp, env_extra={"MEGATRON_DCHAG_FAULT": f"exit_after_iteration:{RESUME_TO}"})
    expected, got = _reference_losses(hyperspectral_data, tmp_path_factory, launcher, tp), train_losses(run)
    assert sorted(got) == list(range(1, RESUME_TO + 1)), resumed.stderr[-2000:]
    for step in range(1, RESUME_TO + 1):
        assert got[step] == expected[step], step


def test_nonfinite_steps_are_skipped_then_stop_the_run(hyperspectral_data, tmp_path):
    one = ["--tensor-model-parallel-size", "1", "--train-iters", "6"]
    skipped = tmp_path / "skipped"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--log-dir", str(skipped)),
                     env_extra={"MEGATRON_DCHAG_FAULT": "nonfinite_at:3:2"})
    assert res.returncode == 0, res.stderr[-2000:]
    records = read_metrics(skipped)
    assert [r["step"] for r in records if r["kind"] == "skip"] == [3, 4]
    assert all(isinstance(r["loss"], float) for r in records if r["kind"] == "train")
    assert records[-1]["kind"] == "eval" and isinstance(records[-1]["loss"], float)

    stopped = tmp_path / "stopped"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--save", str(stopped),
                                                        "training.max_consecutive_nonfinite=3"),
                     env_extra={"MEGATRON_DCHAG_FAULT": "nonfinite_at:3:10"})
    assert res.returncode == 2
    assert "error: 3 consecutive non-finite steps" in res.stderr and "Traceback" not in res.stderr
    assert (stopped / "latest_checkpointed_iteration.txt").exists()  # the last good weights were saved


def test_finetune_and_architecture_checks(hyperspectral_data, tmp_path):
    one = ["--tensor-model-parallel-size", "1"]
    base = tmp_path / "base"
    assert run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--train-iters", "3", "--save",
                                                         str(base))).returncode == 0
    # --finetune: weights only, fresh optimizer and step 0, at another image size (position
    # embedding interpolated from the 4x4 to the 6x6 patch grid)
    ft = tmp_path / "ft"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--train-iters", "2", "--load",
                                                        str(base), "--finetune", "model.image_size=[24,24]",
                                                        "--save", str(ft)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(train_losses(ft)) == [1, 2]
    # plain --load at another image size is refused with the reason
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--train-iters", "5", "--load",
                                                        str(base), "model.image_size=[24,24]", "--log-dir",
                                                        str(tmp_path / "no")))
    assert res.returncode == 2 and "pos_embedding" in res.stderr and "--finetune" in res.stderr
    # another architecture: every difference listed
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--train-iters", "5", "--load",
                                                        str(base), "model.hidden_size=64", "model.num_layers=3",
                                                        "--log-dir", str(tmp_path / "no")))
    assert res.returncode == 2
    assert "model.hidden_size: checkpoint 32 vs config 64" in res.stderr
    assert "model.num_layers: checkpoint 2 vs config 3" in res.stderr
    assert not (tmp_path / "no").exists()


def _truncated_copy(data, root):
    bad = root / "bad_cubes"
    shutil.copytree(data["data"], bad)
    victim = sorted(bad.glob("*.h5"))[3]
    victim.write_bytes(victim.read_bytes()[:700])
    return bad, victim.name


@pytest.mark.parametrize("case", ["missing_config", "bad_yaml", "unknown_field", "truncated_hdf5", "channel_count",
                                  "not_a_checkpoint", "world_size", "batch_size"])
def test_bad_input_is_one_line_and_writes_nothing(hyperspectral_data, tmp_path, case):
    out = tmp_path / "out"
    one = ["--tensor-model-parallel-size", "1", "--train-iters", "2", "--save", str(out)]
    args, expect = _args(hyperspectral_data, *one), None
    if case == "missing_config":
        args, expect = ["--config", str(tmp_path / "nope.yaml"), "--save", str(out)], "nope.yaml' does not exist"
    elif case == "bad_yaml":
        (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
        args, expect = ["--config", str(tmp_path / "bad.yaml"), "--save", str(out)], "is not valid YAML"
    elif case == "unknown_field":
        args, expect = args + ["training.lrr=1"], "unknown config field 'training.lrr' (did you mean 'lr'?)"
    elif case == "truncated_hdf5":
        bad, name = _truncated_copy(hyperspectral_data, tmp_path)
        args, expect = _args(dict(hyperspectral_data, data=str(bad)), *one), name
    elif case == "channel_count":
        args, expect = args + ["model.num_channels=12"], "has 16 channels"
    elif case == "not_a_checkpoint":  # (a missing or empty --load starts from scratch, see below)
        (tmp_path / "no_ckpt").mkdir()
        (tmp_path / "no_ckpt" / "weights.bin").write_text("")
        args, expect = args + ["--load", str(tmp_path / "no_ckpt")], "no_ckpt' holds no complete checkpoint"
    elif case == "world_size":
        args, expect = args + ["--pipeline-model-parallel-size", "2"], "world size 1 is not divisible"
    elif case == "batch_size":
        args, expect = args + ["--global-batch-size", "3"], "global_batch_size=3 is not divisible"
    res = run_script("pretrain_hyperspectral.py", args)
    assert res.returncode == 2, (case, res.stderr[-2000:])
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], (case, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert not out.exists(), f"{case}: output written for bad input"
    if case == "unknown_field":
        debug = run_script("pretrain_hyperspectral.py", args + ["--debug"])
        assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_one_run_per_save_directory_and_a_first_launch_with_load_and_save_alike(hyperspectral_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".dchag-run.lock"
    one = ["--tensor-model-parallel-size", "1", "--train-iters", "2", "--eval-iters", "1", "--load", str(run),
           "--save", str(run)]
    # held: a live process on this host (the test itself)
    lock.write_text(json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), started=time.time())))
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one))
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--save {run} is in use by another run" in errors[0], res.stderr[-2000:]
    assert f"PID {os.getpid()}" in errors[0] and "Traceback" not in res.stderr
    assert os.listdir(run) == [lock.name]  # nothing written
    # stale: its PID is gone; it left an unfinished save behind
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps(dict(host=socket.gethostname(), pid=dead.pid, started=time.time())))
    (run / "iter_0000002.partial-0123abcd-0000").mkdir()
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one))
    assert res.returncode == 0, res.stderr[-2000:]
    notices = [line for line in res.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 2, res.stderr[-2000:]
    assert f"--load {run} holds no checkpoint yet; starting from scratch" in notices[0]
    assert f"took over the stale lock of --save {run}" in notices[1] and f"PID {dead.pid} is not running" in notices[1]
    assert sorted(p for p in os.listdir(run) if p.startswith(("iter_", "."))) == ["iter_0000002"]  # lock released
    # --skip-train --load: the evaluation is logged at the checkpoint's iteration
    evaluated = tmp_path / "eval"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--tensor-model-parallel-size", "1",
                                                        "--skip-train", "--eval-iters", "1", "--load", str(run),
                                                        "--log-dir", str(evaluated)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["step"] for r in read_metrics(evaluated) if r["kind"] == "eval"] == [2]


def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    res = run_script("pretrain_hyperspectral.py", [*TINY_MAE, "training.lrr=1", "--save", str(tmp_path / "out")],
                     nproc=2)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown config field 'training.lrr' (did you mean 'lr'?)"], res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr, res.stderr[-3000:]  # torchrun's report of the failed ranks
    assert not (tmp_path / "out").exists()

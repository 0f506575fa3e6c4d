"""``--num-workers`` end to end (pretrain_hyperspectral.py, one process, TP=1).

A run with 2 data loader workers is stopped by SIGTERM sent to every process of the run (workers
included, as SLURM does): it stops cleanly with a checkpoint and no worker outlives it. Resumed
with workers, it logs the same train and eval loss at every step, bit for bit, as a straight run
without workers.
"""

import os
import signal
import subprocess
import sys
import time

from tests.integration.conftest import REPO, TINY_MAE, read_metrics, run_script, wait_for_step
from tests.limits import RUN_TIMEOUT_S


def _args(data, *extra):
    return [*TINY_MAE, "--data-path", data["data"], f"data.stats_file={data['stats']}",
            "--tensor-model-parallel-size", "1", "--global-batch-size", "4", *extra]


def _losses(log_dir, kind):
    return {r["step"]: r["loss"] for r in read_metrics(log_dir) if r["kind"] == kind}


def test_workers_stop_on_sigterm_resume_exactly_and_match_inline(hyperspectral_data, tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    common = ["--train-iters", "500", "--eval-interval", "2"]
    # 1. Two workers; SIGTERM to the trainer and its workers: a clean stop with a checkpoint.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "pretrain_hyperspectral.py",
                             *_args(hyperspectral_data, *common, "--num-workers", "2", "--save", str(run))],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_step(run, 2, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, proc.stderr.read()[-2000:]
        deadline = time.time() + 10
        while True:  # no worker outlives the trainer
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.time() < deadline, "a data loader worker outlived the run"
            time.sleep(0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "num_workers: 2" in (run / "config.yaml").read_text()
    stopped_at = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert stopped_at >= 2 and any(r.get("event") == "exit" for r in read_metrics(run))
    # 2. Resume with workers for two more steps; 3. the same steps straight, without workers.
    last = stopped_at + 2
    fault = {"MEGATRON_DCHAG_FAULT": f"exit_after_iteration:{last}"}
    resumed = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--num-workers", "2", "--save",
                                                            str(run), "--load", str(run)), env_extra=fault)
    assert "fault injection" in resumed.stderr, resumed.stderr[-3000:]
    inline = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--num-workers", "0",
                                                           "--log-dir", str(straight)), env_extra=fault)
    assert "fault injection" in inline.stderr, inline.stderr[-3000:]
    expected, got = _losses(straight, "train"), _losses(run, "train")
    assert sorted(expected) == sorted(got) == list(range(1, last + 1))
    for step in expected:
        assert got[step] == expected[step], f"step {step}: workers {got[step]} vs inline {expected[step]}"
    expected, got = _losses(straight, "eval"), _losses(run, "eval")
    assert sorted(expected) == sorted(got) == list(range(2, last + 1, 2)) and got == expected

"""Shared fixtures for end-to-end runs of the entry scripts (torchrun, gloo, CPU)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.limits import RUN_TIMEOUT_S, STEP_WAIT_S

REPO = Path(__file__).resolve().parents[2]

TINY_MAE = [
    "--config", "configs/hyperspectral/tiny.yaml",
    "model.num_channels=16", "model.image_size=[16,16]", "model.patch_size=4", "model.hidden_size=32",
    "model.num_attention_heads=4", "model.channel_groups=4", "model.num_layers=2",
    "mae.decoder_hidden_size=32", "mae.decoder_num_attention_heads=4", "mae.decoder_num_layers=1",
    "--micro-batch-size", "2", "--log-interval", "1", "--eval-iters", "2", "--eval-interval", "0",
    "--lr", "1e-3", "training.lr_warmup_iters=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, args, nproc: int = 1, env_extra=None, timeout: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", script, *args]
    # Output goes to files and the run gets its own session, so that a stray helper process of a
    # killed rank can neither block the test on an open pipe nor outlive it.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())


def read_metrics(log_dir) -> list:
    path = Path(log_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(log_dir, step, proc, timeout=STEP_WAIT_S) -> None:
    """Wait until the run ``proc`` has logged train step ``step`` in ``log_dir``/metrics.jsonl."""
    deadline = time.time() + timeout
    path = Path(log_dir) / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, "run ended before it could be signalled"
        if path.exists():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if '"train"' in line]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise AssertionError("run did not reach the step")


def train_losses(log_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(log_dir) if r["kind"] == "train"}


@pytest.fixture(scope="session")
def hyperspectral_data(tmp_path_factory):
    """12 synthetic cubes of 16 channels (32x32) and their statistics."""
    root = tmp_path_factory.mktemp("hs")
    cubes, stats = root / "cubes", root / "stats.json"
    subprocess.run([sys.executable, "tools/make_synthetic_hyperspectral.py", "--out", str(cubes), "--num-cubes", "12",
                    "--channels", "16", "--height", "32", "--width", "32", "--feature-size", "8"],
                   cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "tools/compute_stats.py", "--data-path", str(cubes), "--out", str(stats), "--quiet"],
                   cwd=REPO, check=True, capture_output=True)
    return dict(data=str(cubes), stats=str(stats), root=root)


@pytest.fixture(scope="session")
def reference_checkpoint(hyperspectral_data, tmp_path_factory):
    """A 2-step tiny MAE run at TP=1 saved under ``<root>/run`` (checkpoint, metrics.jsonl,
    config.yaml), with the arguments that made it (``args``, without ``--save``)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    args = [*TINY_MAE, "--data-path", hyperspectral_data["data"], f"data.stats_file={hyperspectral_data['stats']}",
            "--tensor-model-parallel-size", "1", "--train-iters", "2", "--eval-iters", "0"]
    res = run_script("pretrain_hyperspectral.py", [*args, "--save", str(run)])
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(run=run, args=args)

"""The launch scripts (launch/) map Slurm's and torchrun's variables to each rank correctly.

The sbatch scripts run under a fake ``srun`` (one process per task, with the SLURM_* variables
srun would give it) and a probe entry script that prints what every task resolves through
``megatron_dchag.launch_env`` (the code ``initialize_distributed`` uses) and the environment the
scripts set. No Slurm, no GPU.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.limits import RUN_TIMEOUT_S, SHORT_TIMEOUT_S

REPO = Path(__file__).resolve().parents[2]

FAKE_SRUN = r"""#!/bin/bash
# srun stand-in: -N NODES -n TASKS --ntasks-per-node=P, other options ignored; runs the tasks one by one.
nodes=1; tasks=1; per_node=""
while [ $# -gt 0 ]; do
    case "$1" in
        -N) nodes="$2"; shift 2 ;;
        -n) tasks="$2"; shift 2 ;;
        --ntasks-per-node=*) per_node="${1#*=}"; shift ;;
        -*) echo "$1" >> "$FAKE_SRUN_LOG"; shift ;;
        *) break ;;
    esac
done
per_node="${per_node:-$(( (tasks + nodes - 1) / nodes ))}"
for ((i = 0; i < tasks; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$(( i % per_node )) SLURM_NODEID=$(( i / per_node )) SLURM_NTASKS=$tasks \
    SLURM_STEP_NUM_TASKS=$tasks "$@" || exit $?
done
"""

PROBE = r"""
import json, os, sys
from megatron_dchag.launch_env import resolve_launch_env
env = resolve_launch_env()
keys = ["OMP_NUM_THREADS", "NCCL_SOCKET_IFNAME", "FI_MR_CACHE_MONITOR", "FI_CXI_DEFAULT_CQ_SIZE", "NCCL_NET",
        "LD_LIBRARY_PATH", "MIOPEN_USER_DB_PATH", "MIOPEN_CUSTOM_CACHE_DIR", "HDF5_USE_FILE_LOCKING"]
record = json.dumps({"rank": env.rank, "local_rank": env.local_rank, "world_size": env.world_size,
                     "master_addr": env.master_addr, "master_port": env.master_port, "launcher": env.launcher,
                     "argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}})
# One write of the whole line: the ranks share the pipe, and print() issues the text and its
# newline as two writes when Python is unbuffered (PYTHONUNBUFFERED), so lines could interleave.
os.write(1, (record + "\n").encode())
"""


@pytest.fixture()
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    # A clean environment: no torchrun or Slurm variables from whoever runs the tests.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NCCL_", "FI_", "MIOPEN_")) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS", "DCHAG_HOME", "DCHAG_ENTRY")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DCHAG_PYTHON=sys.executable,
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_ID="4242",
        FAKE_SRUN_LOG=str(tmp_path / "srun_options.txt"),
        # torchrun variables of the submitting shell must not win over srun's
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
    )
    return env, probe, tmp_path


def _run(cmd, env):
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")], res


def test_frontier_sbatch_maps_slurm_tasks_to_ranks(fake_slurm):
    env, probe, tmp = fake_slurm
    env.update(SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="frontier[00012-00013]",
               DCHAG_AWS_OFI_RCCL="/opt/aws-ofi-rccl/lib", USER="tester")
    ranks, res = _run(["bash", "launch/frontier/pretrain.sbatch", str(probe), "--config", "configs/x.yaml",
                       "model.hidden_size=64", "--tensor-model-parallel-size", "8"], env)
    assert len(ranks) == 16
    for i, r in enumerate(ranks):
        assert (r["rank"], r["local_rank"], r["world_size"], r["launcher"]) == (i, i % 8, 16, "srun")
        assert r["master_addr"] == "frontier00012" and r["master_port"] == 10000 + 4242 % 20000
        assert r["argv"] == ["--config", "configs/x.yaml", "model.hidden_size=64", "--tensor-model-parallel-size", "8"]
        e = r["env"]
        assert e["OMP_NUM_THREADS"] == "7" and e["NCCL_SOCKET_IFNAME"] == "hsn0"
        assert e["FI_MR_CACHE_MONITOR"] not in (None, "memhooks") and int(e["FI_CXI_DEFAULT_CQ_SIZE"]) > 0
        assert e["LD_LIBRARY_PATH"].split(":")[0] == "/opt/aws-ofi-rccl/lib" and e["NCCL_NET"] == "AWS Libfabric"
        assert e["MIOPEN_USER_DB_PATH"] == e["MIOPEN_CUSTOM_CACHE_DIR"] == f"/tmp/tester-miopen-4242/rank{i % 8}"
        assert e["HDF5_USE_FILE_LOCKING"] == "FALSE"
    options = (tmp / "srun_options.txt").read_text().split()
    assert "-c7" in options and "--gpu-bind=closest" in options and "--gpus-per-task=1" in options


def test_generic_sbatch_and_default_entry(fake_slurm):
    env, probe, _ = fake_slurm
    env.update(SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="gpu[7,9-10]", GPUS_PER_NODE="2",
               CPUS_PER_TASK="4", DCHAG_ENTRY=str(probe), MASTER_PORT="3442")
    ranks, _ = _run(["bash", "launch/slurm/pretrain.sbatch", "--config", "c.yaml"], env)
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == [(i, i % 2, 6) for i in range(6)]
    assert {(r["master_addr"], r["master_port"]) for r in ranks} == {("gpu7", 3442)}
    assert all(r["argv"] == ["--config", "c.yaml"] and r["env"]["OMP_NUM_THREADS"] == "4" for r in ranks)


def test_sbatch_outside_an_allocation_fails_clearly(fake_slurm):
    env, probe, _ = fake_slurm
    res = subprocess.run(["bash", "launch/slurm/pretrain.sbatch", str(probe)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=SHORT_TIMEOUT_S)
    assert res.returncode != 0 and "SLURM_JOB_NODELIST" in res.stderr
    res = subprocess.run(["bash", "launch/slurm/pretrain.sbatch", "missing_entry.py"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=SHORT_TIMEOUT_S)
    assert res.returncode == 2 and "missing_entry.py" in res.stderr


def test_local_sh_runs_torchrun(fake_slurm):
    env, probe, _ = fake_slurm
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k)
    # Inside an allocation torchrun's variables win over the enclosing Slurm task's.
    env.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_JOB_NODELIST="nid[001-002]")
    ranks, _ = _run(["bash", "launch/local.sh", "-n", "2", str(probe), "training.seed=3"], env)
    assert sorted((r["rank"], r["local_rank"], r["world_size"], r["launcher"]) for r in ranks) == [
        (0, 0, 2, "torchrun"), (1, 1, 2, "torchrun")]
    assert all(r["master_addr"] == "127.0.0.1" and r["argv"] == ["training.seed=3"] for r in ranks)

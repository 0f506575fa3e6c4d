"""resolve_launch_env: torchrun, srun and plain-python environments (pure, no processes)."""

import pytest

from megatron_dchag.distributed import LaunchEnv, expand_hostlist, resolve_launch_env


def test_torchrun_variables():
    env = resolve_launch_env({
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
        "MASTER_ADDR": "node7", "MASTER_PORT": "1234",
    })
    assert env == LaunchEnv(rank=5, local_rank=1, world_size=8, master_addr="node7",
                            master_port=1234, launcher="torchrun")


def test_torchrun_variables_win_over_slurm():
    env = resolve_launch_env({
        "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501",
        # torchrun started inside an allocation: one Slurm task that spawned two workers.
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
        "SLURM_JOB_NODELIST": "nid[001-002]",
    })
    assert (env.launcher, env.rank, env.world_size, env.master_addr) == (
        "torchrun", 1, 2, "127.0.0.1"
    )


@pytest.mark.parametrize(
    "nodelist, first_host",
    [
        ("frontier[00012-00015,00020],login1", "frontier00012"),
        ("nid[001-002]", "nid001"),
        ("host1,host2", "host1"),
        ("gpu-node17", "gpu-node17"),
        ("rack[3-4]-n[08-09]", "rack3-n08"),
    ],
)
def test_slurm_variables(nodelist, first_host):
    env = resolve_launch_env({
        "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NTASKS": "16",
        "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "123456",
    })
    assert (env.launcher, env.rank, env.local_rank, env.world_size) == ("srun", 13, 5, 16)
    assert env.master_addr == first_host
    assert env.master_port == 10000 + 123456 % 20000


def test_slurm_master_port_differs_between_jobs_and_defaults_without_job_id():
    base = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
            "SLURM_NODELIST": "nid[001-002]"}
    ports = {resolve_launch_env({**base, "SLURM_JOB_ID": job}).master_port
             for job in ("1001", "1002", "1003")}
    assert len(ports) == 3 and all(1024 < p < 32768 for p in ports)
    env = resolve_launch_env(base)  # SLURM_NODELIST is the fallback node list
    assert (env.master_addr, env.master_port) == ("nid001", 29500)


def test_slurm_respects_exported_master_and_prefers_job_nodelist():
    base = {"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "4",
            "SLURM_JOB_NODELIST": "frontier[00100-00101]", "SLURM_NODELIST": "other1"}
    assert resolve_launch_env(base).master_addr == "frontier00100"
    env = resolve_launch_env({**base, "MASTER_ADDR": "frontier00100-hsn0",
                              "MASTER_PORT": "3442"})
    assert (env.master_addr, env.master_port) == ("frontier00100-hsn0", 3442)


def test_no_launcher_is_a_single_process():
    env = resolve_launch_env({})
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.master_addr) == (
        "python", 0, 0, 1, "127.0.0.1"
    )
    assert 0 < env.master_port < 65536


def test_expand_hostlist_keeps_zero_padding_and_order():
    assert expand_hostlist("frontier[00012-00015,00020],login1") == [
        "frontier00012", "frontier00013", "frontier00014", "frontier00015", "frontier00020",
        "login1",
    ]
    assert expand_hostlist("nid[008-011]") == ["nid008", "nid009", "nid010", "nid011"]
    assert expand_hostlist("n[9-11]") == ["n9", "n10", "n11"]
    assert expand_hostlist("a[1-2]b[3,5]") == ["a1b3", "a1b5", "a2b3", "a2b5"]
    assert expand_hostlist(" host1, host2 ") == ["host1", "host2"]


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"RANK": "0"}, "WORLD_SIZE"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "outside"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x'"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "node list"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "nid[002-001]"},
         "Descending"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "nid[001-002"},
         "Unbalanced"),
    ],
)
def test_inconsistent_variables_raise_clear_errors(environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_launch_env(environ)

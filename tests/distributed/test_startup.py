"""initialize_distributed on 4 gloo ranks: parallel_state groups, seeding, errors, reuse."""

import re

import pytest
import torch

from tests.dist_utils import DistributedTestError, run_distributed


def _layout():
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_dchag.compat.cpu import is_cpu_compat_installed
    from megatron_dchag.distributed import describe_parallel_layout

    return {
        "rank": dist.get_rank(),
        "env": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]),
        "backend": dist.get_backend(),
        "cpu_compat": is_cpu_compat_installed(),
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
               dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())),
        "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
               dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())),
        "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
               dist.get_process_group_ranks(ps.get_data_parallel_group())),
        "first_stage": ps.is_pipeline_first_stage(),
        "last_stage": ps.is_pipeline_last_stage(),
        # Seeds: torch/numpy/random draw the same on every rank (replicated weights rely on it).
        "draws": (torch.rand(3), float(__import__("numpy").random.rand()),
                  __import__("random").random()),
        "layout": describe_parallel_layout(),
    }


def test_tp2_pp1_world4():
    outs = run_distributed(_layout, 4, tensor_model_parallel_size=2)
    tp_groups = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    dp_groups = {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}
    for rank, out in enumerate(outs):
        assert out["rank"] == rank
        assert out["env"] == (str(rank), "4", "127.0.0.1")
        assert out["backend"] == "gloo" and out["cpu_compat"]
        assert out["tp"] == (rank % 2, 2, tp_groups[rank])
        assert out["pp"] == (0, 1, [rank])
        assert out["dp"] == (rank // 2, 2, dp_groups[rank])
        assert out["first_stage"] and out["last_stage"]
    _check_same_draws_and_layout(outs)
    assert "world 4 = TP 2 x PP 1 x DP 2" in outs[0]["layout"]


def test_tp2_pp2_world4():
    outs = run_distributed(_layout, 4, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    tp_groups = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    pp_groups = {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}
    for rank, out in enumerate(outs):
        assert out["tp"] == (rank % 2, 2, tp_groups[rank])
        assert out["pp"] == (rank // 2, 2, pp_groups[rank])
        assert out["dp"] == (0, 1, [rank])
        assert out["first_stage"] == (rank < 2) and out["last_stage"] == (rank >= 2)
    _check_same_draws_and_layout(outs)
    assert "world 4 = TP 2 x PP 2 x DP 1" in outs[0]["layout"]


def _check_same_draws_and_layout(outs):
    for out in outs[1:]:
        torch.testing.assert_close(out["draws"][0], outs[0]["draws"][0])
        assert out["draws"][1:] == outs[0]["draws"][1:]
        assert out["layout"] == outs[0]["layout"]
    # One line per rank in the layout table.
    assert sum(line.split()[0].isdigit() for line in outs[0]["layout"].splitlines()) == len(outs)


def _never_called():
    raise AssertionError("initialize_distributed should have failed first")


def test_world_size_not_divisible_by_tp_times_pp():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_never_called, 4, tensor_model_parallel_size=3, timeout=60)
    message = str(info.value)
    assert "ValueError: World size 4 is not divisible by tensor_model_parallel_size 3 x " \
           "pipeline_model_parallel_size 1 = 3" in message


def _reinitialize_with_existing_group():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_dchag.distributed import initialize_distributed

    group_before = dist.group.WORLD
    env = initialize_distributed(tensor_model_parallel_size=4, seed=7)
    return {
        "same_group": dist.group.WORLD is group_before,
        "env": (env.rank, env.world_size),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "draw": torch.rand(2),
    }


def test_existing_process_group_is_reused():
    outs = run_distributed(_reinitialize_with_existing_group, 4, tensor_model_parallel_size=2)
    torch.manual_seed(7)
    expected_draw = torch.rand(2)
    for rank, out in enumerate(outs):
        assert out["same_group"] and out["env"] == (rank, 4)
        assert (out["tp"], out["dp"]) == (4, 1)
        torch.testing.assert_close(out["draw"], expected_draw)


# The harness itself (tests/dist_utils.py): results, failures and hangs.


def _rank_and_tensor(scale, *, offset):
    import torch.distributed as dist

    return dist.get_rank(), torch.full((2,), scale * dist.get_rank() + offset)


def _hang_on_rank_1():
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(600)
    return "done"


def test_run_single_runs_one_rank_in_a_fresh_process():
    from tests.dist_utils import run_single

    rank, tensor = run_single(_rank_and_tensor, 3.0, offset=1.0)
    assert rank == 0 and torch.equal(tensor, torch.full((2,), 1.0))


def test_hung_rank_times_out_with_its_stack():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_hang_on_rank_1, 2, timeout=5)
    message = str(info.value)
    # Rank 0 normally finishes; on a badly overloaded machine it may still be starting up.
    assert re.search(r"ranks \[(0, )?1\] did not finish within 5 s; all ranks killed", message)
    # The hung rank's Python stack, taken just before it was killed.
    assert "--- rank 1 stack ---" in message and "in _child_main" in message

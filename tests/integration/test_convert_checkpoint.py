"""tools/convert_checkpoint.py: resharding and portable export/import are exact (weights and eval loss)."""

import math

import pytest
from safetensors.torch import load_file

from tests.integration.conftest import TINY_MAE, read_metrics, run_script


def _args(data, *extra):
    return [*TINY_MAE, "--data-path", data["data"], f"data.stats_file={data['stats']}", *extra]


def _convert(*args):
    res = run_script("tools/convert_checkpoint.py", list(map(str, args)))
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _eval_loss(data, load, tp, log_dir, pp=1):
    res = run_script("pretrain_hyperspectral.py", _args(data, "--skip-train", "--load", str(load),
                                                        "--tensor-model-parallel-size", str(tp),
                                                        "--pipeline-model-parallel-size", str(pp), "--log-dir",
                                                        str(log_dir)), nproc=tp * pp)
    assert res.returncode == 0, res.stderr[-3000:]
    return [r for r in read_metrics(log_dir) if r["kind"] == "eval"][-1]["loss"]


@pytest.fixture(scope="module")
def trained(hyperspectral_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    run = root / "tp2"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--train-iters", "6", "--save", str(run)),
                     nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    eval_loss = [r for r in read_metrics(run) if r["kind"] == "eval"][-1]["loss"]
    export = root / "run.safetensors"  # the weights every conversion below must keep, bit for bit
    _convert("--load", run, "--export", export)
    return dict(root=root, run=run, eval_loss=eval_loss, export=export)


def _same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].equal(tb[k]), k


def test_reshard_tp2_tp1_tp4_is_exact(hyperspectral_data, trained):
    root = trained["root"]
    _convert("--load", trained["run"], "--save", root / "tp1", "--target-tensor-model-parallel-size", 1)
    _convert("--load", root / "tp1", "--save", root / "tp4", "--target-tensor-model-parallel-size", 4)
    for name in ("tp1", "tp4"):
        _convert("--load", root / name, "--export", root / f"{name}.safetensors")
        _same_tensors(trained["export"], root / f"{name}.safetensors")
    for tp, ckpt in ((1, root / "tp1"), (4, root / "tp4")):
        loss = _eval_loss(hyperspectral_data, ckpt, tp, root / f"eval_tp{tp}")
        assert math.isclose(loss, trained["eval_loss"], rel_tol=1e-5), (tp, loss, trained["eval_loss"])


def test_reshard_pp1_pp2_pp1_is_exact(hyperspectral_data, trained):
    """PP=1 -> PP=2 (one backbone layer per stage; the channel stage on the first, the head on the
    last) -> PP=1: the same weights bit for bit, and the PP=2 checkpoint evaluates to the same loss."""
    root = trained["root"]
    _convert("--load", trained["run"], "--save", root / "pp2", "--target-tensor-model-parallel-size", 1,
             "--target-pipeline-model-parallel-size", 2)
    res = _convert("--load", root / "pp2", "--inspect")
    assert "layout {'tp': 1, 'pp': 2, 'dp': 1}" in res.stdout, res.stdout[:500]
    _convert("--load", root / "pp2", "--save", root / "pp2_pp1", "--target-pipeline-model-parallel-size", 1)
    for name in ("pp2", "pp2_pp1"):
        _convert("--load", root / name, "--export", root / f"{name}.safetensors")
        _same_tensors(trained["export"], root / f"{name}.safetensors")
    loss = _eval_loss(hyperspectral_data, root / "pp2", 1, root / "eval_pp2", pp=2)
    assert math.isclose(loss, trained["eval_loss"], rel_tol=1e-5), (loss, trained["eval_loss"])


def test_export_import_round_trip(hyperspectral_data, trained):
    root = trained["root"]
    _convert("--import", trained["export"], "--save", root / "imported", "--target-tensor-model-parallel-size", 2)
    _convert("--load", root / "imported", "--export", root / "b.safetensors")
    _same_tensors(trained["export"], root / "b.safetensors")
    loss = _eval_loss(hyperspectral_data, root / "imported", 2, root / "eval_imported")
    assert math.isclose(loss, trained["eval_loss"], rel_tol=1e-5)
    # an imported checkpoint holds weights only: resuming training from it is refused clearly
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--train-iters", "8", "--load",
                                                        str(root / "imported"), "--log-dir", str(root / "x"),
                                                        "--tensor-model-parallel-size", "1"), nproc=1)
    assert res.returncode == 2 and "holds weights only" in res.stderr, res.stderr[-2000:]
    assert not (root / "x").exists()


def test_inspect_lists_global_shapes_and_config(trained):
    res = _convert("--load", trained["run"], "--inspect")
    assert "encoder.channel_stage.tokenizer.weight.group0000" in res.stdout
    assert "(4, 32, 4, 4)" in res.stdout  # 16 channels in 4 groups, hidden 32, patch 4
    assert "task hyperspectral_mae" in res.stdout and "saved config:" in res.stdout


def test_bad_conversion_requests(trained, tmp_path):
    res = run_script("tools/convert_checkpoint.py", ["--load", str(tmp_path / "missing"), "--inspect"])
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = run_script("tools/convert_checkpoint.py", ["--load", str(trained["run"]), "--save", str(tmp_path / "o"),
                                                     "--target-tensor-model-parallel-size", "3"])
    assert res.returncode == 2 and "is not divisible by parallel.tensor_model_parallel_size=3" in res.stderr
    assert not (tmp_path / "o").exists()


def _one_rank_conversion_in_this_process():
    """Run inside a harness rank (an enclosing job's launcher variables): a one-rank conversion
    step runs in this process, as rank 0 of a world of 1, and leaves the variables as it found them."""
    import os

    import torch.distributed as dist

    from megatron_dchag.distributed import destroy_distributed
    from megatron_dchag.training.checkpoint_conversion import run_on_local_ranks

    destroy_distributed()  # the conversion makes its own one-rank job, as in the tool's process
    os.environ.update(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", SLURM_PROCID="5")
    before = dict(os.environ)
    seen = run_on_local_ranks(1, 1, 1, _rank_view)
    return seen, os.getpid(), dict(os.environ) == before, dist.is_initialized()


def _rank_view():
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state

    return (dist.get_rank(), dist.get_world_size(), parallel_state.get_tensor_model_parallel_world_size(),
            os.getpid())


def test_a_one_rank_step_runs_in_the_tool_process_and_restores_the_launcher_variables():
    from tests.dist_utils import run_single

    (rank, world, tp, pid_inside), pid, env_restored, still_initialized = run_single(
        _one_rank_conversion_in_this_process)
    assert (rank, world, tp) == (0, 1, 1)
    assert pid_inside == pid  # no second process (which would import torch and megatron-core again)
    assert env_restored and not still_initialized

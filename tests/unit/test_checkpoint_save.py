"""megatron_dchag.compat.checkpoint_save: the torch_dist save written in the training process.

Checks, on the installed megatron-core, what the strategy relies on (fails when upstream
changes it) and that a save with it starts no process and loads back exactly."""

import multiprocessing

import pytest

import torch

from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from megatron_dchag.compat import checkpoint_save
from megatron_dchag.compat.megatron import MEGATRON_CORE_VERSION
from tests.dist_utils import run_distributed


def test_megatron_core_still_keeps_the_write_results_queue_where_the_strategy_replaces_it():
    # The writer takes its results queue from this module global (creating a Manager when None).
    assert hasattr(filesystem_async, checkpoint_save.RESULTS_QUEUE_ATTRIBUTE)
    getter = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue
    marker = object()
    previous = getattr(filesystem_async, checkpoint_save.RESULTS_QUEUE_ATTRIBUTE)
    setattr(filesystem_async, checkpoint_save.RESULTS_QUEUE_ATTRIBUTE, marker)
    try:
        assert getter() is marker
    finally:
        setattr(filesystem_async, checkpoint_save.RESULTS_QUEUE_ATTRIBUTE, previous)
    # Forking writers exactly on the releases the range names (0.19 writes in threads).
    forks = hasattr(FileSystemWriterAsync, "write_preloaded_data_multiproc")
    assert forks == (MEGATRON_CORE_VERSION in checkpoint_save.FORKED_WRITERS_VERSIONS)


def _save_with_the_in_process_strategy(checkpoint_dir):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()

    def state(fill):
        shard = torch.arange(6, dtype=torch.float32).reshape(2, 3) + fill
        return {"w": ShardedTensor.from_rank_offsets("w", shard, (0, rank, size), replica_id=0)}

    for attempt in ("first", "second"):  # a second save in the same process works the same
        dist_checkpointing.save(state(10.0 * (rank + 1)), f"{checkpoint_dir}/{attempt}",
                                sharded_strategy=checkpoint_save.InProcessTorchDistSaveStrategy())
    children = multiprocessing.active_children()
    manager_started = getattr(filesystem_async, checkpoint_save.RESULTS_QUEUE_ATTRIBUTE) is not None
    with torch.no_grad():
        loaded = dist_checkpointing.load(state(0.0), f"{checkpoint_dir}/second")["w"]
    return dict(children=len(children), manager_started=manager_started, loaded=loaded)


def test_a_save_starts_no_process_loads_back_exactly_and_a_damaged_shard_is_named(tmp_path):
    from megatron_dchag.training.checkpointing import CheckpointError, check_shard_files

    for attempt in ("first", "second"):
        (tmp_path / attempt).mkdir()
    results = run_distributed(_save_with_the_in_process_strategy, 2, str(tmp_path), tensor_model_parallel_size=2)
    for rank, out in enumerate(results):
        assert out["children"] == 0 and not out["manager_started"], out
        expected = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10.0 * (rank + 1)
        assert torch.equal(out["loaded"], expected)
    names = sorted(p.name for p in (tmp_path / "second").iterdir())
    assert [n for n in names if n.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"]  # one file per rank
    assert "metadata.json" in names
    ckpt = tmp_path / "second"
    check_shard_files(str(ckpt))  # intact
    shard = ckpt / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=f"checkpoint '{ckpt}': shard file __1_0.distcp is truncated"):
        check_shard_files(str(ckpt))
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard file __1_0.distcp is missing"):
        check_shard_files(str(ckpt))


def test_export_target_is_checked_before_anything_runs(tmp_path):
    from megatron_dchag.cli.convert_checkpoint import _check_export_target
    from megatron_dchag.config import ConfigError

    existing = tmp_path / "model.safetensors"
    existing.write_text("")
    with pytest.raises(ConfigError, match="is a directory; name the file to write"):
        _check_export_target(str(tmp_path), overwrite=False)
    with pytest.raises(ConfigError, match="the file exists; give --overwrite to replace it"):
        _check_export_target(str(existing), overwrite=False)
    _check_export_target(str(existing), overwrite=True)
    _check_export_target(str(tmp_path / "new" / "model.safetensors"), overwrite=False)

"""``data.num_workers``: micro-batches built in DataLoader worker processes.

For both workloads' streams, workers give the same micro-batches as ``num_workers=0``; a state
saved while workers prefetch ahead resumes exactly; a data error in a worker surfaces with its own
type and message. Tiny synthetic data in ``tmp_path``; the file runs in a few seconds.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_dchag.config import ConfigError, load_config
from megatron_dchag.data.hyperspectral.formats import CubeReadError, write_hdf5_cube
from megatron_dchag.training.arguments import parse_run_arguments
from megatron_dchag.data.loader import MicroBatchLoader, MicroBatchPlan, WorkerTraceback

REPO = Path(__file__).resolve().parents[2]


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _take(stream, n):
    return [next(stream) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# The loader itself
# ------------------------------------------------------------------------------------------------


class CountingPlan(MicroBatchPlan):
    def __init__(self):
        self.i = 0

    def next_description(self):
        self.i += 1
        return self.i - 1

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = int(state["i"])


class BadSample(ValueError):
    """A data error with the file in its message."""


def materialize(i):
    if i == 5:
        raise BadSample(f"sample {i}: /data/broken_005.h5 is truncated")
    return {"x": torch.full((3,), float(i)), "pid": os.getpid()}


def test_workers_keep_the_order_state_and_global_rng():
    rng_before = torch.get_rng_state()
    inline, workers = MicroBatchLoader(CountingPlan(), materialize, 0), MicroBatchLoader(CountingPlan(), materialize, 2)
    try:
        got = _take(workers, 4)
        assert [int(b["x"][0]) for b in got] == [0, 1, 2, 3]
        assert {b["pid"] for b in got}.isdisjoint({os.getpid()}) and len({b["pid"] for b in got}) == 2
        assert workers.state_dict() == {"i": 4} and workers.plan.i > 4  # prefetched ahead, saved as consumed
        assert torch.equal(torch.get_rng_state(), rng_before)  # worker seeds come from a private generator
        assert len(workers.worker_pids()) == 2
        workers.close()
        assert workers.worker_pids() == () and workers.plan.i == 4 and workers.state_dict() == {"i": 4}
        assert int(next(workers)["x"][0]) == 4  # restarts after the last consumed batch
        assert [int(b["x"][0]) for b in _take(inline, 5)] == [0, 1, 2, 3, 4]
    finally:
        workers.close()


def test_worker_error_keeps_its_type_and_message_and_the_batch_is_retried():
    stream = MicroBatchLoader(CountingPlan(), materialize, 2)
    try:
        _take(stream, 5)
        with pytest.raises(BadSample) as info:
            next(stream)
        assert str(info.value) == "sample 5: /data/broken_005.h5 is truncated"
        assert isinstance(info.value.__cause__, WorkerTraceback) and "in materialize" in str(info.value.__cause__)
        assert stream.state_dict() == {"i": 5} and stream.worker_pids() == ()
        with pytest.raises(BadSample):  # the failed micro-batch is read again, not skipped
            next(stream)
    finally:
        stream.close()


def test_workers_ignore_sigterm_the_trainer_handles_it():
    stream = MicroBatchLoader(CountingPlan(), materialize, 2)
    try:
        next(stream)
        pids = stream.worker_pids()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)  # what SLURM sends to every process of the job
        time.sleep(0.3)
        assert [int(b["x"][0]) for b in _take(stream, 3)] == [1, 2, 3]
        assert stream.worker_pids() == pids
    finally:
        stream.close()


def test_num_workers_is_validated():
    assert load_config(None, ["data.num_workers=3"]).data.num_workers == 3
    with pytest.raises(ConfigError, match=r"^data\.num_workers=-1 must be >= 0"):
        load_config(None, ["data.num_workers=-1"])
    with pytest.raises(ConfigError, match=r"^data\.num_workers=1\.5 must be an integer"):
        load_config(None, ["data.num_workers=1.5"])
    args = parse_run_arguments(["--num-workers", "2"], "test", world_size=1)
    assert args.config.data.num_workers == 2
    with pytest.raises(ConfigError, match="--num-workers"):
        parse_run_arguments(["--num-workers", "two"], "test", world_size=1)
    with pytest.raises(ValueError, match="num_workers"):
        MicroBatchLoader(CountingPlan(), materialize, -1)


# ------------------------------------------------------------------------------------------------
# Hyperspectral MAE
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def cubes(tmp_path):
    root = tmp_path / "cubes"
    rng = np.random.default_rng(0)
    for i in range(8):
        write_hdf5_cube(root / f"cube_{i:02d}.h5", rng.uniform(0, 1000, (8, 20, 20)).astype(np.float32))
    return root


def _mae_stream(root, num_workers):
    from megatron_dchag.tasks.mae_pretraining import HyperspectralMAETask

    cfg = load_config(None, [f"data.data_path={root}", "model.num_channels=8", "model.image_size=[16,16]",
                             "model.patch_size=4", "training.micro_batch_size=2", "data.val_fraction=0.25",
                             f"data.num_workers={num_workers}"])
    task = HyperspectralMAETask(cfg)
    task.prepare()
    rank = SimpleNamespace(input_channel_range=(2, 6), encoder=SimpleNamespace(grid=(4, 4)))  # a TP rank's channels
    return task.train_stream(rank, dp_rank=0, dp_size=1)


def test_mae_workers_give_the_same_batches_and_resume_exactly(cubes):
    inline = _mae_stream(cubes, 0)
    expected = _take(inline, 8)  # 6 training cubes, 2 per batch: crosses two epoch boundaries
    workers = _mae_stream(cubes, 2)
    try:
        for want, got in zip(expected, _take(workers, 5)):
            _assert_same(want, got)
        saved = workers.state_dict()
        assert saved["epoch"] == 1 and saved["position"] == 4  # 10 samples consumed, not the prefetched ones
        resumed = _mae_stream(cubes, 2)
        resumed.load_state_dict(saved)
        for want, got in zip(expected[5:], _take(resumed, 3)):
            _assert_same(want, got)
        resumed.close()
        # Restoring a running stream drops its prefetched batches.
        workers.load_state_dict(_mae_stream(cubes, 0).state_dict())
        _assert_same(expected[0], next(workers))
    finally:
        workers.close()


def test_mae_worker_read_error_names_the_file(cubes):
    stream = _mae_stream(cubes, 2)
    for path in cubes.glob("*.h5"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    try:
        with pytest.raises(CubeReadError) as info:
            next(stream)
        first_line = str(info.value).splitlines()[0]
        assert first_line.startswith(str(cubes)) and ".h5: cannot open HDF5 file (truncated or corrupt?)" in first_line
        assert "DataLoader worker" not in str(info.value)
    finally:
        stream.close()


# ------------------------------------------------------------------------------------------------
# ERA5 forecasting
# ------------------------------------------------------------------------------------------------

CHANNELS = ["z_500", "z_850", "t_500", "t_850", "u_500", "v_850", "q_850", "t2m", "u10", "v10", "lsm", "orography"]


@pytest.fixture(scope="module")
def era5(tmp_path_factory):
    from megatron_dchag.cli import compute_era5_stats as stats_tool
    from megatron_dchag.cli import make_synthetic_era5 as synth

    root = tmp_path_factory.mktemp("era5")
    data, stats = root / "synth.zarr", root / "stats.npz"
    synth.write_era5(synth.generate_synthetic_era5(days=8, resolution=22.5, levels=[500, 850], seed=1), data)
    stats_tool.save_era5_stats(stats, stats_tool.compute_era5_stats(str(data), log=lambda *a: None))
    return dict(data=str(data), stats=str(stats))


def _era5_task(era5, num_workers):
    from megatron_dchag.tasks.forecasting import ERA5ForecastTask

    cfg = load_config(str(REPO / "configs/era5/tiny.yaml"), [
        f"data.channels=[{','.join(CHANNELS)}]", f"model.num_channels={len(CHANNELS)}", "model.image_size=[8,16]",
        "model.channel_groups=4", "forecast.max_lead_hours=24", "forecast.eval_lead_hours=[6,24]",
        "forecast.metric_variables=[z_500,t_850,t2m]", f"data.data_path={era5['data']}",
        f"data.stats_file={era5['stats']}", "training.micro_batch_size=2", f"data.num_workers={num_workers}",
    ])
    task = ERA5ForecastTask(cfg)
    task.prepare()
    return task


RANK1 = SimpleNamespace(input_channel_range=(3, 6), output_channel_range=(3, 6))  # TP rank 1 of G=4 groups


def test_era5_train_stream_workers_same_batches_and_exact_resume(era5):
    expected = _take(_era5_task(era5, 0).train_stream(RANK1, 0, 1), 8)
    task = _era5_task(era5, 2)
    workers = task.train_stream(RANK1, 0, 1)
    try:
        for want, got in zip(expected, _take(workers, 4)):
            _assert_same(want, got)
        assert workers.state_dict() == {"step": 4}
        resumed = task.train_stream(RANK1, 0, 1)
        resumed.load_state_dict(workers.state_dict())
        for want, got in zip(expected[4:], _take(resumed, 4)):
            _assert_same(want, got)
        resumed.close()
    finally:
        workers.close()


def test_era5_eval_stream_and_uncached_reads_in_workers(era5):
    from megatron_dchag.data.era5.dataset import ERA5Dataset
    from megatron_dchag.data.sampler import ERA5TrainBatchSampler
    from megatron_dchag.tasks.forecasting import ForecastTrainStream

    inline_task, worker_task = _era5_task(era5, 0), _era5_task(era5, 2)
    rank = SimpleNamespace(**vars(RANK1), output_channel_names=CHANNELS[3:6], output_input_index=torch.arange(3, 6))
    expected = _take(inline_task.eval_stream(rank, 0, 1), 3)
    workers = worker_task.eval_stream(rank, 0, 1)
    try:
        for want, got in zip(expected, _take(workers, 3)):
            assert got["_eval"] is True
            _assert_same(want, got)
    finally:
        workers.close()
    # Without the in-memory cache every worker opens the zarr store itself.
    ds = ERA5Dataset(era5["data"], CHANNELS, channel_range=(3, 6), max_lead_hours=24, stats_file=era5["stats"],
                     split="train", val_fraction=0.2, cache=False)
    inline = ForecastTrainStream(ds, ERA5TrainBatchSampler(ds, 2, seed=3))
    workers = ForecastTrainStream(ds, ERA5TrainBatchSampler(ds, 2, seed=3), num_workers=2)
    try:
        for want, got in zip(_take(inline, 3), _take(workers, 3)):
            _assert_same(want, got)
    finally:
        workers.close()

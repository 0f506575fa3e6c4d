"""The data-parallel sampler of both workloads: sharding, seeded epochs, exact resume, batch views.

The ``RECORDED_*`` literals are the sequences the samplers produced before the forecasting batch
samplers were built on :class:`DistributedResumableSampler` (each then had its own permutation,
slicing and resume code). They pin the orders: the same seeds must keep giving the same samples,
so MAE pretraining logs the same losses and a forecasting run resumes exactly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_dchag.data.era5.leads import sample_lead_hours
from megatron_dchag.data.sampler import DistributedResumableSampler, ERA5EvalBatchSampler, ERA5TrainBatchSampler


def _take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


# ----------------------------------------------------------------------------------------------
# Recorded sequences
# ----------------------------------------------------------------------------------------------

# (dataset_size, num_replicas, rank, seed, shuffle, drop_last) -> the first (epoch, index) pairs.
RECORDED_MAE_ORDERS = {
    (10, 2, 1, 5, True, True): [(0, 2), (0, 0), (0, 9), (0, 8), (0, 4), (1, 5), (1, 1), (1, 6), (1, 4), (1, 0),
                                (2, 7), (2, 0), (2, 3), (2, 1), (2, 4), (3, 0)],
    (7, 3, 0, 1234, True, False): [(0, 2), (0, 5), (0, 0), (1, 0), (1, 6), (1, 3), (2, 5), (2, 4), (2, 3), (3, 6)],
    (5, 2, 1, 0, False, False): [(0, 1), (0, 3), (0, 0), (1, 1), (1, 3), (1, 0), (2, 1), (2, 3), (2, 0), (3, 1)],
    (9, 2, 0, 2**33 + 7, True, True): [(0, 2), (0, 8), (0, 4), (0, 1), (1, 2), (1, 4), (1, 6), (1, 5), (2, 2), (2, 6),
                                       (2, 0), (2, 7), (3, 4)],
}

# The state after 9 samples per rank of a 12-sample dataset at DP=2 (seed 3), resumed at DP=1 and
# DP=3: (num_replicas, rank) -> the next five indices.
RECORDED_DP_RESUME = {
    (1, 0): [5, 9, 8, 4, 11],
    (2, 0): [5, 8, 11, 3, 0],
    (2, 1): [9, 4, 7, 10, 5],
    (3, 0): [5, 4, 3, 5, 4],
    (3, 1): [9, 11, 10, 7, 8],
    (3, 2): [8, 7, 0, 9, 2],
}

FORECAST_STARTS = [2, 3, 5, 6, 7, 8, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23]  # valid initial time indices

# (micro_batch_size, dp_size, dp_rank, seed, shuffle, max_lead_hours, min_lead_hours) -> per step
# (lead, time indices), steps 0.. (17 starts: 8, 4, 2 and 5 steps per epoch: several epochs).
RECORDED_FORECAST_TRAIN = {
    (2, 1, 0, 7, True, 24, None): [(24, [17, 19]), (6, [6, 5]), (6, [13, 23]), (12, [14, 7]), (24, [11, 2]),
                                   (24, [22, 8]), (24, [10, 15]), (18, [18, 3]), (24, [7, 5]), (6, [3, 11])],
    (2, 2, 0, 11, True, 24, None): [(24, [2, 18]), (12, [21, 23]), (18, [6, 8]), (12, [10, 3]), (18, [5, 3]),
                                    (24, [11, 10]), (18, [23, 6]), (24, [13, 14]), (18, [23, 19]), (18, [7, 13])],
    (2, 2, 1, 11, True, 24, None): [(24, [17, 11]), (12, [13, 14]), (18, [22, 7]), (12, [15, 19]), (18, [15, 17]),
                                    (24, [21, 18]), (18, [19, 8]), (24, [2, 7]), (18, [11, 15]), (18, [10, 18])],
    (3, 2, 1, 5, False, 72, 12): [(72, [6, 7, 8]), (24, [14, 15, 17]), (48, [6, 7, 8]), (12, [14, 15, 17]),
                                  (72, [6, 7, 8]), (30, [14, 15, 17]), (36, [6, 7, 8]), (66, [14, 15, 17])],
    (1, 3, 2, 2**40 + 3, True, 48, None): [(42, [5]), (24, [17]), (6, [15]), (18, [18]), (24, [10]), (42, [23]),
                                           (6, [22]), (42, [8]), (24, [13]), (12, [21])],
}

# (micro_batch_size, dp_size, dp_rank, stride, max_batches_per_lead) -> (batches_per_lead, per batch
# (lead, time indices)); evaluation leads [6, 24, 12].
RECORDED_FORECAST_EVAL = {
    (2, 2, 1, 2, None): (2, [(6, [7, 10]), (6, [18, 21]), (24, [7, 10]), (24, [18, 21]), (12, [7, 10]),
                             (12, [18, 21])]),
    (2, 1, 0, 1, 3): (3, [(6, [2, 3]), (6, [5, 6]), (6, [7, 8]), (24, [2, 3]), (24, [5, 6]), (24, [7, 8]),
                          (12, [2, 3]), (12, [5, 6]), (12, [7, 8])]),
    (3, 2, 0, 1, None): (2, [(6, [2, 3, 5]), (6, [10, 11, 13]), (24, [2, 3, 5]), (24, [10, 11, 13]),
                             (12, [2, 3, 5]), (12, [10, 11, 13])]),
    (1, 3, 2, 3, 2): (2, [(6, [10]), (6, [22]), (24, [10]), (24, [22]), (12, [10]), (12, [22])]),
}


def _forecast_dataset(max_lead_hours=24, min_lead_hours=None, lead_times_hours=None):
    """What the forecasting samplers read of an ERA5Dataset."""
    return SimpleNamespace(valid_start_indices=np.asarray(FORECAST_STARTS), max_lead_hours=max_lead_hours,
                           lead_step_hours=6, min_lead_hours=min_lead_hours, lead_times_hours=lead_times_hours,
                           active_leads=sorted(set(lead_times_hours or [])))


def _as_pairs(steps):
    return [[(t, lead) for t in times] for lead, times in steps]


@pytest.mark.parametrize("config", list(RECORDED_MAE_ORDERS))
def test_mae_order_is_the_recorded_one(config):
    n, dp, rank, seed, shuffle, drop_last = config
    sampler = DistributedResumableSampler(n, dp, rank, seed=seed, shuffle=shuffle, drop_last=drop_last, yield_epoch=True)
    expected = RECORDED_MAE_ORDERS[config]
    assert _take(sampler, len(expected)) == expected


def test_resume_on_another_data_parallel_size_is_the_recorded_one():
    state = DistributedResumableSampler(12, 2, 0, seed=3).state_dict_for_consumed(9)
    assert (state["epoch"], state["position"]) == (1, 3)
    for (dp, rank), expected in RECORDED_DP_RESUME.items():
        sampler = DistributedResumableSampler(12, dp, rank, seed=3)
        sampler.load_state_dict(dict(state))
        assert _take(sampler, 5) == expected, (dp, rank)


@pytest.mark.parametrize("config", list(RECORDED_FORECAST_TRAIN))
def test_forecast_train_batches_are_the_recorded_ones(config):
    batch, dp, rank, seed, shuffle, max_lead, min_lead = config
    expected = _as_pairs(RECORDED_FORECAST_TRAIN[config])
    sampler = ERA5TrainBatchSampler(_forecast_dataset(max_lead, min_lead), batch, seed=seed, data_parallel_rank=rank,
                                    data_parallel_size=dp, num_steps=len(expected), shuffle=shuffle)
    assert list(sampler) == expected
    # Resuming at any step replays the rest exactly; batch(step) is a pure function of the step.
    resumed = ERA5TrainBatchSampler(_forecast_dataset(max_lead, min_lead), batch, seed=seed, data_parallel_rank=rank,
                                    data_parallel_size=dp, start_step=5, num_steps=len(expected) - 5, shuffle=shuffle)
    assert list(resumed) == expected[5:]
    assert [sampler.batch(step) for step in reversed(range(len(expected)))] == expected[::-1]


def test_forecast_train_steps_are_one_order_dealt_in_blocks():
    """All DP ranks of a step share its lead and together take one block of the epoch's order."""
    ds = _forecast_dataset()
    ranks = [ERA5TrainBatchSampler(ds, 2, seed=11, data_parallel_rank=r, data_parallel_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == 4  # 17 starts, 4 per step: one start dropped per epoch
    for epoch in range(3):
        epoch_times = []
        for step in range(epoch * 4, (epoch + 1) * 4):
            batches = [s.batch(step) for s in ranks]
            assert {lead for b in batches for _, lead in b} == {sample_lead_hours(11, step, 24, 6)}
            epoch_times += [t for b in batches for t, _ in b]
        assert len(set(epoch_times)) == 16 and set(epoch_times) <= set(FORECAST_STARTS)


@pytest.mark.parametrize("config", list(RECORDED_FORECAST_EVAL))
def test_forecast_eval_batches_are_the_recorded_ones(config):
    batch, dp, rank, stride, max_batches = config
    batches_per_lead, expected = RECORDED_FORECAST_EVAL[config]
    sampler = ERA5EvalBatchSampler(_forecast_dataset(lead_times_hours=[6, 24, 12]), batch, data_parallel_rank=rank,
                                   data_parallel_size=dp, stride=stride, max_batches_per_lead=max_batches)
    assert sampler.batches_per_lead == batches_per_lead and len(sampler) == len(expected)
    assert list(sampler) == _as_pairs(expected)


# ----------------------------------------------------------------------------------------------
# Sharding, seeding and resume
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_are_disjoint_and_cover_the_epoch(drop_last):
    n, dp = 10, 3
    shards = [list(DistributedResumableSampler(n, dp, r, seed=1, drop_last=drop_last, infinite=False)) for r in range(dp)]
    lengths = {len(s) for s in shards}
    if drop_last:
        assert lengths == {3}
        flat = sum(shards, [])
        assert len(set(flat)) == 9  # disjoint, one remainder sample dropped
    else:
        assert lengths == {4}
        assert set(sum(shards, [])) == set(range(n))  # covers everything; 2 padded repeats
    assert sorted(DistributedResumableSampler(n, 1, 0, seed=1, infinite=False)) == list(range(n))


@pytest.mark.parametrize("drop_last", [True, False])
def test_blocks_deal_each_round_of_the_global_order(drop_last):
    n, dp, block = 11, 2, 3
    samplers = [DistributedResumableSampler(n, dp, r, seed=4, drop_last=drop_last, block_size=block) for r in range(dp)]
    per_rank = samplers[0].samples_per_rank
    assert per_rank == (3 if drop_last else 6) and per_rank % block == 0
    order = samplers[0].global_order(0)
    for r, s in enumerate(samplers):
        rounds = [order[k * block * dp + r * block : k * block * dp + (r + 1) * block] for k in range(per_rank // block)]
        assert s.rank_order(0).tolist() == np.concatenate(rounds).tolist()
    # indices() crosses epoch boundaries like the iteration does, without touching its state.
    s = samplers[1]
    assert s.indices(2, 2 * per_rank).tolist() == _take(s, 3 * per_rank)[2 : 2 + 2 * per_rank]
    assert s.indices(5, 0).tolist() == []


def test_order_is_seeded_per_epoch_and_resumes_exactly():
    fresh = DistributedResumableSampler(10, 2, 1, seed=5)
    reference = _take(fresh, 23)  # 5 per epoch: crosses four epoch boundaries
    assert fresh.global_order(0).tolist() != fresh.global_order(1).tolist()  # reshuffled every epoch
    assert _take(DistributedResumableSampler(10, 2, 1, seed=5), 23) == reference
    assert _take(DistributedResumableSampler(10, 2, 1, seed=6), 23) != reference

    first = DistributedResumableSampler(10, 2, 1, seed=5)
    head = _take(first, 7)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    resumed = DistributedResumableSampler(10, 2, 1, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert head + _take(resumed, 16) == reference
    # The trainer-side alternative (exact even when DataLoader workers prefetch indices).
    via_consumed = DistributedResumableSampler(10, 2, 1, seed=5)
    via_consumed.load_state_dict(via_consumed.state_dict_for_consumed(7))
    assert _take(via_consumed, 16) == reference[7:]
    with pytest.raises(ValueError, match="seed=5"):
        DistributedResumableSampler(10, 2, 1, seed=6).load_state_dict(state)


def test_resumes_on_another_data_parallel_size():
    n = 16
    before = [DistributedResumableSampler(n, 2, r, seed=0) for r in range(2)]
    its = [iter(s) for s in before]
    for it in its:
        for _ in range(2):
            next(it)
    state = before[0].state_dict()  # 4 samples of epoch 0 consumed globally
    after = []
    for r in range(4):
        s = DistributedResumableSampler(n, 4, r, seed=0, infinite=False)
        s.load_state_dict(state)
        after.append(list(s))
    global_order = DistributedResumableSampler(n, 1, 0, seed=0).global_order(0)
    assert sorted(sum(after, [])) == sorted(global_order[4:].tolist())
    # In blocks, only whole blocks that split evenly among the new ranks resume.
    blocked = DistributedResumableSampler(n, 2, 0, seed=0, block_size=2)
    with pytest.raises(ValueError, match="do not split evenly among the new ranks"):
        DistributedResumableSampler(n, 4, 0, seed=0, block_size=2).load_state_dict(blocked.state_dict_for_consumed(2))
    wide = DistributedResumableSampler(n, 1, 0, seed=0, block_size=2)
    wide.load_state_dict(blocked.state_dict_for_consumed(2))
    assert _take(wide, 4) == global_order[4:8].tolist()


def test_bad_setups_name_the_rule():
    with pytest.raises(ValueError, match="smaller than the data-parallel size 4"):
        DistributedResumableSampler(3, 4, 0)
    with pytest.raises(ValueError, match=r"smaller than block_size \* data-parallel size = 2 \* 2"):
        DistributedResumableSampler(3, 2, 0, block_size=2)
    with pytest.raises(ValueError, match="fewer than one step's micro_batch_size"):
        ERA5TrainBatchSampler(_forecast_dataset(), 9, data_parallel_size=2)

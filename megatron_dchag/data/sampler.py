"""Deterministic, resumable, data-parallel sample order for step-based training (both workloads).

:class:`DistributedResumableSampler` owns *which sample indices a data-parallel rank sees, in
which order, forever*. The order is a pure function of ``(seed, epoch)``; the sampler's only state
is ``(epoch, position)``, so a checkpoint that stores :meth:`~DistributedResumableSampler.state_dict`
resumes with exactly the same sequence.

Sharding: epoch ``e`` has one global order ``perm_e`` (a seeded permutation, or ``0..n-1`` without
shuffling) trimmed (``drop_last``) or wrapped around (pad) to a whole number of rounds of
``block_size * dp`` positions. Each round is dealt to the DP ranks in blocks of ``block_size``
consecutive positions: rank ``r`` takes positions ``[r * block_size, (r + 1) * block_size)`` of
every round. With ``block_size=1`` (MAE pretraining) rank ``r`` takes ``perm_e[r], perm_e[r + dp],
perm_e[r + 2 dp], ...``; with ``block_size`` the micro-batch size (forecasting) every rank takes one
contiguous block of each step's ``B * dp`` positions. DP ranks therefore see disjoint subsets that
together cover the epoch, and consecutive global steps walk the global order. The order does not
depend on the tensor- or pipeline-parallel rank: every TP rank of one DP rank gets the same
indices (and reads only its own channels of them).

The forecasting batch samplers are views on that order:

* :class:`ERA5TrainBatchSampler`: micro-batch step ``k`` holds the rank's positions
  ``[k * B, (k + 1) * B)`` (``block_size = B``, ``drop_last``: an epoch is a whole number of
  steps), all with the lead ``sample_lead_hours(seed, k)``; the step is the whole resume state.
* :class:`ERA5EvalBatchSampler`: the first steps of one unshuffled epoch of the evaluation initial
  times, repeated for every fixed lead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_dchag.data.era5.leads import sample_lead_hours

if TYPE_CHECKING:  # the dataset module imports xarray; the samplers only read its attributes
    from megatron_dchag.data.era5.dataset import ERA5Dataset

# Separate each order's RNG stream from other users of the same seed. Each workload keeps its own
# tag, so its sample orders stay what they have always been.
_ORDER_TAG = 0x53414D50
_FORECAST_ORDER_TAG = 0x5A3B


class DistributedResumableSampler(torch.utils.data.Sampler):
    """Seeded shuffled order per epoch, sharded across DP ranks, resumable from ``(epoch, position)``.

    Args:
        dataset_size: number of samples ``n`` of the dataset.
        num_replicas: data-parallel size.
        rank: this process's data-parallel rank.
        seed: order seed; the same seed gives the same order on every run.
        shuffle: permute each epoch (``False``: ``0..n-1`` every epoch).
        drop_last: drop the tail of each epoch's order that does not fill a round of
            ``block_size * num_replicas``; otherwise pad by wrapping around to the start of that
            order (some samples then appear twice).
        infinite: iterate over epochs forever (step-based training). Otherwise one iteration runs
            to the end of the current epoch and the next one starts the following epoch.
        yield_epoch: yield ``(epoch, index)`` tuples instead of ``index``; a dataset whose items
            depend on the epoch (random crops) then needs no ``set_epoch`` in worker processes.
        block_size: consecutive positions of the global order a rank takes in turn (see the
            module docstring); 1 deals samples round-robin.
        order_tag: separates this order's RNG stream from other users of the same seed.

    ``position`` counts the indices this rank has handed out in the current epoch. A DataLoader
    with worker processes pulls indices ahead of the trainer; for an exact resume save
    :meth:`state_dict_for_consumed` with the number of samples the trainer has actually consumed,
    or use ``num_workers=0``.
    """

    def __init__(
        self,
        dataset_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        infinite: bool = True,
        yield_epoch: bool = False,
        block_size: int = 1,
        order_tag: int = _ORDER_TAG,
    ):
        if dataset_size < 1:
            raise ValueError(f"dataset_size={dataset_size} must be >= 1")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        if drop_last and dataset_size < num_replicas * block_size:
            smaller_than = (
                f"the data-parallel size {num_replicas}" if block_size == 1
                else f"block_size * data-parallel size = {block_size} * {num_replicas}"
            )
            raise ValueError(
                f"dataset of {dataset_size} samples is smaller than {smaller_than} "
                "with drop_last=True: some ranks would get no samples"
            )
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.infinite = infinite
        self.yield_epoch = yield_epoch
        self.block_size = int(block_size)
        self.order_tag = int(order_tag)
        self.epoch = 0
        self.position = 0
        self._cached: Tuple[int, Optional[np.ndarray]] = (-1, None)

    # -- the order ---------------------------------------------------------------------------
    @property
    def samples_per_rank(self) -> int:
        """Indices each rank gets per epoch (a multiple of ``block_size``)."""
        per_round = self.block_size * self.num_replicas
        rounds = self.dataset_size // per_round if self.drop_last else -(-self.dataset_size // per_round)
        return rounds * self.block_size

    def __len__(self) -> int:
        return self.samples_per_rank

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's global order, trimmed or padded to ``samples_per_rank * num_replicas``."""
        n = self.dataset_size
        if self.shuffle:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), self.order_tag]).permutation(n)
        else:
            order = np.arange(n)
        total = self.samples_per_rank * self.num_replicas
        if total <= n:
            return order[:total]
        return np.resize(order, total)  # wraps around, repeating the order as needed

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch`` (cached for the last epoch asked for)."""
        if self._cached[0] != epoch:
            rounds = self.global_order(epoch).reshape(-1, self.num_replicas, self.block_size)
            self._cached = (epoch, rounds[:, self.rank].reshape(-1))
        return self._cached[1]  # type: ignore[return-value]

    def indices(self, start: int, count: int) -> np.ndarray:
        """This rank's indices at positions ``[start, start + count)`` of its endless stream.

        Epoch ``e`` holds positions ``[e * samples_per_rank, (e + 1) * samples_per_rank)``. A pure
        function of the arguments (the iteration state is neither read nor changed).
        """
        if start < 0 or count < 0:
            raise ValueError(f"indices(start={start}, count={count}): both must be >= 0")
        per_rank = self.samples_per_rank
        parts: List[np.ndarray] = []
        position, stop = int(start), int(start) + int(count)
        while position < stop:
            epoch, offset = divmod(position, per_rank)
            take = min(stop - position, per_rank - offset)
            parts.append(self.rank_order(epoch)[offset : offset + take])
            position += take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        while True:
            order = self.rank_order(self.epoch)
            while self.position < len(order):
                index = int(order[self.position])
                self.position += 1
                yield (self.epoch, index) if self.yield_epoch else index
            self.epoch += 1
            self.position = 0
            if not self.infinite:
                return

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (``torch.utils.data.DistributedSampler`` compatible)."""
        self.epoch, self.position = int(epoch), 0

    # -- resume ------------------------------------------------------------------------------
    def _normalized(self, epoch: int, position: int) -> Tuple[int, int]:
        per_rank = self.samples_per_rank
        return epoch + position // per_rank, position % per_rank

    def state_dict(self) -> Dict[str, Any]:
        """``(epoch, position)`` plus what the order depends on (checked when loading)."""
        epoch, position = self._normalized(self.epoch, self.position)
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "num_replicas": self.num_replicas,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def state_dict_for_consumed(self, samples_consumed_per_rank: int, start_epoch: int = 0) -> Dict[str, Any]:
        """The state after this rank consumed ``samples_consumed_per_rank`` samples since ``start_epoch``."""
        if samples_consumed_per_rank < 0:
            raise ValueError(f"samples_consumed_per_rank={samples_consumed_per_rank} must be >= 0")
        state = self.state_dict()
        state["epoch"], state["position"] = self._normalized(start_epoch, samples_consumed_per_rank)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off.

        The seed, dataset size, shuffle and drop_last must match (otherwise the order differs). The
        DP size may change when the samples consumed in the epoch (``position * old_dp``) divide
        evenly among the new ranks, in whole blocks (the epoch's global order is the same for every
        DP size; only its trimmed or padded tail differs).
        """
        for key in ("seed", "dataset_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {key}={getattr(self, key)!r}; "
                    "the sample order would differ from the saved run"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        old_replicas = int(state.get("num_replicas", self.num_replicas))
        if old_replicas != self.num_replicas:
            # Both DP sizes walk the same global order; continue after the consumed prefix.
            consumed = position * old_replicas
            if (
                position % self.block_size
                or consumed % (self.num_replicas * self.block_size)
                or consumed > self.samples_per_rank * self.num_replicas
            ):
                raise ValueError(
                    f"cannot resume a sampler saved with num_replicas={old_replicas} at epoch {epoch} "
                    f"position {position} on num_replicas={self.num_replicas}: the {consumed} samples "
                    "consumed in this epoch do not split evenly among the new ranks"
                )
            position = consumed // self.num_replicas
        self.epoch, self.position = self._normalized(epoch, position)

    def __repr__(self) -> str:
        return (
            f"DistributedResumableSampler(n={self.dataset_size}, rank={self.rank}/{self.num_replicas}, "
            f"seed={self.seed}, epoch={self.epoch}, position={self.position})"
        )


class ERA5TrainBatchSampler(torch.utils.data.Sampler):
    """Shuffled training batches of ``(time_index, lead_hours)`` with one lead per batch.

    Step ``k`` (counting micro-batches from 0, the same count on every rank) covers positions
    ``[k * B * dp, (k + 1) * B * dp)`` of epoch ``k // steps_per_epoch``'s permutation of the valid
    initial times (a pure function of ``(seed, epoch)``); data-parallel rank ``r`` takes its
    ``B`` of them, and every sample of the step gets the lead ``sample_lead_hours(seed, k)``.
    TP ranks with the same ``data_parallel_rank`` therefore read the same samples. ``start_step``
    resumes exactly; ``num_steps=None`` iterates forever (no ``len``).
    """

    def __init__(
        self,
        dataset: "ERA5Dataset",
        micro_batch_size: int,
        *,
        seed: int = 0,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        start_step: int = 0,
        num_steps: Optional[int] = None,
        shuffle: bool = True,
    ):
        if micro_batch_size < 1 or data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"bad sampler setup: micro_batch_size={micro_batch_size}, data_parallel_rank={data_parallel_rank}, "
                f"data_parallel_size={data_parallel_size}"
            )
        self.starts = np.asarray(dataset.valid_start_indices)
        self.per_step = micro_batch_size * data_parallel_size
        self.steps_per_epoch = len(self.starts) // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training data has {len(self.starts)} valid initial times, fewer than one step's "
                f"micro_batch_size * data_parallel_size = {self.per_step}"
            )
        self.micro_batch_size, self.seed = micro_batch_size, int(seed)
        self.dp_rank, self.dp_size = data_parallel_rank, data_parallel_size
        self.start_step, self.num_steps, self.shuffle = int(start_step), num_steps, shuffle
        self.max_lead_hours, self.lead_step_hours = dataset.max_lead_hours, dataset.lead_step_hours
        self.min_lead_hours = dataset.min_lead_hours
        self.order = DistributedResumableSampler(
            len(self.starts), num_replicas=data_parallel_size, rank=data_parallel_rank, seed=self.seed,
            shuffle=shuffle, drop_last=True, block_size=micro_batch_size, order_tag=_FORECAST_ORDER_TAG,
        )

    def lead_for_step(self, step: int) -> int:
        return sample_lead_hours(self.seed, step, self.max_lead_hours, self.lead_step_hours, self.min_lead_hours)

    def batch(self, step: int) -> List[Tuple[int, int]]:
        """The ``(time_index, lead_hours)`` pairs this rank reads at micro-batch ``step``."""
        lead = self.lead_for_step(step)
        positions = self.order.indices(step * self.micro_batch_size, self.micro_batch_size)
        return [(int(self.starts[i]), lead) for i in positions]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("ERA5TrainBatchSampler(num_steps=None) is infinite")
        return self.num_steps


class ERA5EvalBatchSampler(torch.utils.data.Sampler):
    """Evaluation batches at fixed lead times: for each lead, the same initial times in order.

    The dataset's valid initial times (valid for every lead) are taken every ``stride``-th,
    truncated to a multiple of ``micro_batch_size * data_parallel_size`` (so every DP rank runs
    the same number of batches) and optionally to ``max_batches_per_lead`` steps; rank ``r`` gets
    the ``r``-th micro-batch of each step. Every batch has a single lead.
    """

    def __init__(
        self,
        dataset: "ERA5Dataset",
        micro_batch_size: int,
        *,
        lead_times_hours: Optional[Sequence[int]] = None,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        stride: int = 1,
        max_batches_per_lead: Optional[int] = None,
    ):
        leads = lead_times_hours if lead_times_hours is not None else dataset.lead_times_hours
        if not leads:
            raise ValueError("ERA5EvalBatchSampler needs lead_times_hours (here or on the dataset)")
        missing = [lead for lead in leads if int(lead) not in dataset.active_leads]
        if missing:
            raise ValueError(f"leads {missing} h were not declared to the dataset (lead_times_hours={dataset.active_leads})")
        self.leads = [int(x) for x in leads]
        starts = np.asarray(dataset.valid_start_indices)[:: max(1, int(stride))]
        per_step = micro_batch_size * data_parallel_size
        steps = len(starts) // per_step
        if max_batches_per_lead is not None:
            steps = min(steps, int(max_batches_per_lead))
        if steps == 0:
            raise ValueError(
                f"evaluation has {len(starts)} initial times, fewer than micro_batch_size * data_parallel_size = {per_step}"
            )
        self.batches_per_lead = steps
        order = DistributedResumableSampler(
            len(starts), num_replicas=data_parallel_size, rank=data_parallel_rank, shuffle=False, drop_last=True,
            infinite=False, block_size=micro_batch_size,
        )
        self._starts = starts[order.indices(0, steps * micro_batch_size)].reshape(steps, micro_batch_size)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for lead in self.leads:
            for row in self._starts:
                yield [(int(t), lead) for t in row]

    def __len__(self) -> int:
        return len(self.leads) * self.batches_per_lead

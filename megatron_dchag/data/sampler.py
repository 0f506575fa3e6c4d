"""Deterministic, resumable, data-parallel sample order for step-based training.

:class:`DistributedResumableSampler` owns *which sample indices a data-parallel rank sees, in
which order, forever*. The order is a pure function of ``(seed, epoch)``; the sampler's only state
is ``(epoch, position)``, so a checkpoint that stores :meth:`~DistributedResumableSampler.state_dict`
resumes with exactly the same sequence.

Sharding: epoch ``e`` has one global order ``perm_e`` (a seeded permutation, or ``0..n-1`` without
shuffling) trimmed (``drop_last``) or wrapped around (pad) to a multiple of the DP size; DP rank
``r`` takes ``perm_e[r], perm_e[r + dp], perm_e[r + 2 dp], ...``. DP ranks therefore see disjoint
subsets that together cover the epoch, and consecutive global steps walk the global order. The
order does not depend on the tensor- or pipeline-parallel rank: every TP rank of one DP rank gets
the same indices (and cuts the same crop, reading only its own channels).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

_ORDER_TAG = 0x53414D50  # separates the sampler's RNG stream from other users of the same seed


class DistributedResumableSampler(torch.utils.data.Sampler):
    """Seeded shuffled order per epoch, sharded across DP ranks, resumable from ``(epoch, position)``.

    Args:
        dataset_size: number of samples ``n`` of the dataset.
        num_replicas: data-parallel size.
        rank: this process's data-parallel rank.
        seed: order seed; the same seed gives the same order on every run.
        shuffle: permute each epoch (``False``: ``0..n-1`` every epoch).
        drop_last: drop the last ``n % num_replicas`` samples of each epoch's order; otherwise pad
            by wrapping around to the start of that order (some samples then appear twice).
        infinite: iterate over epochs forever (step-based training). Otherwise one iteration runs
            to the end of the current epoch and the next one starts the following epoch.
        yield_epoch: yield ``(epoch, index)`` tuples instead of ``index``; a dataset whose items
            depend on the epoch (random crops) then needs no ``set_epoch`` in worker processes.

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
    ):
        if dataset_size < 1:
            raise ValueError(f"dataset_size={dataset_size} must be >= 1")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        if drop_last and dataset_size < num_replicas:
            raise ValueError(
                f"dataset of {dataset_size} samples is smaller than the data-parallel size {num_replicas} "
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
        self.epoch = 0
        self.position = 0
        self._cached: Tuple[int, Optional[np.ndarray]] = (-1, None)

    # -- the order ---------------------------------------------------------------------------
    @property
    def samples_per_rank(self) -> int:
        """Indices each rank gets per epoch."""
        if self.drop_last:
            return self.dataset_size // self.num_replicas
        return -(-self.dataset_size // self.num_replicas)

    def __len__(self) -> int:
        return self.samples_per_rank

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's global order, trimmed or padded to ``samples_per_rank * num_replicas``."""
        n = self.dataset_size
        if self.shuffle:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), _ORDER_TAG]).permutation(n)
        else:
            order = np.arange(n)
        total = self.samples_per_rank * self.num_replicas
        if total <= n:
            return order[:total]
        return np.resize(order, total)  # wraps around, repeating the order as needed

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch`` (cached for the current epoch)."""
        if self._cached[0] != epoch:
            self._cached = (epoch, self.global_order(epoch)[self.rank :: self.num_replicas])
        return self._cached[1]  # type: ignore[return-value]

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
        evenly among the new ranks (the epoch's global order is the same for every DP size; only
        its trimmed or padded tail differs).
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
            if consumed % self.num_replicas or consumed > self.samples_per_rank * self.num_replicas:
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

"""Training and evaluation samplers shared by the text and image datamodules.

Both are `DistributedSampler`s that shard over the ranks themselves, so Lightning does not wrap
them: its `DistributedSamplerWrapper` would reorder the training order (breaking an exact resume)
and pad the evaluation splits by repeating items (biasing their metrics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

__all__ = ["EpochSampler", "EpochShuffleSampler", "ShardSampler", "mix", "resumable_sampler"]


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def mix(*values: int) -> int:
    """A 63-bit seed from ints (splitmix64 steps; Python's hash() of a tuple may change between versions)."""
    mask, h = (1 << 64) - 1, 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & mask)) * 0xBF58476D1CE4E5B9) & mask
        h ^= h >> 31
    return h >> 1


class EpochShuffleSampler(DistributedSampler):
    """Training order for a map-style data set: epoch e is a permutation seeded with (seed, e), sharded
    over the ranks here (rank r takes positions r, r + W, ...; the shards padded to equal length by
    repeating the first items, as `DistributedSampler` does) and resumable mid-epoch.

    Yields `(epoch, i)` keys, so that the epoch reaches loader workers with each index (`SeededItems`).
    It is a `DistributedSampler` so that Lightning does not wrap it (its wrapper would shuffle the
    order again). Lightning calls `set_epoch` at every epoch start; `epoch_of` (e.g. the trainer's
    `current_epoch`) overrides that number when given: after a restart from a checkpoint written at an
    epoch's end, Lightning 2.6 passes one more than the epoch it runs. `start=k`: the first pass over
    `epoch` begins at this rank's k-th item and puts the k already trained on at the end, where the
    shortened epoch Lightning runs after a mid-epoch resume never reaches them (rotating, not
    dropping, keeps `len()` and so Lightning's batch count).
    """

    def __init__(self, dataset: Sized, seed: int = 0, epoch: int = 0, start: int = 0, shuffle: bool = True,
                 num_replicas: int | None = None, rank: int | None = None,
                 epoch_of: Callable[[], int] | None = None) -> None:
        size, this_rank = world()
        num_replicas, rank = size if num_replicas is None else num_replicas, this_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.epoch, self.epoch_of = epoch, epoch_of
        # a start at or past the end means the epoch was finished: nothing to skip
        self.start, self.start_epoch = (start if 0 <= start < self.num_samples else 0), epoch

    def shard(self, epoch: int) -> list[int]:
        """This rank's indices of `epoch`, in order."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(mix(self.seed, epoch))).tolist()
        else:
            order = list(range(n))
        order = (order * math.ceil(self.total_size / n))[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch_of() if self.epoch_of is not None else self.epoch  # fixed for the whole pass
        shard = self.shard(epoch)
        start = self.start if epoch == self.start_epoch else 0
        return ((epoch, i) for i in shard[start:] + shard[:start])

    def __len__(self) -> int:
        return self.num_samples


def resumable_sampler(dataset: Sized, trainer: object | None, batch_size: int, seed: int = 0,
                      shuffle: bool = True) -> EpochShuffleSampler:
    """A datamodule's training sampler: it starts at `trainer`'s epoch (none: epoch 0) and, when the run
    resumes mid-epoch, after the batches this rank had trained on (`processed`, because ModelCheckpoint
    saves in on_train_batch_end, before the batch counts as completed)."""
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    done = epoch_loop.batch_progress.current.processed if epoch_loop is not None else 0
    epoch_of = (lambda: trainer.current_epoch) if hasattr(trainer, "current_epoch") else None
    return EpochShuffleSampler(dataset, seed, getattr(trainer, "current_epoch", 0) or 0, start=done * batch_size,
                               shuffle=shuffle, epoch_of=epoch_of)


class EpochSampler(EpochShuffleSampler):
    """`EpochShuffleSampler` over `range(num_samples)`, in order, on one process: yields `(epoch, i)`.
    (The LM's crops are already random per epoch; under DDP its datamodule shards the same way.)"""

    def __init__(self, num_samples: int, epoch: int = 0, start: int = 0):
        super().__init__(range(num_samples), epoch=epoch, start=start, shuffle=False, num_replicas=1, rank=0)


class ShardSampler(DistributedSampler):
    """In-order sharding without padding: rank r takes items r, r + world_size, r + 2 world_size, ...

    Every item is seen exactly once across ranks (`DistributedSampler` pads by repeating items, which
    would count some windows twice). It subclasses `DistributedSampler` only because Lightning
    replaces any other sampler under DDP (`_DataConnector._requires_distributed_sampler`). Ranks may
    get one batch more or less than each other: log validation metrics per epoch, not per step.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None):
        size, this_rank = world()
        num_replicas, rank = size if num_replicas is None else num_replicas, this_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples

"""DataLoaders that shard across processes when run under torchrun.

Training always goes through a DistributedSampler, even in a single process (one replica), so
the shuffle order is a pure function of (seed, epoch): a resumed run sees exactly the batches an
uninterrupted run would have. Evaluation shards in order without padding, so every sample is
counted once (DistributedSampler pads by repeating samples, which would skew accuracy).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from tokenopt.distributed import init_if_launched, rank_and_world


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... : disjoint, ordered, unpadded shards for evaluation."""

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def set_epoch(self, epoch: int) -> None:  # same interface as DistributedSampler; order is fixed
        pass


def get_loader(dataset: Dataset, batch_size: int = 64, *, train: bool = True, seed: int = 0,
               num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader over this process's shard: shuffled per epoch for training, in order otherwise.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch (the training loop does).
    """
    init_if_launched()  # so the loader shards even if it is built before the training loop runs
    rank, world = rank_and_world()
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=drop_last)
    else:
        sampler = ShardSampler(dataset, rank, world)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last and train, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)

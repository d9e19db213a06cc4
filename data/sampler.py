"""The one batching rule every loader here follows (DataLoader, cached batches, cached features)."""

from __future__ import annotations

import torch


class ShardedBatchSampler:
    """Global batches (shuffled with `generator` when train), each cut to its [rank::world] part.

    Under torchrun the ranks together see exactly the batches one process would; fit() re-seeds
    `generator` every epoch, so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, size: int, batch_size: int, train: bool, generator: torch.Generator, rank: int = 0,
                 world: int = 1):
        self.size, self.train, self.generator, self.rank, self.world = size, train, generator, rank, world
        self.batch_size = min(batch_size, size)
        # A last batch of a few images gives a noisy step (and breaks BN at size 1).
        self.drop_last = train and size > batch_size

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator) if self.train else torch.arange(self.size)
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world].tolist()

"""Every batch source of a run, all following one batching rule (ShardedBatchSampler):

- make_loader: the streaming path (--cache off), a DataLoader whose workers decode and
  transform each image;
- CachedBatches: the cached path (the default), uint8 batches from the decoded-image cache,
  augmented on the device by data.augment.BatchAugment;
- FeatureBatches: precomputed features of a frozen backbone (trainB's feature cache);
- in_order: any of the first two, unshuffled with the last partial batch, for one pass over
  every image.
"""

from __future__ import annotations

import copy
import functools
import queue
import random
import threading
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from .augment import BatchAugment
from .cache import DecodedSplit, to_tensor_batch
from .dataset import NatureData, collate_skipping_unreadable, report_once


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


def seed_worker_for_rank(rank: int, worker_id: int) -> None:
    """Give this rank's DataLoader workers their own random streams (torch, random, numpy)."""
    seed = (torch.initial_seed() + 1_000_003 * rank) % 2**63
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def make_loader(dataset, batch_size: int, train: bool, device: torch.device, num_workers: int, seed: int,
                rank: int = 0, world: int = 1) -> DataLoader:
    """The streaming loader (--cache off): DataLoader workers decode and transform each image."""
    generator = torch.Generator().manual_seed(seed)
    sampler = ShardedBatchSampler(len(dataset), batch_size, train, generator, rank, world)
    return DataLoader(
        report_once(dataset) if isinstance(dataset, NatureData) else dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        # The generator (so the batch order) is the same on every rank; augmentation must not be.
        worker_init_fn=functools.partial(seed_worker_for_rank, rank) if rank else None,
        pin_memory=device.type == "cuda",
        collate_fn=collate_skipping_unreadable,
        generator=generator,  # seeds the workers; fit() re-seeds it every epoch
        prefetch_factor=4 if num_workers > 0 else None,
    )


def in_order(loader):
    """loader's images unshuffled, the last partial batch kept, and not augmented (every image once,
    framed as val and test are: the dataset's plain_transform, or the cache's plain split)."""
    if isinstance(loader, CachedBatches):
        return loader.in_order()
    sampler = loader.batch_sampler
    dataset = copy.copy(loader.dataset)
    dataset.transform = getattr(dataset, "plain_transform", dataset.transform)
    # Its own generator: iterating draws the workers' base seed from it, never from the global RNG
    # (a resumed run computes its features after restoring that RNG, the original one before).
    return DataLoader(dataset, batch_sampler=ShardedBatchSampler(sampler.size, sampler.batch_size, False,
                                                                 sampler.generator, sampler.rank, sampler.world),
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, collate_fn=loader.collate_fn,
                      generator=torch.Generator().manual_seed(0))


def index_on(device: torch.device, positions) -> torch.Tensor:
    """Batch positions as a long index on device. To a GPU they travel from pinned memory without
    blocking: copying a pageable tensor waits for the GPU (count_syncs.py on an H200 counted two
    such waits per step when the cached path's batches were gathered that way)."""
    index = torch.as_tensor(positions, dtype=torch.long)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def copy_to_device(split: DecodedSplit, indices: torch.Tensor, device: torch.device,
                   chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images at indices (sorted) as one uint8 (N, 3, S, S) tensor on device, copied
    straight from the memory map in chunks through one pinned buffer: host memory stays at one
    chunk, not the whole split, and each copy is a fast DMA transfer."""
    order = np.sort(indices.numpy())
    size = split.images.shape[1]
    out = torch.empty((len(order), size, size, 3), dtype=torch.uint8, device=device)
    pin = device.type == "cuda"
    buffer = torch.empty((min(chunk, max(len(order), 1)), size, size, 3), dtype=torch.uint8, pin_memory=pin)
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        staged = buffer[:len(part)]
        staged.numpy()[...] = split.images[part]
        out[start:start + len(part)].copy_(staged, non_blocking=pin)
        if pin:  # the buffer is refilled next: wait for this transfer
            torch.cuda.current_stream(device).synchronize()
    # (N, S, S, 3) seen as (N, 3, S, S): channels-last memory, as the model wants it
    return out.permute(0, 3, 1, 2), torch.from_numpy(split.labels[order]).to(device)


class CachedBatches:
    """Batches from a decoded split, augmented on the device: the DataLoader of the cached path.

    With on_device, the split's uint8 pixels are copied to the device once and batches are
    gathered there; otherwise they are copied out of the memory map by a background thread
    (numpy copies release the GIL) while the model computes on the previous batch. On a CPU that
    thread augments them too, so nothing of the batch's preparation is left between two steps.
    """

    def __init__(self, split: DecodedSplit, batch_size: int, train: bool, augment: BatchAugment,
                 device: torch.device, seed: int = 0, on_device: bool = False, rank: int = 0, world: int = 1,
                 plain_split: Callable[[], DecodedSplit] | None = None, augment_ahead: bool | None = None):
        self.split, self.augment, self.device, self.train = split, augment, device, train
        # Augment on the background thread, during the previous step (default: on a CPU, where the
        # augmentation runs on the same cores; benchmarks/bench_epoch.py times both).
        self.augment_ahead = device.type == "cpu" if augment_ahead is None else augment_ahead
        # The same files decoded at the eval resize, for in_order() where split is framed for
        # random crops (a larger resize); None = split itself is framed as val and test are.
        self.plain_split = plain_split
        self.rank = rank
        self.indices = torch.from_numpy(np.flatnonzero(split.valid))
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = ShardedBatchSampler(len(self.indices), batch_size, train, self.generator, rank, world)
        self.images = self.labels = None
        if on_device:
            self.images, self.labels = copy_to_device(split, self.indices, device)

    def __len__(self) -> int:
        return len(self.sampler)

    def in_order(self) -> "CachedBatches":
        """The same images unshuffled, the last partial batch kept, not augmented and framed as
        val and test are (center crop of the plain split): for computing something once per image."""
        other = copy.copy(self)
        other.train = False
        other.augment = self.augment.plain()
        if self.plain_split is not None:
            other.split = self.plain_split()
            other.images = other.labels = None  # read from the plain split's memory map
        other.sampler = ShardedBatchSampler(len(self.indices), self.sampler.batch_size, False, self.generator,
                                            self.rank, self.sampler.world)
        return other

    def _batches(self):
        # Sorted within the batch (the host path reads the memory map in order): both paths then
        # hand the same image to the same augmentation draw.
        return (torch.tensor(sorted(positions), dtype=torch.long) for positions in self.sampler)

    def _device_batches(self):
        """Gather from the pixels already on the device, the positions sent once per batch."""
        for positions in self._batches():
            index = index_on(self.device, positions)
            yield self.images[index], self.labels[index]

    def _host_batches(self, prepare=None):
        """Gather on a background thread, one batch ahead; prepare(images, labels), when given, runs
        there too (on a CPU: the augmentation, so it overlaps the step instead of following it)."""
        pending: queue.Queue = queue.Queue(maxsize=2)
        pin = self.device.type == "cuda"

        stop = threading.Event()

        def work():
            try:
                for positions in self._batches():
                    if stop.is_set():
                        return
                    images, labels = to_tensor_batch(self.split, self.indices[positions])
                    if prepare is not None:
                        images, labels = prepare(images, labels)
                    pending.put((images.pin_memory(), labels.pin_memory()) if pin else (images, labels))
                pending.put(None)
            except BaseException as error:  # handed to the consumer, which re-raises it
                pending.put(error)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := pending.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a worker waiting on a full queue
                try:
                    pending.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    def __iter__(self):
        # The batch order must be the same on every rank; augmentation draws must not be.
        aug_seed = int(torch.randint(2**62, (1,), generator=self.generator)) + self.rank
        aug_generator = torch.Generator().manual_seed(aug_seed)
        draws = aug_generator if self.train else None

        def augment(images, labels):
            return self.augment(images, draws), labels

        if self.images is not None:
            source = map(lambda batch: augment(*batch), self._device_batches())
        elif self.augment_ahead and self.device.type == "cpu":
            # The batches are made in order on one thread, so each draws what it drew on the
            # main thread: the same seeded run gives the same numbers.
            source = self._host_batches(prepare=augment)
        else:
            source = (augment(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
                      for images, labels in self._host_batches())
        yield from source


class FeatureBatches:
    """Shuffled batches of precomputed features; same per-epoch seeding contract as the loaders.
    Features of (images, views, dim) (an image and its mirror) keep their views: evaluate averages
    over them."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool, seed: int):
        self.features, self.labels = features, labels
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = ShardedBatchSampler(len(labels), batch_size, train, self.generator)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for positions in self.sampler:
            index = index_on(self.labels.device, positions)
            yield self.features[index], self.labels[index]

"""Augmentation of whole uint8 batches on the training device, with a different random draw per
image. torchvision's v2 transforms accept batches but draw one set of parameters for the whole
batch, so the per-image versions of what the streaming path does are written here."""

from __future__ import annotations

import math
import queue
import threading

import numpy as np
import torch
import torch.nn.functional as F

from .cache import DecodedSplit, to_tensor_batch
from .sampler import ShardedBatchSampler


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


class BatchAugment:
    """uint8 (B, 3, S, S) -> normalised float (B, 3, image_size, image_size).

    Train: random resized crop (area `scale`, aspect `ratio`) and horizontal flip in one
    grid_sample, brightness/contrast/saturation jitter, random erasing; eval: center crop.
    Random numbers come from a CPU generator, so a seed fixes them on any device.
    """

    def __init__(self, image_size: int, augment: bool, mean, std, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3),
                 jitter: float = 0.2, erase_p: float = 0.1):
        self.image_size, self.augment = image_size, augment
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.scale, self.ratio, self.jitter, self.erase_p = scale, ratio, jitter, erase_p

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        device = images.device
        mean, std = self.mean.to(device), self.std.to(device)
        if not self.augment:
            size = images.shape[-1]
            top = int(round((images.shape[-2] - self.image_size) / 2.0))
            left = int(round((size - self.image_size) / 2.0))
            crop = images[..., top:top + self.image_size, left:left + self.image_size]
            return (crop.float().div_(255) - mean) / std
        generator = generator or torch.default_generator
        x = images.float().div_(255)
        x = self._resized_crop_and_flip(x, generator)
        x = self._jitter(x, generator)
        x = (x - mean) / std
        return self._erase(x, generator)

    def _resized_crop_and_flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        area = _uniform(n, *self.scale, generator)
        log_ratio = _uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), generator)
        aspect = torch.exp(log_ratio)
        width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the side
        height = torch.sqrt(area / aspect).clamp(max=1.0)
        center_x = 0.5 * width + torch.rand(n, generator=generator) * (1 - width)
        center_y = 0.5 * height + torch.rand(n, generator=generator) * (1 - height)
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = width * flip
        theta[:, 0, 2] = 2 * center_x - 1
        theta[:, 1, 1] = height
        theta[:, 1, 2] = 2 * center_y - 1
        grid = F.affine_grid(theta.to(x.device), [n, 3, self.image_size, self.image_size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Brightness b, contrast c and saturation s, folded into one pass: with g the per-pixel
        gray and m its image mean, b then c then s give s*c*b*x + (1-s)*c*b*g + (1-c)*b*m
        (no clamping between the three steps, one clamp at the end)."""
        if self.jitter <= 0:
            return x
        n, low, high = x.shape[0], 1 - self.jitter, 1 + self.jitter
        b, c, s = (_uniform(n, low, high, generator).to(x.device).view(n, 1, 1, 1) for _ in range(3))
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        gray = (x * weights).sum(1, keepdim=True)
        mean = gray.mean((2, 3), keepdim=True)
        out = x * (s * c * b)
        out.addcmul_(gray, (1 - s) * c * b).add_((1 - c) * b * mean)
        return out.clamp_(0, 1)

    def _erase(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.erase_p <= 0:
            return x
        n, size = x.shape[0], self.image_size
        apply = torch.rand(n, generator=generator) < self.erase_p
        area = _uniform(n, 0.02, 0.33, generator)
        aspect = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), generator))
        height = (torch.sqrt(area * aspect) * size).round().clamp(1, size)
        width = (torch.sqrt(area / aspect) * size).round().clamp(1, size)
        top = (torch.rand(n, generator=generator) * (size - height + 1)).floor()
        left = (torch.rand(n, generator=generator) * (size - width + 1)).floor()
        rows = torch.arange(size).view(1, size, 1)
        cols = torch.arange(size).view(1, 1, size)
        box = ((rows >= top.view(n, 1, 1)) & (rows < (top + height).view(n, 1, 1))
               & (cols >= left.view(n, 1, 1)) & (cols < (left + width).view(n, 1, 1)) & apply.view(n, 1, 1))
        return x.masked_fill(box.unsqueeze(1).to(x.device), 0.0)


class CachedBatches:
    """Batches from a decoded split, augmented on the device: the DataLoader of the cached path.

    With on_device, the split's uint8 pixels are copied to the device once and batches are
    gathered there; otherwise they are copied out of the memory map by a background thread
    (numpy copies release the GIL) while the model computes on the previous batch.
    """

    def __init__(self, split: DecodedSplit, batch_size: int, train: bool, augment: BatchAugment,
                 device: torch.device, seed: int = 0, on_device: bool = False, rank: int = 0, world: int = 1):
        self.split, self.augment, self.device, self.train = split, augment, device, train
        self.rank = rank
        self.indices = torch.from_numpy(np.flatnonzero(split.valid))
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = ShardedBatchSampler(len(self.indices), batch_size, train, self.generator, rank, world)
        self.images = self.labels = None
        if on_device:
            self.images, self.labels = to_tensor_batch(split, self.indices)
            self.images, self.labels = self.images.to(device), self.labels.to(device)

    def __len__(self) -> int:
        return len(self.sampler)

    def _batches(self):
        return (torch.tensor(positions, dtype=torch.long) for positions in self.sampler)

    def _host_batches(self):
        """Gather on a background thread, one batch ahead."""
        pending: queue.Queue = queue.Queue(maxsize=2)
        pin = self.device.type == "cuda"

        def work():
            for positions in self._batches():
                images, labels = to_tensor_batch(self.split, self.indices[positions])
                pending.put((images.pin_memory(), labels.pin_memory()) if pin else (images, labels))
            pending.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (item := pending.get()) is not None:
            yield item
        thread.join()

    def __iter__(self):
        # The batch order must be the same on every rank; augmentation draws must not be.
        aug_seed = int(torch.randint(2**62, (1,), generator=self.generator)) + self.rank
        aug_generator = torch.Generator().manual_seed(aug_seed)
        if self.images is not None:
            source = ((self.images[p.to(self.device)], self.labels[p.to(self.device)]) for p in self._batches())
        else:
            source = self._host_batches()
        for images, labels in source:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield self.augment(images, aug_generator if self.train else None), labels

"""Augmentation of whole batches on the training device, with a different random draw per
image: BatchAugment (crop, flip, auto-augment, jitter, erasing, reading the one AugmentSpec the
streaming transforms read) and build_mix (torchvision's batch MixUp/CutMix). torchvision's v2
transforms accept batches but draw one set of parameters for the whole batch, so the per-image
versions of what the streaming path does are written here."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .autoaugment import BatchPolicy
from .transforms import AugmentSpec


def _between(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Uniform draws u in [0, 1) mapped to [low, high)."""
    return u * (high - low) + low


class BatchAugment:
    """uint8 (B, 3, S, S) -> normalised float (B, 3, image_size, image_size).

    Train: random resized crop and horizontal flip in one grid_sample, the auto-augment policy
    (per image, batched), brightness/contrast/saturation jitter, random erasing; eval: center crop. The
    strengths come from the one AugmentSpec the streaming transforms read too.

    Every per-image random number is drawn at once from a CPU generator (so a seed fixes them on
    any device) and sent to the device in one copy; constants and masks are made on the device.
    """

    DRAWS = 13  # random numbers per image, one column each (see _draw)

    def __init__(self, image_size: int, augment: bool, mean, std, spec: AugmentSpec = AugmentSpec(),
                 channels_last: bool = False):
        self.image_size, self.augment, self.spec = image_size, augment, spec
        # The normalisation writes its output in the model's memory format, so the step needs no copy.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._mean, self._std = tuple(mean), tuple(std)
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._policy = BatchPolicy(spec.auto_augment) if spec.auto_augment != "none" else None

    def plain(self) -> "BatchAugment":
        """This augmentation switched off: the center crop and normalisation alone."""
        other = copy.copy(self)
        other.augment = False
        return other

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """mean, std and the gray weights on `device`, made once per device."""
        if device not in self._constants:
            self._constants[device] = (
                torch.tensor(self._mean, device=device).view(1, 3, 1, 1),
                torch.tensor(self._std, device=device).view(1, 3, 1, 1),
                torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1),
            )
        return self._constants[device]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        device = images.device
        mean, std, gray_weights = self._on(device)
        if not self.augment:
            size = images.shape[-1]
            top = int(round((images.shape[-2] - self.image_size) / 2.0))
            left = int(round((size - self.image_size) / 2.0))
            crop = images[..., top:top + self.image_size, left:left + self.image_size]
            return self._normalise(crop.float().div_(255), mean, std)
        generator = generator or torch.default_generator
        draws = torch.rand(images.shape[0], self.DRAWS, generator=generator)
        policy_seed = int(torch.randint(2**62, (1,), generator=generator)) if self._policy is not None else 0
        if device.type == "cuda":
            draws = draws.pin_memory()
        u = draws.to(device, non_blocking=True).unbind(1)
        x = self._resized_crop_and_flip(images.float().div_(255), u[0:5])
        if self._policy is not None:
            x = self._auto_augment(x, policy_seed)
        x = self._jitter(x, u[5:8], gray_weights)
        return self._erase(self._normalise(x, mean, std), u[8:13])

    def _normalise(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x, memory_format=self.memory_format)
        return torch.sub(x, mean, out=out).div_(std)

    def _resized_crop_and_flip(self, x: torch.Tensor, u) -> torch.Tensor:
        n, spec = x.shape[0], self.spec
        area = _between(u[0], spec.crop_scale, 1.0)
        aspect = torch.exp(_between(u[1], math.log(spec.ratio[0]), math.log(spec.ratio[1])))
        width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the side
        height = torch.sqrt(area / aspect).clamp(max=1.0)
        center_x = 0.5 * width + u[2] * (1 - width)
        center_y = 0.5 * height + u[3] * (1 - height)
        flip = torch.where(u[4] < 0.5, -1.0, 1.0) if spec.flip else torch.ones_like(width)
        zero = torch.zeros_like(width)
        theta = torch.stack([width * flip, zero, 2 * center_x - 1, zero, height, 2 * center_y - 1], 1).view(n, 2, 3)
        grid = F.affine_grid(theta, [n, 3, self.image_size, self.image_size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _auto_augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """torchvision's policy, batched (data.autoaugment), on the images as uint8 like the
        streaming path; its draws come from the batch's generator so runs and resumes repeat them."""
        images = x.mul(255).round_().to(torch.uint8)
        return self._policy(images, torch.Generator().manual_seed(seed)).float().div_(255)

    def _jitter(self, x: torch.Tensor, u, gray_weights: torch.Tensor) -> torch.Tensor:
        """Brightness b, contrast c and saturation s, folded into one pass: with g the per-pixel
        gray and m its image mean, b then c then s give s*c*b*x + (1-s)*c*b*g + (1-c)*b*m
        (no clamping between the three steps, one clamp at the end)."""
        j = self.spec.jitter
        if j <= 0:
            return x
        n = x.shape[0]
        b, c, s = (_between(v, 1 - j, 1 + j).view(n, 1, 1, 1) for v in u)
        gray = (x * gray_weights).sum(1, keepdim=True)
        mean = gray.mean((2, 3), keepdim=True)
        out = x * (s * c * b)
        out.addcmul_(gray, (1 - s) * c * b).add_((1 - c) * b * mean)
        return out.clamp_(0, 1)

    def _erase(self, x: torch.Tensor, u) -> torch.Tensor:
        spec = self.spec
        if spec.erasing <= 0:
            return x
        n, size = x.shape[0], self.image_size
        apply = u[0] < spec.erasing
        area = _between(u[1], *spec.erase_scale)
        aspect = torch.exp(_between(u[2], math.log(spec.erase_ratio[0]), math.log(spec.erase_ratio[1])))
        height = (torch.sqrt(area * aspect) * size).round().clamp(1, size)
        width = (torch.sqrt(area / aspect) * size).round().clamp(1, size)
        top = (u[3] * (size - height + 1)).floor().view(n, 1, 1)
        left = (u[4] * (size - width + 1)).floor().view(n, 1, 1)
        rows = torch.arange(size, device=x.device).view(1, size, 1)
        cols = torch.arange(size, device=x.device).view(1, 1, size)
        box = ((rows >= top) & (rows < top + height.view(n, 1, 1)) & (cols >= left)
               & (cols < left + width.view(n, 1, 1)) & apply.view(n, 1, 1))
        return x.masked_fill_(box.unsqueeze(1), 0.0)


def build_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """torchvision's batch MixUp and/or CutMix (one of the two per batch when both are on), or None."""
    from torchvision.transforms import v2

    options = []
    if mixup_alpha > 0:
        options.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        options.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not options:
        return None
    return options[0] if len(options) == 1 else v2.RandomChoice(options)

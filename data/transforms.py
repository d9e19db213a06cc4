"""Train and eval transforms (torchvision transforms.v2) for PIL images from decode.load_rgb,
and AugmentSpec: the one definition of augmentation strength that both the streaming path
(these transforms) and the cached path (data.augment.BatchAugment) read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

# ImageNet statistics: iNat photos are natural images like ImageNet's, the values are what
# every pretrained torchvision model expects, and a data-set estimate moves them by < 0.02.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUTO_AUGMENTS = ("none", "trivialwide", "randaugment")


@dataclass(frozen=True)
class AugmentSpec:
    """How strongly train images are augmented, read by both data paths. Its defaults are the
    scripts' defaults (utils/config.py's TrainConfig takes them from here): the recipe measured
    in docs/accuracy.md.

    crop_scale: smallest share of the image area a random resized crop keeps (1 = whole image,
    only the aspect ratio varies); jitter: brightness/contrast/saturation factors drawn from
    [1 - jitter, 1 + jitter]; erasing: probability of erasing one random box (2-33 % of the
    area); auto_augment: a torchvision policy applied per image after crop and flip.
    """
    crop_scale: float = 0.6
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: float = 0.0
    erasing: float = 0.0
    auto_augment: str = "none"
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self):
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale={self.crop_scale} must be in (0, 1]")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter={self.jitter} must be in [0, 1)")
        if not 0.0 <= self.erasing <= 1.0:
            raise ValueError(f"erasing={self.erasing} must be in [0, 1]")
        if self.auto_augment not in AUTO_AUGMENTS:
            raise ValueError(f"auto_augment={self.auto_augment!r}; choose one of {', '.join(AUTO_AUGMENTS)}")

    @classmethod
    def from_config(cls, cfg) -> "AugmentSpec":
        """The spec a TrainConfig-like object asks for (its crop_scale, jitter, erasing, auto_augment)."""
        return cls(crop_scale=cfg.crop_scale, jitter=cfg.jitter, erasing=cfg.erasing, auto_augment=cfg.auto_augment)

    def policy(self) -> v2.Transform | None:
        """torchvision's auto-augment policy for one image (uint8 or float in [0, 1]), or None."""
        if self.auto_augment == "trivialwide":
            return v2.TrivialAugmentWide()
        if self.auto_augment == "randaugment":
            return v2.RandAugment()
        return None


def build_eval_transform(
    image_size: int,
    resize_size: int | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Resize the shorter side to resize_size (default image_size * 8/7), center crop image_size."""
    from .decode import working_size

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size or working_size(image_size), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def plain_transform(sizes, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> v2.Compose:
    """The one unaugmented framing of a run (a data.decode.Sizes): shorter side to
    sizes.eval_resize, center crop sizes.image, normalise. Val, test, --predict and every pass
    over train images that is not augmented (a probe's or the feature cache's features, training
    without --data_aug) use it, on both data paths; the decoded-image cache stores exactly its
    pixels before the crop."""
    return build_eval_transform(sizes.image, sizes.eval_resize, mean, std)


def train_transform(sizes, augment: bool | AugmentSpec, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> v2.Compose:
    """A run's train transform: plain_transform without augmentation, else build_train_transform."""
    if augment is False:
        return plain_transform(sizes, mean, std)
    return build_train_transform(sizes.image, augment, mean=mean, std=std)


def build_train_transform(
    image_size: int,
    augment: bool | AugmentSpec = True,
    resize_size: int | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Without augmentation this is the eval transform; with it (True = the default AugmentSpec):
    random resized crop, horizontal flip, the auto-augment policy, colour jitter, random erasing."""
    if augment is False:
        return build_eval_transform(image_size, resize_size, mean, std)
    spec = AugmentSpec() if augment is True else augment
    steps: list = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(spec.crop_scale, 1.0), ratio=spec.ratio,
                                                      antialias=True)]
    if spec.flip:
        steps.append(v2.RandomHorizontalFlip())
    if spec.policy() is not None:
        steps.append(spec.policy())
    if spec.jitter > 0:
        steps.append(v2.ColorJitter(brightness=spec.jitter, contrast=spec.jitter, saturation=spec.jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if spec.erasing > 0:
        steps.append(v2.RandomErasing(p=spec.erasing, scale=spec.erase_scale, ratio=spec.erase_ratio, value=0))
    return v2.Compose(steps)

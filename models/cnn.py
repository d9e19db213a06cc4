"""The part A network: blocks of conv -> [BN] -> activation (once, as the assignment has it, or
more times with convs_per_block) -> max-pool -> [dropout], then a dense layer and the N-way output."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import ModelConfigError

# One table for every place that picks an activation by name (CLI, sweep, checkpoints).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
}
ACTIVATION_NAMES = ("ReLU", "GELU", "SiLU", "Mish", "LeakyReLU", "ELU", "SELU", "Tanh")

FILTER_ORGS = ("same", "double", "half")  # or a float growth factor per block
GLOBAL_POOLS = ("none", "avg")


def canonical_activation(name: str) -> str:
    """'gelu', 'GELU', 'Gelu' -> 'GELU'; unknown names raise with the list of known ones."""
    key = name.strip().lower().replace("_", "").replace("-", "")
    for canonical in ACTIVATION_NAMES:
        if canonical.lower() == key:
            return canonical
    raise ModelConfigError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATION_NAMES)}")


def make_activation(name: str) -> nn.Module:
    return ACTIVATIONS[canonical_activation(name).lower()]()


def filter_counts(num_filters: int | Sequence[int], filter_org: str | float, num_blocks: int) -> list[int]:
    """Filters per block: an explicit list, or a first-block count grown by filter_org.

        >>> filter_counts(32, "double", 5)
        [32, 64, 128, 256, 512]
        >>> filter_counts(64, 0.75, 3)
        [64, 48, 36]
    """
    if isinstance(num_filters, int) and num_filters < 1:
        raise ModelConfigError(f"num_filters={num_filters} must be >= 1; try --num_filters 32")
    if not isinstance(num_filters, int):
        counts = [int(n) for n in num_filters]
        if len(counts) != num_blocks:
            raise ModelConfigError(
                f"num_filters lists {len(counts)} values for {num_blocks} blocks; give one value or {num_blocks}"
            )
    else:
        factor = {"same": 1.0, "const": 1.0, "double": 2.0, "half": 0.5}.get(str(filter_org).lower())
        if factor is None:
            try:
                factor = float(filter_org)
            except ValueError:
                raise ModelConfigError(
                    f"unknown filter_org '{filter_org}'; choose same, double, half or a positive factor such as 1.5"
                ) from None
        if factor <= 0:
            raise ModelConfigError(f"filter_org={filter_org} must be positive; try double or 1.5")
        counts = [max(1, round(num_filters * factor**i)) for i in range(num_blocks)]
    if min(counts) < 1:
        raise ModelConfigError(f"num_filters {counts} must all be >= 1")
    return counts


def broadcast(values: int | Sequence[int], num_blocks: int, name: str) -> list[int]:
    """One int for every block, or exactly one per block."""
    if isinstance(values, int):
        return [values] * num_blocks
    values = [int(v) for v in values]
    if len(values) == 1:
        return values * num_blocks
    if len(values) != num_blocks:
        raise ModelConfigError(f"{name} lists {len(values)} values for {num_blocks} blocks; give one value or {num_blocks}")
    return values


def min_image_size(num_blocks: int) -> int:
    """Each 2x2 max-pool halves the map (rounding down); the last block needs at least 1 pixel."""
    return 2**num_blocks


def _conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, activation: str,
                   batch_norm: bool) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(pad, conv, norm, activation) keeping the map size for any kernel: odd kernels pad in the
    conv; even ones need one more pixel on one side, padded explicitly (this avoids the extra copy
    and warning of padding="same"). Identity stands in for a pad or norm that is not needed."""
    left = (kernel_size - 1) // 2
    right = kernel_size - 1 - left
    pad = nn.ZeroPad2d((left, right, left, right)) if left != right else nn.Identity()
    # With BN right after, a conv bias is redundant (BN's shift absorbs it).
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=left if left == right else 0,
                     bias=not batch_norm)
    norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
    return pad, conv, norm, make_activation(activation)


class ConvActPool(nn.Module):
    """conv (size-preserving padding, odd or even kernel) -> [BN] -> activation, `convs` times,
    -> 2x2 max-pool -> [dropout]. The first conv changes the channel count; further ones
    (`--convs_per_block`, VGG-style) keep it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        activation: str = "ReLU",
        batch_norm: bool = False,
        dropout: float = 0.0,
        convs: int = 1,
    ):
        super().__init__()
        if convs < 1:
            raise ModelConfigError(f"convs_per_block={convs} must be >= 1")
        self.pad, self.conv, self.norm, self.act = _conv_norm_act(in_channels, out_channels, kernel_size,
                                                                  activation, batch_norm)
        # Further convs keep the width. An Identity for one conv: the parameter names of one-conv
        # blocks stay as they always were.
        more = [layer for _ in range(convs - 1)
                for layer in _conv_norm_act(out_channels, out_channels, kernel_size, activation, batch_norm)
                if not isinstance(layer, nn.Identity)]
        self.more = nn.Sequential(*more) if more else nn.Identity()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.pool(self.more(self.act(self.norm(self.conv(self.pad(x)))))))


class SmallCNN(nn.Module):
    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _check_sizes(num_classes: int, image_size: int, num_blocks: int, dense_neurons: int, dropout: float,
                 conv_dropout: float) -> None:
    if num_blocks < 1:
        raise ModelConfigError(f"num_blocks={num_blocks} must be >= 1")
    if num_classes < 2:
        raise ModelConfigError(f"num_classes={num_classes} must be >= 2")
    if image_size < min_image_size(num_blocks):
        raise ModelConfigError(
            f"image_size={image_size} is too small for {num_blocks} pooling stages "
            f"(need >= {min_image_size(num_blocks)}); raise --image_size"
        )
    if dense_neurons < 1:
        raise ModelConfigError(f"dense_neurons={dense_neurons} must be >= 1")
    for name, p in (("dropout", dropout), ("conv_dropout", conv_dropout)):
        if not 0.0 <= p < 1.0:
            raise ModelConfigError(f"{name}={p} must be in [0, 1)")


def build_cnn(
    num_classes: int = 10,
    image_size: int = 224,
    num_filters: int | Sequence[int] = 32,
    filter_org: str | float = "double",
    filter_size: int | Sequence[int] = 3,
    activation: str = "ReLU",
    batch_norm: bool = True,
    dropout: float = 0.0,
    conv_dropout: float = 0.0,
    dense_neurons: int = 256,
    num_blocks: int = 5,
    in_channels: int = 3,
    global_pool: str = "none",
    convs_per_block: int = 1,
) -> SmallCNN:
    """Build the part A CNN from plain arguments.

        >>> model = build_cnn(10, 224, num_filters=64, filter_org="same", filter_size=[5, 5, 3, 3, 3])
        >>> model(torch.zeros(2, 3, 224, 224)).shape
        torch.Size([2, 10])
    """
    _check_sizes(num_classes, image_size, num_blocks, dense_neurons, dropout, conv_dropout)
    counts = filter_counts(num_filters, filter_org, num_blocks)
    sizes = broadcast(filter_size, num_blocks, "filter_size")
    if min(sizes) < 1:
        raise ModelConfigError(f"filter_size {sizes} must all be >= 1")
    blocks, channels = [], in_channels
    for out_channels, kernel in zip(counts, sizes):
        blocks.append(ConvActPool(channels, out_channels, kernel, activation, batch_norm, conv_dropout, convs_per_block))
        channels = out_channels
    features = nn.Sequential(*blocks)
    if global_pool not in GLOBAL_POOLS:
        raise ModelConfigError(f"unknown global_pool '{global_pool}'; choose one of {', '.join(GLOBAL_POOLS)}")
    # "avg" averages each channel over the last map (timm's global_pool); "none" flattens it.
    pool = [nn.AdaptiveAvgPool2d(1)] if global_pool == "avg" else []
    # The flatten size comes from a dummy forward pass, so no hand formula can drift from it.
    with torch.no_grad():
        flat = nn.Sequential(features, *pool)(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1]
    classifier = nn.Sequential(
        *pool,
        nn.Flatten(),
        nn.Linear(flat, dense_neurons),
        make_activation(activation),
        nn.Dropout(dropout),
        nn.Linear(dense_neurons, num_classes),
    )
    return SmallCNN(features, classifier)

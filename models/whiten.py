"""Patch-whitening initialisation of a network's first convolution (trainA's --whiten).

The first conv's filters are set to the principal directions of the k x k x C patches of some
training images, each scaled by 1 / sqrt(eigenvalue + eps) and used with both signs (so a ReLU-like
activation after it keeps both halves of every direction). Its output channels are then
decorrelated, unit-variance measurements of the input patches: the step the rest of the network
would otherwise spend its first epochs learning. This is the "whitening" first layer of the fast
CIFAR-10 training scripts (tysam-code's hlb-CIFAR10, Keller Jordan's airbench), which goes back to
the ZCA-whitened patches of Coates and Ng's single-layer networks.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ModelConfigError

WHITEN_MODES = ("off", "init", "frozen")
WHITEN_EPS = 5e-4  # added to each eigenvalue: keeps the noise directions from being blown up


def patch_statistics(images: torch.Tensor, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean (C*k*k) and covariance (C*k*k x C*k*k) of every k x k patch (no padding) of
    images (N, C, H, W), accumulated image by image in float64, so that large images need no
    patch matrix in memory."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ModelConfigError(f"whitening needs a batch of images (N, C, H, W), got shape {tuple(images.shape)}")
    dim = images.shape[1] * kernel_size * kernel_size
    total = torch.zeros(dim, dtype=torch.float64)
    outer = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for image in images:
        patches = nn.functional.unfold(image[None].double(), kernel_size)[0].T  # (patches, dim)
        total += patches.sum(0)
        outer += patches.T @ patches
        count += patches.shape[0]
    mean = total / count
    return mean, outer / count - torch.outer(mean, mean)


def whitening_filters(images: torch.Tensor, kernel_size: int, out_channels: int,
                      eps: float = WHITEN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Filters (n, C, k, k), n = min(out_channels, 2 * C * k * k): the principal directions of the
    patches, largest variance first, each as the pair (+v, -v) / sqrt(eigenvalue + eps); and the
    biases (n) that centre their outputs (-filter . mean patch)."""
    mean, cov = patch_statistics(images, kernel_size)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    variances = eigenvalues.flip(0).clamp(min=0)
    directions = eigenvectors.flip(1).T  # one per row, largest variance first
    scaled = directions / torch.sqrt(variances + eps)[:, None]
    pairs = torch.stack([scaled, -scaled], 1).reshape(-1, scaled.shape[1])  # +v1, -v1, +v2, -v2, ...
    pairs = pairs[: min(out_channels, pairs.shape[0])]
    return pairs.reshape(-1, images.shape[1], kernel_size, kernel_size).float(), (-pairs @ mean).float()


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first Conv2d of model, in registration order (the input layer of a feed-forward CNN)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ModelConfigError("the model has no Conv2d layer to whiten")


@torch.no_grad()
def whiten_first_conv_(model: nn.Module, images: torch.Tensor, eps: float = WHITEN_EPS) -> int:
    """Set the first conv's filters to whitening_filters of images (the rest, where it has more
    output channels than 2 * C * k * k, keep their initialisation) and, if it has a bias (no BN
    after it), the bias that centres them. Returns how many filters were set."""
    conv = first_conv(model)
    kernel = conv.kernel_size
    if kernel[0] != kernel[1] or conv.groups != 1 or conv.in_channels != images.shape[1]:
        raise ModelConfigError(f"cannot whiten a {conv}: it needs a square kernel over all "
                               f"{images.shape[1]} input channels")
    filters, biases = whitening_filters(images, kernel[0], conv.out_channels, eps)
    conv.weight[: len(filters)] = filters.to(conv.weight)
    if conv.bias is not None:
        conv.bias[: len(biases)] = biases.to(conv.bias)
    return len(filters)

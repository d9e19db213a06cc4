"""Pictures of a trained model, drawn with PIL and torchvision.utils (no matplotlib):
prediction grid, first-layer filters and feature maps, guided backpropagation, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torchvision.utils import make_grid

from data import load_rgb

from .confusion import confusion_counts, confusion_matrix_picture
from .drawing import BLACK, GREEN, MAX_CLASSES_SHOWN, RED, WHITE, fit_text, font


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) or (H, W) float in [0, 1] -> PIL image."""
    array = (tensor.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    if array.ndim == 3:
        array = array.transpose(1, 2, 0)
    return Image.fromarray(array)


def center_square(image: Image.Image, size: int) -> Image.Image:
    """The eval view of an image for display: shorter side to size, center crop."""
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.Resampling.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass
class Prediction:
    index: int
    true_label: int
    predicted: int
    confidence: float


@torch.no_grad()
def predict_indices(model: nn.Module, dataset, indices: list[int], device: torch.device) -> list[Prediction]:
    model.eval()
    inputs = torch.stack([dataset[i][0] for i in indices]).to(device)
    probabilities = model(inputs).float().softmax(1).cpu()
    confidence, predicted = probabilities.max(1)
    return [Prediction(i, dataset.samples[i].label, int(p), float(c)) for i, p, c in zip(indices, predicted, confidence)]


def choose_per_class(dataset, per_class: int, seed: int) -> list[int]:
    """per_class readable images of every class (of MAX_CLASSES_SHOWN classes drawn by seed, where
    there are more), the same ones for the same seed."""
    rng = np.random.default_rng(seed)
    labels = range(len(dataset.classes))
    if len(labels) > MAX_CLASSES_SHOWN:
        labels = sorted(rng.choice(len(labels), MAX_CLASSES_SHOWN, replace=False).tolist())
    chosen = []
    for label in labels:
        candidates = [i for i, s in enumerate(dataset.samples) if s.label == label]
        picked = []
        for i in rng.permutation(candidates):
            if len(picked) == per_class:
                break
            if dataset[int(i)] is not None:
                picked.append(int(i))
        chosen.extend(picked)
    return chosen


def prediction_grid(model: nn.Module, dataset, device: torch.device, path: Path, per_class: int = 3,
                    seed: int = 0, tile: int = 128) -> list[Prediction]:
    """per_class test images of each class (of at most MAX_CLASSES_SHOWN), captioned true /
    predicted (confidence), each caption cut to its tile; a red frame marks a wrong prediction, a
    green one a right one. Up to 10 classes a row each; beyond, several classes share a row (12
    images), so that 50 classes stay a picture of about 1,600 x 1,300 pixels, not a strip."""
    predictions = predict_indices(model, dataset, choose_per_class(dataset, per_class, seed), device)
    order = {label: i for i, label in enumerate(sorted({p.true_label for p in predictions}))}
    per_row = 1 if len(order) <= 10 else max(1, 12 // per_class)  # classes a row
    caption, pad = 30, 6
    rows = max(-(-len(order) // per_row), 1)
    canvas = Image.new("RGB", (per_row * per_class * (tile + pad) + pad, rows * (tile + caption + pad) + pad), WHITE)
    draw, small = ImageDraw.Draw(canvas), font(11)
    slots: dict[int, int] = {}
    for p in predictions:
        column = slots.setdefault(p.true_label, 0)
        slots[p.true_label] += 1
        row, block = divmod(order[p.true_label], per_row)
        x, y = pad + (block * per_class + column) * (tile + pad), pad + row * (tile + caption + pad)
        canvas.paste(center_square(load_rgb(dataset.samples[p.index].path, tile), tile), (x, y))
        colour = GREEN if p.predicted == p.true_label else RED
        draw.rectangle([x - 3, y - 3, x + tile + 2, y + tile + 2], outline=colour, width=3)
        draw.text((x, y + tile + 3), fit_text(draw, f"true: {dataset.classes[p.true_label]}", tile, small), fill=BLACK,
                  font=small)
        draw.text((x, y + tile + 15), fit_text(draw, f"pred: {dataset.classes[p.predicted]}", tile, small,
                                               f"  {p.confidence:.0%}"), fill=colour, font=small)
    canvas.save(path)
    return predictions


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def filter_grid(model: nn.Module, path: Path, tile: int = 24) -> Image.Image:
    """The first conv layer's kernels as colour tiles (each scaled to its own min..max)."""
    weights = first_conv(model).weight.detach().float().cpu()[:, :3]
    low = weights.amin((1, 2, 3), keepdim=True)
    high = weights.amax((1, 2, 3), keepdim=True)
    tiles = (weights - low) / (high - low).clamp_min(1e-8)
    tiles = F.interpolate(tiles, size=(tile, tile), mode="nearest")
    image = to_pil(make_grid(tiles, nrow=int(np.ceil(np.sqrt(len(tiles)))), padding=2, pad_value=1.0))
    image.save(path)
    return image


@torch.no_grad()
def feature_maps(model: nn.Module, image: torch.Tensor, path: Path, limit: int = 64) -> Image.Image:
    """The first conv layer's activations (after its activation function, before pooling) for
    one image, as grayscale tiles."""
    block = next((m for m in model.modules() if isinstance(m, ACTIVATION_TYPES)), first_conv(model))
    captured = {}
    handle = block.register_forward_hook(lambda m, i, o: captured.setdefault("out", o.detach().float()))
    model.eval()
    model(image.unsqueeze(0))
    handle.remove()
    maps = captured["out"][0][:limit].cpu()
    maps = (maps - maps.amin((1, 2), keepdim=True)) / (maps.amax((1, 2), keepdim=True) -
                                                       maps.amin((1, 2), keepdim=True)).clamp_min(1e-8)
    grid = make_grid(maps.unsqueeze(1), nrow=8, padding=2, pad_value=1.0)
    picture = to_pil(grid)
    picture.save(path)
    return picture


ACTIVATION_TYPES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.Tanh)


def guided_backprop(model: nn.Module, image: torch.Tensor, layer: nn.Module, channels: list[int]) -> torch.Tensor:
    """(len(channels), 3, H, W) guided-backprop maps of the given output channels of layer.

    At every activation the backward pass keeps only positive gradients. For ReLU this is
    Springenberg et al.'s guided backpropagation exactly; for smooth activations (GELU, SiLU,
    Mish, ...) it is the same rule applied to their own local gradient. Each map is the
    gradient of the channel's strongest activation in the image.
    """
    hooks = [m.register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0].clamp(min=0),))
             for m in model.modules() if isinstance(m, ACTIVATION_TYPES)]
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    maps = []
    model.eval()
    try:
        for channel in channels:
            x = image.unsqueeze(0).clone().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            model(x)
            captured["out"][0, channel].max().backward()
            maps.append(x.grad[0].detach().clone())
    finally:
        handle.remove()
        for h in hooks:
            h.remove()
    return torch.stack(maps)


def guided_backprop_grid(model: nn.Module, image: torch.Tensor, display: Image.Image, path: Path,
                         count: int = 10) -> torch.Tensor:
    """The image and the guided-backprop maps of the `count` most active channels of the last
    conv block's output, as one picture."""
    blocks = [m for m in model.modules() if hasattr(m, "conv") and hasattr(m, "pool")]
    layer = blocks[-1] if blocks else [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        captured = {}
        handle = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
        model.eval()
        model(image.unsqueeze(0))
        handle.remove()
        strength = captured["out"][0].flatten(1).amax(1)
    channels = strength.argsort(descending=True)[:count].tolist()
    maps = guided_backprop(model, image, layer, channels).float().cpu()
    shown = []
    for m in maps:
        m = m - m.mean()
        m = m / (3 * m.std().clamp_min(1e-8)) + 0.5  # the usual display: centred, +-3 std
        shown.append(m.clamp(0, 1))
    original = torch.from_numpy(np.array(display.resize(maps.shape[-2:][::-1]))).permute(2, 0, 1).float() / 255
    grid = make_grid(torch.stack([original, *shown]), nrow=(count + 1 + 1) // 2, padding=2, pad_value=1.0)
    to_pil(grid).save(path)
    return maps


def make_all(model: nn.Module, precision, test_set, test_stats, run_dir: Path, tracker, class_names: list[str],
             seed: int = 0, guided: bool = True) -> dict[str, Path]:
    """Every picture for a finished run, saved in run_dir and logged to wandb."""
    model = model.float().to(memory_format=torch.contiguous_format)
    device = precision.device
    paths = {"prediction_grid": run_dir / "prediction_grid.png", "first_layer_filters": run_dir / "filters.png",
             "first_layer_feature_maps": run_dir / "feature_maps.png",
             "confusion_matrix": run_dir / "confusion_matrix.png"}
    prediction_grid(model, test_set, device, paths["prediction_grid"], seed=seed)
    filter_grid(model, paths["first_layer_filters"])
    index = choose_per_class(test_set, 1, seed)[0]
    image = test_set[index][0].to(device)
    feature_maps(model, image, paths["first_layer_feature_maps"])
    if guided:
        paths["guided_backprop"] = run_dir / "guided_backprop.png"
        display = center_square(test_set.load(index), image.shape[-1])
        guided_backprop_grid(model, image, display, paths["guided_backprop"])
    matrix = confusion_counts(test_stats.targets, test_stats.predictions, len(class_names))
    confusion_matrix_picture(matrix, class_names, paths["confusion_matrix"])
    tracker.log_images(paths)
    tracker.log_confusion_matrix(test_stats.targets, test_stats.predictions, class_names, MAX_CLASSES_SHOWN)
    return paths

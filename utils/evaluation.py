"""Evaluation: loss, accuracy and per-class counts over a loader (no host-device sync per batch),
with optional test-time flips; the same for validation, test and --predict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from data.progress import batch_size_of, progress

from .interrupts import start_iterating
from .runtime import Precision


@dataclass
class EvalStats:
    loss: float
    accuracy: float
    images: int
    per_class_correct: list[int]
    per_class_total: list[int]
    predictions: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    top5_accuracy: float = float("nan")  # the true class among the 5 highest logits (all, under 5 classes)
    top_classes: list[list[int]] = field(default_factory=list)  # with keep_predictions: each image's 5 likeliest
    top_probabilities: list[list[float]] = field(default_factory=list)  # and their softmax probabilities

    def per_class_accuracy(self) -> list[float]:
        return [c / t if t else float("nan") for c, t in zip(self.per_class_correct, self.per_class_total)]

    @property
    def balanced_accuracy(self) -> float:
        """The mean of the per-class accuracies over the classes the data holds (sklearn's
        balanced_accuracy_score): every class counts the same, however many images it has."""
        seen = [c / t for c, t in zip(self.per_class_correct, self.per_class_total) if t]
        return sum(seen) / len(seen) if seen else float("nan")


def predict_logits(model: nn.Module, inputs: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's logits; with tta "flip", the mean of the image's and its mirror's logits; with
    "views", inputs are (batch, views, ...) (features of an image and its mirror) and the logits
    are the mean over the views."""
    if tta == "views":
        return model(inputs.flatten(0, 1)).unflatten(0, inputs.shape[:2]).mean(1)
    logits = model(inputs)
    if tta == "flip":
        logits = (logits + model(inputs.flip(-1))) / 2
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: Precision, num_classes: int, desc: str = "eval",
             show_progress: bool = True, keep_predictions: bool = False,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, tta: str = "none") -> EvalStats:
    """Plain cross-entropy (no label smoothing) and accuracy over the whole loader.

    reduce sums count tensors across processes under DDP, so every image counts exactly once.
    Counting uses index_add_ (no host-device sync per batch, unlike bincount or masks).
    """
    model.eval()
    device = precision.device
    # float64 where the device has it (Apple's MPS does not)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    class_correct = torch.zeros(num_classes, device=device, dtype=torch.long)
    class_total = torch.zeros(num_classes, device=device, dtype=torch.long)
    top5_correct = torch.zeros((), device=device, dtype=torch.long)
    predictions, targets_all, top_k = [], [], []
    batches = progress(start_iterating(loader), desc, len(loader), per_item=batch_size_of(loader), show=show_progress)
    for _, inputs, targets in precision.batches(batches):
        with precision.autocast():
            logits = predict_logits(model, inputs, tta)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").to(loss_sum.dtype)
        predicted = logits.argmax(1)
        class_total.index_add_(0, targets, torch.ones_like(targets))
        class_correct.index_add_(0, targets, (predicted == targets).long())
        top = logits.float().softmax(1).topk(min(5, logits.shape[1]), 1)
        top5_correct += (top.indices == targets[:, None]).any(1).sum()
        if keep_predictions:
            predictions.append(predicted.cpu())
            targets_all.append(targets.cpu())
            top_k.append((top.indices.cpu(), top.values.cpu()))
    if reduce is not None:
        loss_sum, class_correct, class_total = reduce(loss_sum), reduce(class_correct), reduce(class_total)
        top5_correct = reduce(top5_correct)
    total = int(class_total.sum())
    correct = int(class_correct.sum())
    return EvalStats(
        loss=float(loss_sum) / max(total, 1),
        accuracy=correct / max(total, 1),
        images=total,
        per_class_correct=class_correct.tolist(),
        per_class_total=class_total.tolist(),
        predictions=torch.cat(predictions).tolist() if predictions else [],
        targets=torch.cat(targets_all).tolist() if targets_all else [],
        top5_accuracy=int(top5_correct) / max(total, 1),
        top_classes=torch.cat([i for i, _ in top_k]).tolist() if top_k else [],
        top_probabilities=torch.cat([p for _, p in top_k]).tolist() if top_k else [],
    )

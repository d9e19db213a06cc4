"""Optimizer with no weight decay on biases and norms, and a per-step warmup + decay schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    from .ema import WeightEMA


@dataclass
class Optimisation:
    """What a training step uses besides the model and the batch: the optimizer and its schedule,
    the loss, the fp16 scaler and the per-step tools."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: nn.Module
    scaler: torch.amp.GradScaler | None = None  # None: fit() makes one from the precision (enabled for fp16)
    mix: Callable | None = None  # MixUp/CutMix on train batches
    ema: WeightEMA | None = None  # averaged weights, validated and saved as best.pt
    before_epoch: Callable[[int], None] | None = None  # epoch -> None, e.g. trainB's gradual unfreezing


def split_decay(named_params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                name: str = "") -> list[dict]:
    """Two parameter groups at lr: weights with weight_decay, and biases/norm scales without it
    (decaying a BN scale towards 0 only fights the normalisation)."""
    decay, no_decay = [], []
    for _, param in named_params:
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{name}decay"})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}no_decay"})
    return groups


def build_optimizer(param_groups: list[dict], name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of each group's base lr at a step: linear warmup, then cosine to 0 ("cosine"),
    cosine to 1/1000 after a 25 % warmup from 1/25 ("onecycle"), or flat ("none")."""
    if kind == "onecycle":
        warmup_steps = max(warmup_steps, int(0.25 * total_steps))
        start, end = 1 / 25, 1e-3
    else:
        start, end = 0.0, 0.0
    if step < warmup_steps:
        return start + (1 - start) * (step + 1) / warmup_steps
    if kind == "none":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step. LambdaLR scales every group's own lr, so discriminative
    rates keep their ratios, and past total_steps it stays at the floor instead of raising."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, kind))

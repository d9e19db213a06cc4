"""--lr_find: the learning-rate range test (Smith 2015; fastai's lr_find). The learning rate grows
exponentially from 1e-7 to 10 over at most one epoch of real training steps; the smoothed loss
is recorded until it diverges. The model, optimizer and random streams are put back afterwards,
so nothing is trained."""

from __future__ import annotations

import copy
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from data.progress import batch_size_of, progress

from .checkpoint import capture_rng_state, restore_rng_state
from .errors import EXIT_OK
from .optim import Optimisation
from .outputs import write_state
from .recipe import Run
from .runtime import Precision
from .train import step

START_LR, END_LR = 1e-7, 10.0
SMOOTHING = 0.9  # exponential moving average of the loss (bias-corrected)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]

    @property
    def suggestion(self) -> float | None:
        """A tenth of the learning rate at the smoothed loss's minimum: still on the descending
        slope, a safe step below where the loss turns (fastai's classic 'min/10' rule)."""
        finite = [(s, lr) for s, lr in zip(self.smoothed, self.lrs) if math.isfinite(s)]
        if len(finite) < 5:
            return None
        _, lr_at_min = min(finite)
        return lr_at_min / 10

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "lr", "loss", "smoothed_loss"])
            for index, row in enumerate(zip(self.lrs, self.losses, self.smoothed), start=1):
                writer.writerow([index, *(f"{v:.6g}" for v in row)])


def lr_find(model: nn.Module, optimizer: torch.optim.Optimizer, loader, precision: Precision, loss_fn: nn.Module,
            steps: int = 100, mix: Callable | None = None, start_lr: float = START_LR,
            end_lr: float = END_LR) -> LRFindResult:
    """Ramp every parameter group's lr together (their ratios kept, the largest one ramping from
    start_lr to end_lr) over min(steps, one epoch) training steps. Everything is restored after."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_rng = capture_rng_state()
    base = [group["lr"] for group in optimizer.param_groups]
    top = max(base)
    steps = max(2, min(steps, len(loader)))
    opt = Optimisation(optimizer, None, loss_fn, precision.scaler(), mix)
    result = LRFindResult([], [], [])
    average, best = 0.0, math.inf
    model.train()
    try:
        batches = precision.batches(loader)
        for index in progress(range(steps), "lr_find", steps, unit="step", per_item=batch_size_of(loader)):
            lr = start_lr * (end_lr / start_lr) ** (index / (steps - 1))
            for group, group_base in zip(optimizer.param_groups, base):
                group["lr"] = lr * group_base / top
            batch = next(batches, None)
            if batch is None:
                break
            loss, _, _ = step(model, batch[1], batch[2], opt, precision)
            value = float(loss.detach())
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            smoothed = average / (1 - SMOOTHING ** (index + 1))
            result.lrs.append(lr)
            result.losses.append(value)
            result.smoothed.append(smoothed)
            if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
                break
            best = min(best, smoothed)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        restore_rng_state(saved_rng)
        optimizer.zero_grad(set_to_none=True)
    return result


def find_learning_rate(cfg, model: nn.Module, opt, loader, precision: Precision, steps: int, run_dir: Path,
                       tracker, script: str) -> float | None:
    """--lr_find: ramp, print the suggestion, save lr_find.csv and lr_find.png (and log them)."""
    from .curves import plot_lr_find

    result = lr_find(model, opt.optimizer, loader, precision, opt.loss_fn, steps, opt.mix)
    suggestion = result.suggestion
    result.write_csv(run_dir / "lr_find.csv")
    plot_lr_find(result.lrs, result.losses, result.smoothed, suggestion, run_dir / "lr_find.png",
                 title=f"{script} learning-rate finder ({len(result.lrs)} steps, batch {cfg.batch_size})")
    tracker.log_images({"lr_find": run_dir / "lr_find.png"})
    if suggestion is None:
        print(f"lr_find: the loss diverged within {len(result.lrs)} steps; no suggestion (see {run_dir}/lr_find.png)")
        return None
    line = f"lr_find: suggested --lr {suggestion:.2g} (the current --lr is {cfg.lr:g})"
    if hasattr(cfg, "backbone_lr"):
        line += f"; with the same head/backbone ratio: --lr {suggestion:.2g} --backbone_lr {suggestion * cfg.backbone_lr / cfg.lr:.2g}"
    print(f"{line}\nsaved {run_dir}/lr_find.png and lr_find.csv (nothing was trained)")
    return suggestion


def run_lr_find(run: Run, model: nn.Module, inputs, opt, steps: int, run_dir: Path, tracker) -> int:
    """--lr_find on rank 0 (the others wait): the unwrapped module, no DDP collectives."""
    if run.dist.is_main:
        module = inputs.module if run.on_features else model
        find_learning_rate(run.cfg, module, opt, inputs.train, inputs.precision, steps, run_dir, tracker,
                           run.recipe.script)
        write_state(run_dir, "lr_find")
    run.dist.wait_for_all()
    tracker.finish()
    return EXIT_OK

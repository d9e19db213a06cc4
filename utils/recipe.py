"""The two carriers of a run's set-up: ModelRecipe (what a script contributes) and Run (one
process's view of the run being set up). Apart from utils/run.py, which drives them, so that every
module run.py calls can name them in its signatures without importing run.py back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from data import IMAGENET_MEAN, IMAGENET_STD, Sizes

from .checkpoint import FitState
from .distributed import DistInfo
from .runtime import Precision


@dataclass(kw_only=True)
class ModelRecipe:
    """What a script contributes: everything else is shared."""
    script: str  # "trainA" / "trainB": recorded in checkpoints, checked when loading them
    new_model: Callable[[int], nn.Module]  # num_classes -> a fresh model (pretrained weights loaded)
    param_groups: Callable[[nn.Module], list[dict]]  # model -> optimizer groups (each with its lr)
    train_transform: Callable
    eval_transform: Callable
    sizes: Sizes  # decode, eval resize and crop (the transforms above are built from them)
    augment: bool = True  # train-time augmentation (with --data_aug); off where features are cached
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    at_epoch_start: Callable[[nn.Module, int], None] | None = None  # (model, epoch), e.g. gradual's unfreezing
    find_unused_parameters: bool = False  # under DDP: some parameters get no gradient in some epochs
    # With a frozen backbone: model -> (features(images), head). fit() then trains only the
    # head on features computed once; checkpoints still hold the whole model.
    split_features: Callable[[nn.Module], tuple[Callable, nn.Module]] | None = None
    # Data-dependent initialisation of a fresh model on its device (trainA's --whiten, trainB's
    # --probe_epochs): (model, data, precision) -> what it did, in a few words. Not called on
    # --resume, whose weights come from last.pt.
    init_from_data: Callable[[nn.Module, object, Precision], str] | None = None


@dataclass
class Run:
    """One process's view of the run being set up."""
    cfg: object
    recipe: ModelRecipe
    dist: DistInfo
    precision: Precision
    checkpoint: dict | None
    state: FitState | None = None  # set by train()
    started: float = field(default_factory=time.perf_counter)  # for the total time printed at the end

    @property
    def on_features(self) -> bool:
        """The epochs train the head on cached features (the recipe's split_features; under torchrun
        every step runs the frozen backbone instead)."""
        return self.recipe.split_features is not None and not self.dist.enabled

    def say(self, *args, **kwargs) -> None:
        if self.dist.is_main:
            print(*args, **kwargs)

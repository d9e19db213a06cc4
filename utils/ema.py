"""Model EMA: an exponential moving average of the weights (and BN buffers), validated, tested
and saved as best.pt instead of the raw weights when --ema_decay > 0."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class WeightEMA:
    """torch.optim.swa_utils.AveragedModel with an EMA update whose decay warms up as
    min(decay, (1 + t) / (10 + t)) after t updates (as timm's ModelEma does), so a short run is
    not dominated by its random initial weights (0.999 ** 1000 is still 37 %).

    source: the unwrapped model the optimizer trains (never a DDP or compiled wrapper: their
    parameters are the same tensors). view: the part of the averaged model that validation
    batches go through (the head alone when Part B trains on cached features).
    """

    def __init__(self, source: nn.Module, decay: float, view: Callable[[nn.Module], nn.Module] = lambda m: m):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in (0, 1)")
        self.source, self.decay, self.view = source, decay, view
        self.updates = 0  # counted here: reading n_averaged back from a GPU would sync every step
        self.averaged = AveragedModel(source, multi_avg_fn=self._average, use_buffers=True)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _num_averaged) -> None:
        decay = self.current_decay()
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:  # integer buffers (BN's num_batches_tracked) follow the model
            for a, c in zip(averaged, current):
                a.copy_(c)

    def update(self) -> None:
        self.averaged.update_parameters(self.source)
        self.updates += 1

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the whole source model."""
        return self.averaged.module

    def eval_model(self) -> nn.Module:
        return self.view(self.averaged.module)

    def state_dict(self) -> dict:
        return {"averaged": self.averaged.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.updates = int(state["updates"])

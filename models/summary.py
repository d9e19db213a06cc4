"""A per-layer table of output shapes, parameters and multiply-adds, from one dummy forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass(frozen=True)
class ModelSummary:
    rows: list[LayerRow]
    total_params: int
    trainable_params: int
    total_macs: int

    def format(self) -> str:
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'type':<12} {'output shape':<20} {'params':>12} {'mult-adds':>15}"]
        for r in self.rows:
            shape = "x".join(str(s) for s in r.output_shape)
            lines.append(f"{r.name:<{width}}  {r.kind:<12} {shape:<20} {r.params:>12,} {r.macs:>15,}")
        lines.append(
            f"total: {self.total_params:,} parameters ({self.trainable_params:,} trainable), "
            f"{self.total_macs:,} multiply-adds per image ({self.total_macs / 1e9:.3f} GMACs)"
        )
        return "\n".join(lines)


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-adds of one image through module (conv and linear; the rest are counted as 0)."""
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        return output[0].numel() * kernel
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelSummary:
    """Run one zero image of input_shape (C, H, W) through model on CPU and record each leaf."""
    rows: list[LayerRow] = []
    hooks = []
    for name, module in model.named_modules():
        if list(module.children()) or isinstance(module, nn.Identity):
            continue

        def hook(mod, _inputs, output, name=name):
            params = sum(p.numel() for p in mod.parameters(recurse=False))
            rows.append(LayerRow(name, type(mod).__name__, tuple(output.shape[1:]), params, _macs(mod, output)))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(rows, total, trainable, sum(r.macs for r in rows))

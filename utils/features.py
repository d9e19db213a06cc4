"""Part B's frozen-feature cache: with a frozen backbone, every image goes through it once and
the epochs train the head alone on the stored features (a ModelRecipe's feature_cache hook says
how to split the model)."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from data.loaders import FeatureBatches, in_order

from .evaluation import evaluate
from .optim import Optimisation, build_optimizer, build_scheduler, split_decay
from .runtime import Precision
from .train import FitInputs, train_one_epoch


@torch.no_grad()
def compute_features(extract: Callable, loader, precision: Precision,
                     mirror: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every image of loader through extract once: (features as fp32, labels), on the device.
    With mirror, the features are (images, 2, dim): each image's and its mirror image's."""
    features, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images, targets = precision.to_device(*batch)
        with precision.autocast():
            batch_features = extract(images).float()
            if mirror:
                batch_features = torch.stack([batch_features, extract(images.flip(-1)).float()], 1)
        features.append(batch_features)
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def feature_batches(extract: Callable, train_loader, val_loader, precision: Precision, batch_size: int,
                    seed: int, tta: str = "none") -> tuple[FeatureBatches, FeatureBatches | None]:
    """Features of every train image (unshuffled, none dropped) and every val image (none without a
    val loader: --refit), computed once; with tta "flip", also of each val image's mirror, so that
    validation on features scores each image as validation and test on images do (val_tta says how)."""
    train = FeatureBatches(*compute_features(extract, in_order(train_loader), precision), batch_size, True, seed)
    if val_loader is None:
        return train, None
    val = compute_features(extract, val_loader, precision, mirror=tta == "flip")
    return train, FeatureBatches(*val, batch_size, False, seed)


def val_tta(val: FeatureBatches | None) -> str:
    """How evaluate() scores these val features: averaged over their views, or one vector each."""
    return "views" if val is not None and val.features.dim() == 3 else "none"


def feature_inputs(split: Callable, model: nn.Module, data, precision: Precision, cfg, say: Callable) -> FitInputs:
    """split(model) -> (extract, head). The head trains in fp32 (it is tiny) on features of the
    frozen backbone: computed here, or the ones --probe_epochs already computed (data.features)."""
    extract, head = split(model)
    started = time.perf_counter()
    train, val = data.features or feature_batches(extract, data.loaders[0], data.loaders[1], precision,
                                                  cfg.batch_size, cfg.seed, cfg.tta)
    if cfg.compile:
        say("--compile: not applied, the feature cache trains only the head (one small layer)")
    when = "reused from the probe" if data.features else f"computed once in {time.perf_counter() - started:.1f}s"
    images = len(train.labels) + (len(val.labels) if val is not None else 0)
    say(f"frozen features of {images} images {when}; epochs now train the head only")
    return FitInputs(head, train, val, Precision(precision.device), val_tta(val), len(data.class_names))


def probe_head(split: Callable, model: nn.Module, data, precision: Precision, cfg) -> str:
    """LP-FT's first half (Kumar et al., ICLR 2022): before fine-tuning, train the new head alone
    on features of the frozen pretrained backbone, computed once, for cfg.probe_epochs cheap
    passes, at cfg.probe_lr with the run's optimizer and schedule. A random head's large gradients in the
    first fine-tuning steps otherwise distort the pretrained features. What it did, in words."""
    extract, head = split(model)
    started = time.perf_counter()
    train, val = feature_batches(extract, data.loaders[0], data.loaders[1], precision, cfg.batch_size, cfg.seed,
                                 cfg.tta)
    data.features = (train, val)
    optimizer = build_optimizer(split_decay(head.named_parameters(), cfg.probe_lr, cfg.weight_decay), cfg.optimizer,
                                cfg.probe_lr, cfg.momentum)
    steps = cfg.probe_epochs * len(train)
    scheduler = build_scheduler(optimizer, cfg.scheduler, steps, round(cfg.warmup_epochs * len(train)))
    opt = Optimisation(optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                       torch.amp.GradScaler(precision.device.type, enabled=False))
    head_precision = Precision(precision.device)
    for epoch in range(1, cfg.probe_epochs + 1):
        train.generator.manual_seed(cfg.seed * 1_000_003 + epoch)
        stats = train_one_epoch(head, train, opt, head_precision, epoch, show_progress=False)
    scores = f"train_accuracy {stats.accuracy:.4f}"
    if val is not None:  # --refit's probe has no val
        result = evaluate(head, val, head_precision, len(data.class_names), desc="probe val", show_progress=False,
                          tta=val_tta(val))
        scores += f", val_accuracy {result.accuracy:.4f}"
    return (f"probe: the head trained alone for {cfg.probe_epochs} epochs on frozen features of "
            f"{len(train.labels)} train images ({time.perf_counter() - started:.1f}s): {scores}")

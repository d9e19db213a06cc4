"""Part B's frozen-feature cache: with a frozen backbone, every image goes through it once and
the epochs train the head alone on the stored features (a ModelRecipe's split_features hook says
how to split the model)."""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch
from torch import nn

from data.loaders import FeatureBatches, in_order
from data.progress import batch_size_of, progress

from .evaluation import evaluate
from .feature_store import FeatureStore, backbone_digest, split_key, store_dir
from .optim import Optimisation, build_optimizer, build_scheduler, split_decay
from .runtime import Precision
from .train import FitInputs, train_one_epoch


@torch.no_grad()
def compute_features(extract: Callable, loader, precision: Precision, mirror: bool = False,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Run every image of loader through extract once: (features as fp32, labels), on the device.
    With mirror, the features are (images, 2, dim): each image's and its mirror image's."""
    features, labels = [], []
    for _, images, targets in precision.batches(progress(loader, desc, len(loader), per_item=batch_size_of(loader))):
        with precision.autocast():
            batch_features = extract(images).float()
            if mirror:
                batch_features = torch.stack([batch_features, extract(images.flip(-1)).float()], 1)
        features.append(batch_features)
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


class FrozenFeatures:
    """Each split's features of one frozen backbone, computed at most once a run (the probe, the
    epochs, the refit and both tests share them) and kept on disk across runs (FeatureStore).
    computed counts the images that went through the backbone, per view."""

    def __init__(self, extract: Callable, model: nn.Module, head: nn.Module, precision: Precision,
                 store: FeatureStore, framing: str):
        self.extract, self.precision, self.store, self.model, self.head = extract, precision, store, model, head
        mode = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[precision.autocast_dtype]
        self.framing = f"{framing}|{precision.device.type}|{mode}|cl{int(precision.channels_last)}"
        self.done: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self.computed = self.reused = 0

    @functools.cached_property
    def digest(self) -> str:
        return backbone_digest(self.model, self.head)

    def of(self, name: str, loader, samples, mirror: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of loader's images (every one once, not augmented, in order); with
        mirror (images, 2, dim): each image's and its mirror's."""
        if (name, mirror) not in self.done:
            # the key (a stat of every file, a hash of every weight) only where there is a store to look in
            key = split_key(samples, self.framing, 2 if mirror else 1, self.digest) if self.store.folder else ""
            (features, labels), reused = self.store.get(
                key, lambda: compute_features(self.extract, in_order(loader), self.precision, mirror,
                                              f"{name} features{' + mirror' * mirror}"),
                self.precision.device)
            if reused:
                self.reused += len(labels)
            else:
                self.computed += len(labels) * (2 if mirror else 1)
            self.done[(name, mirror)] = features, labels
        return self.done[(name, mirror)]


def frozen_features(split: Callable, model: nn.Module, data, precision: Precision, cfg) -> FrozenFeatures:
    """data's FrozenFeatures, made on first use (the store follows --cache: off keeps nothing)."""
    if data.frozen is None:
        extract, head = split(model)
        store = FeatureStore(store_dir(cfg.cache_dir) if cfg.cache != "off" else None)
        framing = f"{data.train_set.decode_size}|{data.train_set.plain_transform!r}"
        data.frozen = FrozenFeatures(extract, model, head, precision, store, " ".join(framing.split()))
    return data.frozen


def feature_batches(frozen: FrozenFeatures, data, batch_size: int, seed: int,
                    tta: str = "none") -> tuple[FeatureBatches, FeatureBatches | None]:
    """Features of every train image (unshuffled, none dropped) and every val image (none without a
    val loader: --refit); with tta "flip", also of each val image's mirror, so that validation on
    features scores each image as validation and test on images do (val_tta says how)."""
    train = FeatureBatches(*frozen.of("train", data.loaders[0], data.train_set.samples, False), batch_size, True, seed)
    if data.loaders[1] is None:
        return train, None
    val = frozen.of("val", data.loaders[1], data.val_set.samples, tta == "flip")
    return train, FeatureBatches(*val, batch_size, False, seed)


def run_features(split: Callable, model: nn.Module, data, precision: Precision, cfg):
    """data.features: the run's train and val FeatureBatches, made on first use (the probe's or the
    epochs', whichever comes first) and shared after."""
    if data.features is None:
        data.features = feature_batches(frozen_features(split, model, data, precision, cfg), data, cfg.batch_size,
                                        cfg.seed, cfg.tta)
    return data.features


def train_and_val_features(data, batch_size: int, seed: int) -> FeatureBatches:
    """--refit's training features: the run's train and val features together (val's first view,
    the image itself), in the order of the refit's samples (train, then val)."""
    train, val = data.features
    val_features = val.features[:, 0] if val.features.dim() == 3 else val.features
    return FeatureBatches(torch.cat([train.features, val_features]), torch.cat([train.labels, val.labels]),
                          batch_size, True, seed)


def test_features(split: Callable, model: nn.Module, data, precision: Precision, cfg) -> FeatureBatches:
    """The test images' features (with their mirrors for --tta flip), computed once for every
    checkpoint a run tests: their frozen backbones are the same."""
    frozen = frozen_features(split, model, data, precision, cfg)
    features = frozen.of("test", data.loaders[2], data.test_set.samples, cfg.tta == "flip")
    return FeatureBatches(*features, cfg.batch_size, False, cfg.seed)


def val_tta(val: FeatureBatches | None) -> str:
    """How evaluate() scores these val features: averaged over their views, or one vector each."""
    return "views" if val is not None and val.features.dim() == 3 else "none"


def feature_inputs(split: Callable, model: nn.Module, data, precision: Precision, cfg, say: Callable) -> FitInputs:
    """split(model) -> (extract, head). The head trains in fp32 (it is tiny) on features of the
    frozen backbone: computed here, or the ones --probe_epochs already computed (data.features)."""
    _, head = split(model)
    started = time.perf_counter()
    if data.features is None:
        train, val = run_features(split, model, data, precision, cfg)
        when = describe_work(data.frozen, time.perf_counter() - started)
    else:
        train, val = data.features
        when = "reused from the probe" if data.val_set is not None else "reused from the run (train and val)"
    if cfg.compile:
        say("--compile: not applied, the feature cache trains only the head (one small layer)")
    images = len(train.labels) + (len(val.labels) if val is not None else 0)
    say(f"frozen features of {images} images {when}; epochs now train the head only")
    return FitInputs(head, train, val, Precision(precision.device), val_tta(val), len(data.class_names))


def probe_head(split: Callable, model: nn.Module, data, precision: Precision, cfg) -> str:
    """LP-FT's first half (Kumar et al., ICLR 2022): before fine-tuning, train the new head alone
    on features of the frozen pretrained backbone, computed once, for cfg.probe_epochs cheap
    passes, at cfg.probe_lr with the run's optimizer and schedule. A random head's large gradients in the
    first fine-tuning steps otherwise distort the pretrained features. What it did, in words."""
    _, head = split(model)
    started = time.perf_counter()
    train, val = run_features(split, model, data, precision, cfg)
    optimizer = build_optimizer(split_decay(head.named_parameters(), cfg.probe_lr, cfg.weight_decay), cfg.optimizer,
                                cfg.probe_lr, cfg.momentum)
    steps = cfg.probe_epochs * len(train)
    scheduler = build_scheduler(optimizer, cfg.scheduler, steps, round(cfg.warmup_epochs * len(train)))
    opt = Optimisation(optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                       Precision(precision.device).scaler())
    head_precision = Precision(precision.device)
    for epoch in range(1, cfg.probe_epochs + 1):
        train.generator.manual_seed(cfg.seed * 1_000_003 + epoch)
        stats = train_one_epoch(head, train, opt, head_precision, epoch, show_progress=False)
    scores = f"train_accuracy {stats.accuracy:.4f}"
    if val is not None:  # --refit's probe has no val
        result = evaluate(head, val, head_precision, len(data.class_names), desc="probe val", show_progress=False,
                          tta=val_tta(val))
        scores += f", val_accuracy {result.accuracy:.4f}"
    work = describe_work(data.frozen, 0) if data.frozen is not None else "features reused"
    return (f"probe: the head trained alone for {cfg.probe_epochs} epochs on frozen features of "
            f"{len(train.labels)} train images ({work}; {time.perf_counter() - started:.1f}s in all): {scores}")


def describe_work(frozen: FrozenFeatures, seconds: float) -> str:
    """What the backbone did for these features, in a few words."""
    parts = []
    if frozen.computed:
        parts.append(f"computed once ({frozen.computed} backbone passes)")
    if frozen.reused:
        parts.append(f"{frozen.reused} images' features read from {frozen.store.folder}")
    return ", ".join(parts or ["nothing computed"]) + (f" in {seconds:.1f}s" if seconds else "")

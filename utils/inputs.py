"""The run's data: the three splits (checked against a resumed run), and their loaders, cached
with augmentation on the device, or streaming (also the fallback when the cache cannot be used)."""

from __future__ import annotations

import copy
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data import AugmentSpec, NatureData, ensure_dataset
from data.dataset import first_readable, refuse_if_unreadable
from data.leaks import copies_in_test
from data.augment import BatchAugment
from data.cache import CacheUnavailable, build_or_load, default_cache_dir
from data.loaders import CachedBatches, make_loader

from .config import wants_download
from .errors import UsageError
from .features import train_and_val_features
from .recipe import Run
from .runtime import default_num_workers
from .runtime import Precision


@dataclass
class RunData:
    train_set: NatureData
    val_set: NatureData | None  # None in --refit's data (train and val together)
    test_set: NatureData
    loaders: tuple  # train, val, test
    num_workers: int
    # trainB's frozen-backbone features of the train and val images (FeatureBatches), once
    # computed for --probe_epochs: the feature cache reuses them instead of computing them again
    features: tuple | None = None
    frozen: object | None = None  # utils.features.FrozenFeatures: each split's features, once a run
    splits: dict | None = None  # NatureData.fingerprint() of train and val, kept in last.pt

    @property
    def class_names(self) -> list[str]:
        return self.train_set.classes


def load_data(run: Run) -> RunData:
    """The three splits (checked against a resumed run's classes) and their loaders."""
    cfg, recipe = run.cfg, run.recipe
    num_workers = default_num_workers(cfg.num_workers)
    if run.dist.enabled:
        num_workers = max(0, num_workers // run.dist.world)
    data_dir = ensure_dataset(cfg.data_dir, cfg.data_url, wants_download(cfg), cfg.keep_zip)  # locked: one downloads
    common = dict(image_size=cfg.image_size, val_fraction=cfg.val_fraction, seed=cfg.seed,
                  decode_size=recipe.sizes.decode)
    train_set = NatureData(data_dir, "train", recipe.train_transform, train_fraction=cfg.train_fraction,
                           plain_transform=recipe.eval_transform, **common)
    val_set = NatureData(data_dir, "val", recipe.eval_transform, **common)
    test_set = NatureData(data_dir, "test", recipe.eval_transform, **common)
    classes = train_set.classes
    if len(classes) < 2:
        raise UsageError(f"'{train_set.root}' holds one class ({classes[0]}); a classifier needs at least two "
                         "class folders")
    if run.checkpoint is not None and list(run.checkpoint["class_names"]) != classes:
        raise UsageError(f"the data's classes {classes} differ from those of the run being resumed "
                         f"{list(run.checkpoint['class_names'])}; point --data_dir at the data set it was trained on")
    splits = {"train": train_set.fingerprint(), "val": val_set.fingerprint()}
    warn_if_split_changed(run, splits)
    if len(val_set) == 0:
        raise UsageError("--val_fraction 0 leaves no validation images, which best.pt and early stopping need; "
                         "use --val_fraction 0.2")
    run.say(f"data: {len(train_set)} train, {len(val_set)} val, {len(test_set)} test images, "
            f"{len(classes)} classes from {train_set.root.parent}")
    leaks = run.dist.is_main and copies_in_test([s.path for s in train_set.samples + val_set.samples],
                                                [s.path for s in test_set.samples])
    if leaks:
        run.say(f"warning: {len(leaks)} test image(s) are byte-for-byte copies of training images (e.g. '{leaks[0][0]}' "
                f"= '{leaks[0][1]}'): the test accuracy counts them as unseen; remove them from one folder",
                file=sys.stderr)
    loaders = make_loaders(run, num_workers, train_set, val_set, test_set)
    return RunData(train_set, val_set, test_set, loaders, num_workers, splits=splits)


def warn_if_split_changed(run: Run, splits: dict) -> None:
    """A --resume whose train folder holds other images than when the run started: the train/val
    split is drawn again from them, so val may now hold images the run trained on. Said, not
    refused: adding photos to a run is a choice a user may make."""
    then = (run.checkpoint or {}).get("splits")
    if not then or then == splits:
        return
    counts = ", ".join(f"{name}: {then[name][0]} then, {splits[name][0]} now" for name in ("train", "val"))
    run.say(f"warning: the train folder's images are not those of the run being resumed ({counts}; files added, "
            "removed or replaced): the train/val split is drawn again, so val_accuracy may count images the run "
            "trained on; start a new run for clean numbers", file=sys.stderr)


def make_loaders(run: Run, num_workers: int, train_set, val_set, test_set) -> tuple:
    """Cached path: decode once, batches augmented on the device. Streaming: DataLoader workers,
    also the fallback (with a one-line warning) when the cache folder cannot be used."""
    cfg, device, dist = run.cfg, run.precision.device, run.dist
    if cfg.cache != "off":
        try:
            return cached_loaders(run, train_set, val_set, test_set)
        except CacheUnavailable as error:
            run.say(f"warning: {error}; decoding images every epoch instead (set --cache_dir to a writable folder "
                    "with space, or --cache off to silence this)", file=sys.stderr)
    for name, dataset in (("train", train_set), ("val", val_set), ("test", test_set)):
        refuse_if_unreadable(name, dataset.root, len(dataset), first_readable(dataset) is not None)
    return tuple(make_loader(ds, cfg.batch_size, ds is train_set, device, num_workers, cfg.seed, dist.rank, dist.world)
                 for ds in (train_set, val_set, test_set))


def cached_loaders(run: Run, train_set, val_set, test_set) -> tuple:
    return tuple(cached_loader(run, name, dataset, dataset is train_set)
                 for name, dataset in (("train", train_set), ("val", val_set), ("test", test_set)))


def cached_loader(run: Run, name: str, dataset, train: bool) -> CachedBatches:
    """A split from the decoded-image cache. Val, test and a train split that is not augmented are
    decoded at the eval resize (what plain_transform frames); an augmented train split at the
    larger train resize its random crops take from, with the eval-resize decode of the same files
    built when an unaugmented pass first asks for it (in_order: a probe's features)."""
    cfg, recipe, precision, sizes = run.cfg, run.recipe, run.precision, run.recipe.sizes
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    augments = train and cfg.data_aug and recipe.augment

    def decoded(resize: int, label: str):
        return build_or_load(dataset.samples, sizes.decode, resize, cfg.image_size, cache_dir, label)

    split = decoded(sizes.train_resize if augments else sizes.eval_resize, name)
    skipped = int((~split.valid).sum())
    refuse_if_unreadable(name, dataset.root, len(split.valid), len(split.valid) - skipped)
    if skipped:
        run.say(f"{name}: {skipped} unreadable image(s) skipped (named above when the cache was built)")
    plain_split = None
    if augments and sizes.train_resize != sizes.eval_resize:
        plain_split = functools.partial(decoded, sizes.eval_resize, f"{name} unaugmented")
    augment = BatchAugment(cfg.image_size, augments, recipe.mean, recipe.std, AugmentSpec.from_config(cfg),
                           precision.channels_last)
    return CachedBatches(split, cfg.batch_size, train, augment, precision.device, cfg.seed,
                         on_device=train and keep_on_device(cfg, precision, split), rank=run.dist.rank,
                         world=run.dist.world, plain_split=plain_split)


def train_and_val(run: Run, data: RunData) -> RunData:
    """--refit's data: the train and val images together as the training split, through the same
    path (cache or streaming) as the run's own; no val; the same test. Frozen-backbone features the
    run computed are reused (its train and val features together); a run whose epochs train on
    them (freeze_all) then reads no image at all."""
    both = copy.copy(data.train_set)
    both.samples = data.train_set.samples + data.val_set.samples
    features = None
    if data.features is not None:
        features = (train_and_val_features(data, run.cfg.batch_size, run.cfg.seed), None)
    if features is not None and run.on_features:
        train = features[0]
    elif isinstance(data.loaders[0], CachedBatches):
        train = cached_loader(run, "train", both, True)
    else:
        train = make_loader(both, run.cfg.batch_size, True, run.precision.device, data.num_workers, run.cfg.seed,
                            run.dist.rank, run.dist.world)
    return RunData(both, None, data.test_set, (train, None, data.loaders[2]), data.num_workers, features=features)


def keep_on_device(cfg, precision: Precision, split) -> bool:
    if cfg.data_on_device != "auto":
        return cfg.data_on_device == "true"
    if precision.device.type != "cuda":
        return False  # on the CPU the memory map already is host memory
    free, _ = torch.cuda.mem_get_info(precision.device)
    return split.images.nbytes < 0.4 * free

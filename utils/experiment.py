"""The wiring both scripts share: data loaders, run directory, fit(), the final test and
--test_only. A script supplies only how to build its model and its parameter groups."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from data import IMAGENET_MEAN, IMAGENET_STD, NatureData, collate_skipping_unreadable, ensure_dataset
from data.sampler import ShardedBatchSampler
from data.cache import build_or_load, default_cache_dir
from data.device_aug import BatchAugment, CachedBatches

from .checkpoint import load_checkpoint
from .config import wants_download
from .errors import UsageError
from .optim import build_optimizer, build_scheduler
from .runtime import autocast_dtype, default_num_workers, resolve_device, seed_everything, use_channels_last
from . import distributed
from .distributed import DistInfo
from .tracking import Tracker
from .train import NonFiniteLoss, Precision, TrainingInterrupted, evaluate, fit, restore_training_state

EXIT_OK, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass
class ModelRecipe:
    """What a script contributes: everything else is shared."""
    script: str  # "trainA" / "trainB": recorded in checkpoints, checked when loading them
    build_model: Callable[[int], nn.Module]  # num_classes -> model (weights loaded)
    param_groups: Callable[[nn.Module], list[dict]]  # model -> optimizer groups (each with its lr)
    train_transform: Callable
    eval_transform: Callable
    resize_size: int  # the eval transform's Resize (shorter side), the decoded cache's square side
    augment: bool = True  # train-time augmentation (with --data_aug); off where features are cached
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    before_epoch: Callable[[nn.Module, torch.optim.Optimizer, int], None] | None = None
    # With a frozen backbone: model -> (features(images), head). fit() then trains only the
    # head on features computed once; checkpoints still hold the whole model.
    feature_cache: Callable[[nn.Module], tuple[Callable, nn.Module]] | None = None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def create_run_dir(output_dir: str, name: str) -> Path:
    """A fresh folder output_dir/name (name-2, name-3, ... if taken); fails early if unwritable."""
    root = Path(output_dir).expanduser()
    safe = re.sub(r"[^A-Za-z0-9._,+=-]+", "_", name).strip("._") or "run"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 10_000):
            run_dir = root / (safe if attempt == 1 else f"{safe}-{attempt}")
            try:
                run_dir.mkdir()
            except FileExistsError:
                continue
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
            return run_dir
    except OSError as error:
        raise UsageError(f"cannot write to --output_dir '{root}' ({error.strerror}); choose a writable folder") from None
    raise UsageError(f"--output_dir '{root}' already holds 10,000 runs named {safe}; pass --run_name")


def make_loader(dataset, batch_size: int, train: bool, device: torch.device, num_workers: int, seed: int,
                dist_info: DistInfo = DistInfo()) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = ShardedBatchSampler(len(dataset), batch_size, train, generator, dist_info.rank, dist_info.world)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_skipping_unreadable,
        generator=generator,  # seeds the workers; fit() re-seeds it every epoch
        prefetch_factor=4 if num_workers > 0 else None,
    )


def make_loaders(cfg, recipe: ModelRecipe, precision: Precision, num_workers: int, train_set, val_set, test_set,
                 dist_info: DistInfo = DistInfo()):
    """Cached path: decode once, batches augmented on the device. Streaming: DataLoader workers."""
    if cfg.cache == "off":
        return tuple(make_loader(ds, cfg.batch_size, ds is train_set, precision.device, num_workers, cfg.seed, dist_info)
                     for ds in (train_set, val_set, test_set))
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    loaders = []
    for name, dataset in (("train", train_set), ("val", val_set), ("test", test_set)):
        split = build_or_load(dataset.samples, dataset.decode_size or recipe.resize_size, recipe.resize_size,
                              cfg.image_size, cache_dir, name)
        skipped = int((~split.valid).sum())
        if skipped:
            print(f"{name}: {skipped} unreadable image(s) skipped (named above when the cache was built)")
        train = dataset is train_set
        augment = BatchAugment(cfg.image_size, train and cfg.data_aug and recipe.augment, recipe.mean, recipe.std)
        loaders.append(CachedBatches(split, cfg.batch_size, train, augment, precision.device, cfg.seed,
                                     on_device=train and keep_on_device(cfg, precision, split),
                                     rank=dist_info.rank, world=dist_info.world))
    return tuple(loaders)


def keep_on_device(cfg, precision: Precision, split) -> bool:
    if cfg.data_on_device != "auto":
        return cfg.data_on_device == "true"
    if precision.device.type != "cuda":
        return False  # on the CPU the memory map already is host memory
    free, _ = torch.cuda.mem_get_info(precision.device)
    return split.images.nbytes < 0.4 * free


@torch.no_grad()
def compute_features(extract: Callable, loader, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every image of loader through extract once: (features as fp32, labels), on the device."""
    features, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images, targets = precision.to_device(*batch)
        with precision.autocast():
            features.append(extract(images).float())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


class FeatureBatches:
    """Shuffled batches of precomputed features; same per-epoch seeding contract as the loaders."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool, seed: int):
        self.features, self.labels = features, labels
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = ShardedBatchSampler(len(labels), batch_size, train, self.generator)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for positions in self.sampler:
            index = torch.tensor(positions, device=self.labels.device)
            yield self.features[index], self.labels[index]


def make_precision(cfg, device_name: str) -> Precision:
    """Device, autocast dtype and memory format for a config's --amp/--channels_last."""
    device = resolve_device(device_name)
    return Precision(device, autocast_dtype(device, cfg.amp), use_channels_last(device, cfg.channels_last))


def prepare_model(model: nn.Module, precision: Precision) -> nn.Module:
    model = model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def report_test(stats, class_names: list[str], header: str) -> dict:
    """Print test metrics and per-class accuracy; return them as a flat dict."""
    per_class = dict(zip(class_names, stats.per_class_accuracy()))
    print(f"{header}: test_loss {stats.loss:.4f}  test_accuracy {stats.accuracy:.4f}  ({stats.images} images)")
    width = max(len(n) for n in class_names)
    for name, accuracy in per_class.items():
        print(f"  {name:<{width}}  {accuracy:.4f}")
    return {"test_loss": stats.loss, "test_accuracy": stats.accuracy, "test_images": stats.images,
            "test_per_class_accuracy": per_class}


def train_and_test(cfg, recipe: ModelRecipe, run_name: str, summary_text: Callable[[nn.Module], str] | None = None,
                   resume: str = "", after_test: Callable | None = None) -> int:
    """Train with fit(), then evaluate best.pt on the test folder. Returns the exit code.

    Under torchrun every rank runs this; rank 0 alone prints, logs and writes files.
    """
    dist_info, device_name = distributed.setup(cfg.device)
    try:
        return _train_and_test(cfg, recipe, run_name, summary_text, resume, after_test, dist_info, device_name)
    finally:
        distributed.teardown()


def _train_and_test(cfg, recipe, run_name, summary_text, resume, after_test, dist_info: DistInfo,
                    device_name: str) -> int:
    main = dist_info.is_main
    say = print if main else (lambda *args, **kwargs: None)
    distributed.check_batch_size(cfg.batch_size, dist_info.world)
    precision = make_precision(cfg, device_name)
    seed_everything(cfg.seed)
    checkpoint = load_checkpoint(resume) if resume else None
    if checkpoint is not None:
        check_script(checkpoint, recipe.script, resume)
    num_workers = default_num_workers(cfg.num_workers)
    if dist_info.enabled:
        num_workers = max(0, num_workers // dist_info.world)

    data_dir = ensure_dataset(cfg.data_dir, cfg.data_url, wants_download(cfg), cfg.keep_zip)  # locked: one downloads
    common = dict(image_size=cfg.image_size, val_fraction=cfg.val_fraction, seed=cfg.seed)
    train_set = NatureData(data_dir, "train", recipe.train_transform, **common)
    val_set = NatureData(data_dir, "val", recipe.eval_transform, **common)
    test_set = NatureData(data_dir, "test", recipe.eval_transform, **common)
    class_names = train_set.classes
    if len(val_set) == 0:
        raise UsageError("--val_fraction 0 leaves no validation images, which best.pt and early stopping need; "
                         "use --val_fraction 0.2")
    say(f"data: {len(train_set)} train, {len(val_set)} val, {len(test_set)} test images, "
        f"{len(class_names)} classes from {train_set.root.parent}")
    train_loader, val_loader, test_loader = make_loaders(cfg, recipe, precision, num_workers,
                                                         train_set, val_set, test_set, dist_info)

    # Build (and download) the model before creating the run directory, so a failure leaves nothing.
    model = prepare_model(recipe.build_model(len(class_names)), precision)
    run_dir = None
    if main:
        run_dir = Path(resume).resolve().parent if checkpoint is not None else create_run_dir(cfg.output_dir, run_name)
    if dist_info.enabled:
        run_dir = distributed.broadcast_object(run_dir)
    if summary_text is not None and main:
        (run_dir / "model_summary.txt").write_text(summary_text(model) + "\n")
    optimizer = build_optimizer(recipe.param_groups(model), cfg.optimizer, cfg.lr, cfg.momentum)
    steps_per_epoch = len(train_loader)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs * steps_per_epoch,
                                round(cfg.warmup_epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.autocast_dtype == torch.float16)
    state = None
    if checkpoint is not None:
        state = restore_training_state(checkpoint, model, optimizer, scheduler, scaler)
        say(f"resuming {run_dir} after epoch {state.epoch} (best val_accuracy {state.best_val_accuracy:.4f})")
    trained = wrap_ddp(model, cfg, recipe, dist_info, precision) if dist_info.enabled else model
    if cfg.compile:
        # Checkpoints keep saving `model`, whose state_dict keys the compiled wrapper would prefix.
        trained = torch.compile(trained)

    config = asdict(cfg)
    if main:
        write_json(run_dir / "config.json", dict(config, script=recipe.script, class_names=class_names))
    tracker = Tracker(run_dir, config, cfg.wandb_mode, cfg.wandb_project, cfg.wandb_entity, run_name,
                      resume_id=checkpoint.get("wandb_run_id", "") if checkpoint else "",
                      keep_through_epoch=state.epoch if state else None, is_main=main)
    meta = {"script": recipe.script, "config": config, "class_names": class_names,
            "wandb_run_id": tracker.run_id, "format": 1}
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[precision.autocast_dtype]
    say(f"run directory: {run_dir}\ndevice: {precision.device} ({amp_name}"
        f"{', channels_last' if precision.channels_last else ''}), "
        f"{'decoded-image cache' if cfg.cache != 'off' else f'{num_workers} data workers'}"
        f"{f', {dist_info.world} processes' if dist_info.enabled else ''}")

    fit_train, fit_val, fit_precision = train_loader, val_loader, precision
    if recipe.feature_cache is not None and not dist_info.enabled:
        extract, trained = recipe.feature_cache(model)
        started = time.perf_counter()
        fit_train = FeatureBatches(*compute_features(extract, train_loader, precision), cfg.batch_size, True, cfg.seed)
        fit_val = FeatureBatches(*compute_features(extract, val_loader, precision), cfg.batch_size, False, cfg.seed)
        # Features are computed in the autocast dtype already; the head runs in fp32 (it is tiny).
        fit_precision = Precision(precision.device)
        say(f"frozen features of {len(fit_train.labels) + len(fit_val.labels)} images computed once in "
            f"{time.perf_counter() - started:.1f}s; epochs now train the head only")
    reduce = distributed.all_reduce_sum if dist_info.enabled else None
    try:
        state = fit(
            trained, optimizer, scheduler, fit_train, fit_val, epochs=cfg.epochs, precision=fit_precision,
            loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), num_classes=len(class_names),
            run_dir=run_dir, checkpoint_meta=meta, log_epoch=tracker.log_epoch, patience=cfg.patience,
            seed=cfg.seed, state=state, scaler=scaler,
            before_epoch=(lambda epoch: recipe.before_epoch(model, optimizer, epoch)) if recipe.before_epoch else None,
            unwrap=lambda _: model,  # checkpoints hold the whole, unwrapped model
            is_main=main, reduce=reduce, barrier=distributed.barrier if dist_info.enabled else None,
        )
    except NonFiniteLoss as error:
        best = run_dir / "best.pt"
        kept = f"best.pt (epoch {state.best_epoch if state else '?'}) is kept" if best.exists() else "no epoch finished, so there is no best.pt"
        if main:
            print(f"{recipe.script}.py: error: {error}; training stopped, {kept} in {run_dir}; "
                  "lower --lr or use --amp off", file=sys.stderr)
        tracker.log_summary({"diverged": True})
        tracker.finish(exit_code=EXIT_DIVERGED)
        return EXIT_DIVERGED
    except TrainingInterrupted as interrupt:
        if main:
            print(f"\n{interrupt}; continue with: python {recipe.script}.py --resume {interrupt.checkpoint}",
                  file=sys.stderr)
        tracker.finish(exit_code=EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED

    best = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best["model"])
    test = evaluate(model, test_loader, precision, len(class_names), desc="test", keep_predictions=True,
                    show_progress=main, reduce=reduce)
    if not main:
        return EXIT_OK
    results = report_test(test, class_names, f"best.pt (epoch {state.best_epoch}, val_accuracy "
                                               f"{state.best_val_accuracy:.4f})")
    results.update(best_epoch=state.best_epoch, best_val_accuracy=state.best_val_accuracy)
    write_json(run_dir / "test_metrics.json", results)
    tracker.log_summary({k: v for k, v in results.items() if not isinstance(v, dict)})
    tracker.log_summary({f"test_accuracy/{k}": v for k, v in results["test_per_class_accuracy"].items()})
    if after_test is not None and not dist_info.enabled:
        after_test(model=model, precision=precision, test_set=test_set, test_stats=test, run_dir=run_dir,
                   tracker=tracker, class_names=class_names)
    tracker.finish()
    print(f"saved {run_dir}/best.pt, last.pt, metrics.csv, config.json, test_metrics.json")
    return EXIT_OK


def wrap_ddp(model: nn.Module, cfg, recipe: ModelRecipe, dist_info: DistInfo, precision: Precision) -> nn.Module:
    """DistributedDataParallel around model (optionally with synchronised BatchNorm)."""
    from torch.nn.parallel import DistributedDataParallel

    if getattr(cfg, "sync_bn", False):
        if precision.device.type != "cuda":
            raise UsageError("--sync_bn works only on CUDA GPUs (PyTorch's SyncBatchNorm); drop it on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    # A strategy that unfreezes later (gradual) needs DDP to know those parameters from the
    # start; it then skips them while they get no gradient.
    unfreezes_later = bool(frozen) and recipe.before_epoch is not None
    if unfreezes_later:
        for p in frozen:
            p.requires_grad_(True)
    wrapped = DistributedDataParallel(
        model, device_ids=[precision.device.index] if precision.device.type == "cuda" else None,
        find_unused_parameters=unfreezes_later)
    for p in frozen:
        p.requires_grad_(False)
    return wrapped


# What --resume lets a user change; everything else comes from the run's own checkpoint.
RESUME_OVERRIDES = frozenset({"data_dir", "device", "num_workers", "wandb_mode", "epochs"})


def explicit_flags(args, parser) -> set[str]:
    """Flags the user gave a value other than the default."""
    return {name for name, value in vars(args).items() if value != parser.get_default(name)}


def run_checkpoint_action(args, parser, script: str, rebuild: Callable) -> int | None:
    """--predict / --test_only, which need only a checkpoint; None when neither was asked for."""
    from .predict import predict

    if args.predict:
        return predict(args.predict, args.checkpoint, script, rebuild, args.device, prog=f"{script}.py")
    if args.test_only:
        given = explicit_flags(args, parser)
        return test_only(args.checkpoint, script, rebuild, data_dir=args.data_dir if "data_dir" in given else None,
                         device=args.device, batch_size=args.batch_size if "batch_size" in given else None,
                         num_workers=args.num_workers)
    return None


def config_for_run(args, parser, from_args: Callable, from_checkpoint: Callable):
    """The run's config: from the flags, or with --resume from the checkpoint plus the few
    flags RESUME_OVERRIDES allows to change."""
    if not args.resume:
        return from_args(args)
    saved = from_checkpoint(load_checkpoint(args.resume))
    return dataclasses.replace(saved, **{name: getattr(args, name) for name in explicit_flags(args, parser)
                                         & RESUME_OVERRIDES})


def pictures_maker(cfg, guided: bool) -> Callable:
    """The after_test hook that draws every picture of a finished run."""
    def make(model, precision, test_set, test_stats, run_dir, tracker, class_names):
        from .pictures import make_all

        paths = make_all(model, precision, test_set, test_stats, run_dir, tracker, class_names, cfg.seed, guided=guided)
        print("pictures: " + ", ".join(p.name for p in paths.values()))
    return make


def check_script(checkpoint: dict, script: str, path: str) -> None:
    if checkpoint.get("script") != script:
        raise UsageError(f"checkpoint '{path}' was written by {checkpoint.get('script')}.py; "
                         f"use it with that script, not {script}.py")


def test_only(checkpoint_path: str, script: str, rebuild: Callable[[dict], tuple[object, nn.Module, Callable]],
              data_dir: str | None, device: str, batch_size: int | None, num_workers: int) -> int:
    """Evaluate a checkpoint on the test folder using only what the checkpoint carries.

    rebuild(checkpoint) -> (config, model with weights, eval transform).
    """
    if not checkpoint_path:
        raise UsageError("--test_only needs --checkpoint PATH (a best.pt or last.pt)")
    checkpoint = load_checkpoint(checkpoint_path)
    check_script(checkpoint, script, checkpoint_path)
    cfg, model, eval_transform = rebuild(checkpoint)
    precision = make_precision(cfg, device)
    test_set = NatureData(ensure_dataset(data_dir or cfg.data_dir, download=False), "test", eval_transform,
                          image_size=cfg.image_size)
    if test_set.classes != list(checkpoint["class_names"]):
        raise UsageError(f"the test folder's classes {test_set.classes} differ from the checkpoint's "
                         f"{checkpoint['class_names']}; point --data_dir at the data set it was trained on")
    loader = make_loader(test_set, batch_size or cfg.batch_size, False, precision.device,
                         default_num_workers(num_workers), 0)
    model = prepare_model(model, precision)
    started = time.perf_counter()
    stats = evaluate(model, loader, precision, len(test_set.classes), desc="test")
    report_test(stats, test_set.classes, f"{checkpoint_path} (epoch {checkpoint.get('epoch')})")
    print(f"evaluated in {time.perf_counter() - started:.1f}s")
    return EXIT_OK

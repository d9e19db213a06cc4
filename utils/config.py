"""The settings both scripts share, as one frozen dataclass, and the flags that set them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from data.transforms import AUTO_AUGMENTS, AugmentSpec

from .cli import add_bool, choice, number, str2bool

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "onecycle", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
AMP_MODES = ("auto", "bf16", "fp16", "off")
TTA_MODES = ("none", "flip")


@dataclass(frozen=True)
class TrainConfig:
    # data
    data_dir: str = "nature_12K"
    data_url: str = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
    download: str = "auto"  # auto: when data_dir is the default or --data_url is given
    keep_zip: bool = False
    val_fraction: float = 0.2  # of train/, stratified by class
    image_size: int = 224  # pixels, square crop fed to the model
    data_aug: bool = True
    # augmentation strength: data.AugmentSpec holds the one set of defaults
    crop_scale: float = AugmentSpec.crop_scale  # smallest area share a random resized crop keeps
    jitter: float = AugmentSpec.jitter  # brightness/contrast/saturation in [1 - jitter, 1 + jitter]
    erasing: float = AugmentSpec.erasing  # probability of erasing one random box per image
    auto_augment: str = AugmentSpec.auto_augment  # none, trivialwide, randaugment (torchvision's policies)
    mixup_alpha: float = 0.0  # 0 = off
    cutmix_alpha: float = 0.0  # 0 = off; with both > 0, one of the two per batch
    train_fraction: float = 1.0  # stratified, seeded share of the training split to use
    refit: bool = False  # after training: a fresh model on train + val for best.pt's epochs, tested too
    tta: str = "flip"  # test-time augmentation for val, test and --predict: none, flip
    # optimisation
    epochs: int = 30
    batch_size: int = 64  # global batch (all processes together)
    lr: float = 2e-3  # peak learning rate, reached after warmup
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD only
    scheduler: str = "onecycle"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    patience: int = 10  # epochs without a better val_accuracy before stopping; 0 = never
    seed: int = 0
    ema_decay: float = 0.0  # exponential moving average of the weights; 0 = off
    # speed
    cache: str = "auto"  # decode every image once into a uint8 array on disk; off = decode per epoch
    cache_dir: str = ""  # default: ~/.cache/inat12k/decoded (or $XDG_CACHE_HOME)
    data_on_device: str = "auto"  # keep the decoded train set in GPU memory when it fits
    compile: bool = False  # torch.compile the model (slow first steps, faster later ones)
    # hardware
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    num_workers: int = -1  # -1: one per core, up to 8
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch
    # output and tracking
    output_dir: str = "runs"
    run_name: str = ""
    wandb_mode: str = "auto"
    wandb_project: str = "inat12k"
    wandb_entity: str = ""
    pictures: bool = True


# What a checkpoint written before these flags existed was trained and evaluated with: its
# --test_only, --predict and --resume keep doing exactly that, not today's defaults.
LEGACY_VALUES = {"crop_scale": 0.35, "jitter": 0.2, "erasing": 0.1, "tta": "none", "crop_pct": 0.875,
                 "global_pool": "none", "whiten": "off", "probe_epochs": 0, "freeze_bn": False, "norm": "auto",
                 "refit": False}


def config_from_dict(config_cls, values: dict):
    """A config from a checkpoint's saved dict; keys this version does not know are dropped, and
    settings added since the checkpoint was written take the value that run had in effect."""
    known = {f.name for f in fields(config_cls)}
    return config_cls(**{**{k: v for k, v in LEGACY_VALUES.items() if k in known},
                         **{key: value for key, value in values.items() if key in known}})


def wants_download(cfg: TrainConfig) -> bool:
    if cfg.download != "auto":
        return cfg.download == "true"
    return cfg.data_dir == TrainConfig.data_dir or cfg.data_url != TrainConfig.data_url


def add_train_args(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Flags for every TrainConfig field, with defaults taken from `defaults`, in help groups."""
    _data_args(parser.add_argument_group("data"), defaults)
    _optimisation_args(parser.add_argument_group("optimisation"), defaults)
    _speed_args(parser.add_argument_group("speed"), defaults)
    _hardware_args(parser.add_argument_group("hardware"), defaults)
    _output_args(parser.add_argument_group("output and tracking"), defaults)


def _data_args(group, d: TrainConfig) -> None:
    group.add_argument("-p", "--data_dir", "--parent_dir", "--data-dir", dest="data_dir", default=d.data_dir,
                       metavar="DIR", help="unzipped nature_12K folder (holding inaturalist_12K/), a folder with train/ and val/ or "
                       f"test/, or the .zip itself (default: {d.data_dir}, downloaded there if missing)")
    group.add_argument("--download", type=choice("auto", "true", "false"), default=d.download,
                       help="fetch and unzip the data set if --data_dir does not hold it; auto = only for the default "
                       "--data_dir or when --data_url is given (default: auto)")
    group.add_argument("--data_url", "--data-url", default=d.data_url, help=f"where to download from (default: {d.data_url})")
    add_bool(group, "--keep_zip", "--keep-zip", default=d.keep_zip, help="keep the downloaded zip after unpacking")
    group.add_argument("--val_fraction", "--val-fraction", type=number(float, 0, 1, high_open=True),
                       default=d.val_fraction, help=f"share of train/ held out for validation, stratified (default: {d.val_fraction})")
    group.add_argument("-is", "--image_size", "--image-size", type=number(int, 1), default=d.image_size,
                       help=f"square input size in pixels (default: {d.image_size})")
    add_bool(group, "-da", "--data_aug", "--data-aug", default=d.data_aug,
             help="random resized crop, flip, colour jitter, erasing on train images")
    group.add_argument("--crop_scale", "--crop-scale", type=number(float, 0, 1, low_open=True), default=d.crop_scale,
                       help=f"smallest share of the image area a random resized crop keeps; 1 = whole image "
                       f"(default: {d.crop_scale})")
    group.add_argument("--jitter", type=number(float, 0, 1, high_open=True), default=d.jitter,
                       help=f"colour jitter: brightness, contrast and saturation in [1-J, 1+J]; 0 = off (default: {d.jitter})")
    group.add_argument("--erasing", type=number(float, 0, 1), default=d.erasing,
                       help=f"probability of erasing a random box of each train image; 0 = off (default: {d.erasing})")
    group.add_argument("--auto_augment", "--auto-augment", type=choice(*AUTO_AUGMENTS), default=d.auto_augment,
                       help=f"torchvision auto-augment policy per train image: {', '.join(AUTO_AUGMENTS)} "
                       f"(default: {d.auto_augment})")
    group.add_argument("--mixup_alpha", "--mixup-alpha", type=number(float, 0, 100), default=d.mixup_alpha,
                       help=f"MixUp Beta(alpha, alpha) on train batches; 0 = off (default: {d.mixup_alpha})")
    group.add_argument("--cutmix_alpha", "--cutmix-alpha", type=number(float, 0, 100), default=d.cutmix_alpha,
                       help=f"CutMix Beta(alpha, alpha) on train batches; 0 = off; with --mixup_alpha too, one of "
                       f"the two per batch (default: {d.cutmix_alpha})")
    group.add_argument("--train_fraction", "--train-fraction", type=number(float, 0, 1, low_open=True),
                       default=d.train_fraction, help="use this share of the training split (stratified, seeded) "
                       f"for quick searches; val and test are never subsampled (default: {d.train_fraction})")
    add_bool(group, "--refit", default=d.refit,
             help="after training, train a fresh model the same way on the train and val images together for "
             "best.pt's number of epochs (the schedule unchanged), save it as refit.pt and report its test as "
             "test_accuracy (best.pt's test is reported too)")
    group.add_argument("--tta", type=choice(*TTA_MODES), default=d.tta,
                       help=f"test-time augmentation for validation, test and --predict: none, or flip = average "
                       f"the logits of the image and its mirror; with --test_only, instead of the run's own "
                       f"(default: {d.tta})")


def _optimisation_args(group, d: TrainConfig) -> None:
    group.add_argument("-e", "--epochs", type=number(int, 1), default=d.epochs, help=f"(default: {d.epochs})")
    group.add_argument("-b", "--batch_size", "--batch-size", type=number(int, 1), default=d.batch_size,
                       help=f"global batch size (default: {d.batch_size})")
    group.add_argument("-lr", "--lr", "--learning_rate", type=number(float, 0, low_open=True), default=d.lr,
                       help=f"peak learning rate (default: {d.lr})")
    group.add_argument("-o", "--optimizer", type=choice(*OPTIMIZERS), default=d.optimizer,
                       help=f"{', '.join(OPTIMIZERS)} (default: {d.optimizer})")
    group.add_argument("-w_d", "--weight_decay", "--weight-decay", type=number(float, 0), default=d.weight_decay,
                       help=f"decoupled for adamw, L2 for adam/sgd; not applied to biases and norms (default: {d.weight_decay})")
    group.add_argument("-m", "--momentum", type=number(float, 0, 1, high_open=True), default=d.momentum,
                       help=f"SGD momentum (default: {d.momentum})")
    group.add_argument("--scheduler", type=choice(*SCHEDULERS), default=d.scheduler,
                       help=f"per-step schedule after linear warmup: {', '.join(SCHEDULERS)} (default: {d.scheduler})")
    group.add_argument("--warmup_epochs", "--warmup-epochs", type=number(float, 0), default=d.warmup_epochs,
                       help=f"linear warmup length, fractions allowed (default: {d.warmup_epochs})")
    group.add_argument("-ls", "--label_smoothing", "--label-smoothing", type=number(float, 0, 1, high_open=True),
                       default=d.label_smoothing, help=f"(default: {d.label_smoothing})")
    group.add_argument("--patience", type=number(int, 0), default=d.patience,
                       help=f"stop after this many epochs without a better val_accuracy; 0 = never (default: {d.patience})")
    group.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=d.seed, help=f"split, init and augmentation seed (default: {d.seed})")
    group.add_argument("--ema_decay", "--ema-decay", type=number(float, 0, 1, high_open=True), default=d.ema_decay,
                       help="keep an exponential moving average of the weights (e.g. 0.999) and validate, test and "
                       f"save best.pt with it; 0 = off (default: {d.ema_decay})")


def _speed_args(group, d: TrainConfig) -> None:
    group.add_argument("--cache", type=choice("auto", "off"), default=d.cache,
                       help="auto: decode every image once into a uint8 array shared by later runs and augment whole "
                       "batches on the device; off: decode and augment per image in DataLoader workers (default: auto)")
    group.add_argument("--cache_dir", "--cache-dir", default=d.cache_dir,
                       help="where decoded arrays live (default: ~/.cache/inat12k/decoded)")
    group.add_argument("--data_on_device", "--data-on-device", type=choice("auto", "true", "false"),
                       default=d.data_on_device,
                       help="keep decoded images in GPU memory: auto = when they take < 40%% of free GPU memory (default: auto)")

    add_bool(group, "--compile", default=d.compile,
             help="torch.compile the model: compiling costs the first steps, later ones may run faster")


def _hardware_args(group, d: TrainConfig) -> None:
    group.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    group.add_argument("--amp", type=choice(*AMP_MODES), default=d.amp,
                       help="mixed precision: auto = bf16 on GPUs that have it else fp16; on CPUs with bf16 units "
                       "(AVX512-BF16/AMX) bf16, else fp32 (default: auto)")
    group.add_argument("--channels_last", "--channels-last", type=choice("auto", "true", "false"), default=d.channels_last,
                       help="channels-last memory format: auto = on for CUDA and every CPU (default: auto)")
    group.add_argument("--num_workers", "--num-workers", type=number(int, -1), default=d.num_workers,
                       help="data loading processes for --cache off; -1 = one per core, up to 8 (default: -1)")
    add_bool(group, "--sync_bn", "--sync-bn", default=d.sync_bn,
             help="under torchrun, compute BatchNorm statistics over the global batch instead of each process's share")


def _output_args(group, d: TrainConfig) -> None:
    group.add_argument("--output_dir", "--output-dir", default=d.output_dir,
                       help=f"run directories are created under it (default: {d.output_dir})")
    group.add_argument("--run_name", "--run-name", default=d.run_name,
                       help="wandb run and run directory name (default: built from the hyperparameters)")
    group.add_argument("--wandb_mode", "--wandb-mode", type=choice(*WANDB_MODES), default=d.wandb_mode,
                       help="auto = online when logged in, else offline (default: auto)")
    group.add_argument("-wp", "--wandb_project", "--wandb-project", default=d.wandb_project,
                       help=f"(default: {d.wandb_project})")
    group.add_argument("-we", "--wandb_entity", "--wandb-entity", default=d.wandb_entity,
                       help="wandb user or team (default: your default entity)")
    add_bool(group, "--pictures", default=d.pictures, help="make the prediction grid and other pictures at the end")
    group.add_argument("--no_pictures", "--no-pictures", dest="pictures", action="store_false",
                       help="same as --pictures false")


def add_action_args(parser: argparse.ArgumentParser) -> None:
    """What to do instead of a plain training run."""
    group = parser.add_argument_group("actions")
    group.add_argument("--dry_run", "--dry-run", type=str2bool,
                       nargs="?", const=True, default=False, metavar="BOOL",
                       help="check the flags, build the model, print its summary and exit without touching data")
    group.add_argument("--resume", metavar="CKPT", default="", help="continue the run that wrote this last.pt")
    add_bool(group, "--test_only", "--test-only", default=False,
             help="evaluate --checkpoint on the test folder and exit")
    group.add_argument("--checkpoint", metavar="CKPT", default="", help="checkpoint for --test_only / --predict / --export")
    add_bool(group, "--export", default=False,
             help="write --checkpoint as a file plain PyTorch loads without this repository (<name>.pt2: "
             "torch.export.load(path).module()), with its class names and preprocessing in <name>.json, and exit")
    add_bool(group, "--lr_find", "--lr-find", default=False,
             help="find a learning rate instead of training: ramp it up over at most one epoch, print a suggested "
             "--lr, save lr_find.png and lr_find.csv in a run directory")
    group.add_argument("--lr_find_steps", "--lr-find-steps", type=number(int, 5, 100_000), default=100,
                       help="training steps the --lr_find ramp takes, at most one epoch (default: 100)")
    group.add_argument("--predict", nargs="+", metavar="IMG", default=None,
                       help="print the top-3 classes of these images (files or folders) with --checkpoint, and exit")

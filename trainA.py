#!/usr/bin/env python
"""Part A: train a small CNN (five conv-activation-maxpool blocks, a dense layer, N-way output)
from scratch on iNaturalist-12K, validate on 20 % of train/, test the best checkpoint on val/.

    python trainA.py -e 10 -nf 64 -fo same -fs 5,5,3,3,3 -a GELU -bn true -d 0.3
    python trainA.py --test_only --checkpoint runs/<run>/best.pt
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Sequence

from data import AugmentSpec, Sizes, plain_transform, sample_images, sizes_for, train_transform
from models import (ACTIVATION_NAMES, GLOBAL_POOLS, WHITEN_MODES, build_cnn, canonical_activation, filter_counts,
                    first_conv, min_image_size, summarize, whiten_first_conv_)
from utils.cli import OneLineParser, add_bool, choice, filter_org, int_or_list, number, run_cli
from utils.cli import config_from_args as _config_from_args
from utils.config import TrainConfig, add_action_args, add_train_args, config_from_dict
from utils.checkpoint import inference_weights
from utils.errors import UsageError
from utils.actions import ScriptSpec, checkpoint_action, config_for_run, pictures_maker
from utils.run import ModelRecipe, train_and_test
from utils.optim import split_decay


# Chosen by val_accuracy on imagenette (docs/accuracy.md, "Evaluation crop"); checkpoints from
# before the flag keep 0.875 (utils.config.LEGACY_VALUES).
CROP_PCT = 0.95
# Train images whose patches --whiten's filters are computed from (a 27 x 27 covariance for 3x3
# kernels: 256 images at 64 px already give a million patches).
WHITEN_IMAGES = 256


@dataclass(frozen=True)
class ConfigA(TrainConfig):
    num_blocks: int = 5
    num_filters: int | tuple[int, ...] = 32  # first block, grown by filter_org; or one per block
    filter_org: str | float = "double"  # same, double, half, or a growth factor per block
    filter_size: int | tuple[int, ...] = 3  # one kernel size, or one per block
    activation: str = "SiLU"
    batch_norm: bool = True
    dropout: float = 0.2  # before the output layer
    conv_dropout: float = 0.0  # channel dropout after each block
    dense_neurons: int = 256
    convs_per_block: int = 1  # the assignment's one conv per block; 2+ = VGG-style deeper blocks
    global_pool: str = "avg"  # avg: average each channel over the last map; none: flatten it (the assignment's)
    whiten: str = "frozen"  # first conv: off (random init), init (whitening filters, trained), frozen (kept)
    crop_pct: float = CROP_PCT  # evaluation: the center crop keeps this share of the shorter side
    wandb_project: str = "inat12k-partA"


def get_args_parser() -> OneLineParser:
    d = ConfigA()
    parser = OneLineParser(prog="trainA.py", description="Train a 5-block CNN from scratch on iNaturalist-12K.",
                           allow_abbrev=False)
    group = parser.add_argument_group("model")
    group.add_argument("-nf", "--num_filters", "--num-filters", type=int_or_list, default=d.num_filters,
                       help="filters in the first block (grown by --filter_org), or one per block like 32,64,64,128,128 "
                       f"(default: {d.num_filters})")
    group.add_argument("-fo", "--filter_org", "--filter-org", type=filter_org, default=d.filter_org,
                       help=f"filter growth per block: same, double, half or a factor like 1.5 (default: {d.filter_org})")
    group.add_argument("-fs", "--filter_size", "--filter-size", type=int_or_list, default=d.filter_size,
                       help=f"kernel size, one for all blocks or one per block like 5,5,3,3,3 (default: {d.filter_size})")
    group.add_argument("-a", "--activation", type=choice(*ACTIVATION_NAMES), default=d.activation,
                       help=f"{', '.join(ACTIVATION_NAMES)}, any case (default: {d.activation})")
    add_bool(group, "-bn", "--batch_norm", "--batch-norm", default=d.batch_norm, help="batch norm after each conv")
    group.add_argument("-d", "--dropout", type=number(float, 0, 1, high_open=True), default=d.dropout,
                       help=f"dropout before the output layer (default: {d.dropout})")
    group.add_argument("--conv_dropout", "--conv-dropout", type=number(float, 0, 1, high_open=True),
                       default=d.conv_dropout, help=f"channel dropout after each conv block (default: {d.conv_dropout})")
    group.add_argument("-dn", "--dense_neurons", "--dense-neurons", type=number(int, 1, 65536), default=d.dense_neurons,
                       help=f"width of the dense layer (default: {d.dense_neurons})")
    group.add_argument("--global_pool", "--global-pool", type=choice(*GLOBAL_POOLS), default=d.global_pool,
                       help="before the dense layer: avg = average each channel over the last feature map, none = "
                       f"flatten it (the assignment's network) (default: {d.global_pool})")
    group.add_argument("--num_blocks", "--num-blocks", type=number(int, 1, 8), default=d.num_blocks,
                       help=f"conv-activation-maxpool blocks (default: {d.num_blocks})")
    group.add_argument("--convs_per_block", "--convs-per-block", type=number(int, 1, 4), default=d.convs_per_block,
                       help="conv -> [BN] -> activation layers before each max-pool; 1 = the assignment's network, "
                       f"2 = VGG-style, about 3.4x the multiply-adds (default: {d.convs_per_block})")
    group.add_argument("--whiten", type=choice(*WHITEN_MODES), default=d.whiten,
                       help=f"first conv: init = set its filters to the principal directions of the patches of "
                       f"{WHITEN_IMAGES} train images, both signs, scaled to unit variance (patch whitening), then "
                       "train them; frozen = the same, kept fixed; off = PyTorch's random init "
                       f"(default: {d.whiten})")
    parser.add_argument_group("evaluation").add_argument(
        "--crop_pct", "--crop-pct", type=number(float, 0.875, 1.0), default=d.crop_pct,
        help="validation, test and --predict: resize the shorter side to image_size / crop_pct, then center "
        f"crop image_size (0.875 = the classic 256/224, 1 = the whole shorter side) (default: {d.crop_pct})")
    add_train_args(parser, d)
    add_action_args(parser)
    return parser


# Flags whose combinations decide whether the model builds (checked jointly by sweep_check).
SHAPE_FIELDS = ("num_blocks", "num_filters", "filter_org", "filter_size", "image_size", "dense_neurons")


def config_from_args(args) -> ConfigA:
    return normalise(_config_from_args(ConfigA, args))


def normalise(cfg: ConfigA) -> ConfigA:
    """Lists as tuples, one-element lists as ints, canonical activation name."""
    def tidy(value):
        if isinstance(value, (list, tuple)):
            return int(value[0]) if len(value) == 1 else tuple(int(v) for v in value)
        return value

    return ConfigA(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)},
                      "num_filters": tidy(cfg.num_filters), "filter_size": tidy(cfg.filter_size),
                      "activation": canonical_activation(cfg.activation)})


def build_model(cfg: ConfigA, num_classes: int = 10):
    model = build_cnn(
        num_classes=num_classes, image_size=cfg.image_size, num_filters=cfg.num_filters,
        filter_org=cfg.filter_org, filter_size=cfg.filter_size, activation=cfg.activation,
        batch_norm=cfg.batch_norm, dropout=cfg.dropout, conv_dropout=cfg.conv_dropout,
        dense_neurons=cfg.dense_neurons, num_blocks=cfg.num_blocks, global_pool=cfg.global_pool,
        convs_per_block=cfg.convs_per_block,
    )
    if cfg.whiten == "frozen":
        first_conv(model).requires_grad_(False)
    return model


def whiten_from_data(cfg: ConfigA, eval_transform):
    """--whiten init|frozen: the first conv from the patches of train-split images (eval transform,
    drawn by --seed)."""
    def init(model, data, precision) -> str:
        images = sample_images(data.train_set, WHITEN_IMAGES, eval_transform, cfg.seed)
        count = whiten_first_conv_(model, images)
        return f"whiten: first conv's {count} filters from the patches of {len(images)} train images ({cfg.whiten})"
    return init


def check_config(cfg: ConfigA) -> None:
    """Everything that can be checked without data, so a bad sweep combination fails in a second."""
    if cfg.image_size < min_image_size(cfg.num_blocks):
        raise UsageError(f"image_size={cfg.image_size} is too small for {cfg.num_blocks} pooling stages "
                         f"(need >= {min_image_size(cfg.num_blocks)}); raise --image_size")
    if cfg.image_size > 1024:
        raise UsageError(f"image_size={cfg.image_size} is larger than this CNN can use (max 1024); lower --image_size")
    counts = filter_counts(cfg.num_filters, cfg.filter_org, cfg.num_blocks)
    if max(counts) > 4096:
        raise UsageError(f"num_filters {counts} reach {max(counts)} (> 4096) per block; lower --num_filters or --filter_org")
    sizes = [cfg.filter_size] * cfg.num_blocks if isinstance(cfg.filter_size, int) else list(cfg.filter_size)
    if len(sizes) != cfg.num_blocks:
        raise UsageError(f"filter_size lists {len(sizes)} sizes for {cfg.num_blocks} blocks; give one or {cfg.num_blocks}")
    if not all(1 <= s <= 31 for s in sizes):
        raise UsageError(f"filter_size {sizes} must be between 1 and 31")


def run_name(cfg: ConfigA) -> str:
    """e.g. GELU-nf64-double-fs5,5,3,3,3-bn-d0.3-aug: the hyperparameters a sweep varies."""
    if cfg.run_name:
        return cfg.run_name
    if isinstance(cfg.num_filters, int):
        filters = f"nf{cfg.num_filters}-{cfg.filter_org}"
    else:
        filters = "nf" + ",".join(map(str, cfg.num_filters))
    sizes = cfg.filter_size if isinstance(cfg.filter_size, int) else ",".join(map(str, cfg.filter_size))
    if cfg.convs_per_block > 1:
        sizes = f"{sizes}x{cfg.convs_per_block}"
    return (f"{cfg.activation}-{filters}-fs{sizes}-{'bn' if cfg.batch_norm else 'nobn'}-d{cfg.dropout:g}-"
            f"{'aug' if cfg.data_aug else 'noaug'}-lr{cfg.lr:g}")


def config_from_checkpoint(checkpoint: dict) -> ConfigA:
    return normalise(config_from_dict(ConfigA, checkpoint["config"]))


def sizes_of(cfg: ConfigA) -> Sizes:
    """Decode size, eval resize (--crop_pct of --image_size) and crop."""
    return sizes_for(cfg.image_size, cfg.crop_pct)


def rebuild_from_checkpoint(checkpoint: dict):
    cfg = config_from_checkpoint(checkpoint)
    model = build_model(cfg, len(checkpoint["class_names"]))
    model.load_state_dict(inference_weights(checkpoint))
    return cfg, model, plain_transform(sizes_of(cfg))


def recipe_for(cfg: ConfigA) -> ModelRecipe:
    """What trainA contributes to the shared run: the CNN, its optimizer groups and framing."""
    sizes = sizes_of(cfg)
    eval_transform = plain_transform(sizes)
    return ModelRecipe(
        script="trainA",
        new_model=lambda num_classes: build_model(cfg, num_classes),
        param_groups=lambda m: split_decay(((n, p) for n, p in m.named_parameters() if p.requires_grad), cfg.lr,
                                           cfg.weight_decay),
        train_transform=train_transform(sizes, cfg.data_aug and AugmentSpec.from_config(cfg)),
        eval_transform=eval_transform,
        sizes=sizes,
        init_from_data=whiten_from_data(cfg, eval_transform) if cfg.whiten != "off" else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = SPEC.parse_args(argv)
    if (code := checkpoint_action(SPEC, args)) is not None:  # --predict, --test_only
        return code
    cfg = config_for_run(SPEC, args)
    if args.dry_run:  # the model for the default 10 classes: no data is read (the name shows in the run folder's)
        print(run_name(cfg))
        print(summarize(build_model(cfg), (3, cfg.image_size, cfg.image_size)).format())
        return 0

    recipe = recipe_for(cfg)
    return train_and_test(cfg, recipe, run_name(cfg) + ("-lr_find" if args.lr_find else ""), resume=args.resume,
                          lr_find_steps=args.lr_find_steps if args.lr_find else 0,
                          after_test=pictures_maker(cfg, guided=True) if cfg.pictures else None,
                          summary_text=lambda m: summarize(m, (3, cfg.image_size, cfg.image_size)).format())


SPEC = ScriptSpec(name="trainA", get_args_parser=get_args_parser, config_from_args=config_from_args,
                  config_from_checkpoint=config_from_checkpoint, check_config=check_config, model_structure=build_model,
                  rebuild_from_checkpoint=rebuild_from_checkpoint, sizes=sizes_of, shape_fields=SHAPE_FIELDS)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="trainA.py"))

#!/usr/bin/env python
"""Part B: fine-tune an ImageNet-pretrained torchvision or timm model (torchvision's ResNet50 by
default) on iNaturalist-12K by replacing its head with an N-way one, with a choice of freezing
strategies.

    python trainB.py --strategy freeze_all                        # only the new head trains
    python trainB.py --strategy freeze_upto --freeze_upto layer2  # conv1..layer2 frozen
    python trainB.py --strategy gradual --head_epochs 2           # head first, then everything
    python trainB.py --arch tf_efficientnet_lite0 --weights lite0.pth   # a timm model, weights from a file
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from data import AugmentSpec, Sizes, plain_transform, sizes_for, train_transform
from models.backbone import FREEZE_ALL, FineTuneNet, build_finetune_model, find_family, fixed_input_size
from models.weights import NORMS, Preprocessing, check_weights, preprocessing, resolve_arch
from utils.cli import OneLineParser, add_bool, choice, number, run_cli
from utils.cli import config_from_args as _config_from_args
from utils.config import TrainConfig, add_action_args, add_train_args, config_from_dict
from utils.checkpoint import inference_weights
from utils.errors import UsageError
from utils.actions import ScriptSpec, checkpoint_action, config_for_run, pictures_maker
from utils.features import probe_head
from utils.run import ModelRecipe, train_and_test
from utils.optim import split_decay

STRATEGIES = ("freeze_all", "freeze_upto", "full", "gradual")


@dataclass(frozen=True)
class ConfigB(TrainConfig):
    arch: str = "resnet50"
    weights: str = "DEFAULT"  # DEFAULT, a torchvision weights name, none, or a file
    norm: str = "auto"  # input normalisation: the weights' own (auto), imagenet, half (mean = std = 0.5)
    strategy: str = "full"  # after the probe: LP-FT (docs/part_b.md has the measurements)
    freeze_upto: str = "middle"  # used by --strategy freeze_upto: the stage halfway down, for every arch
    head: str = "linear"
    head_hidden: int = 512
    head_dropout: float = 0.2  # before the new head's layer, as EfficientNet's own classifier
    head_epochs: int = 2  # gradual: epochs with only the head training
    probe_epochs: int = 100  # passes of the head alone over cached frozen features before the first epoch
    probe_lr: float = 1e-3  # peak lr of those passes
    freeze_bn: bool = True  # every BatchNorm keeps its pretrained statistics (eval mode) while training
    feature_cache: str = "auto"  # freeze_all: train the head on backbone features computed once
    backbone_lr: float = 5e-4  # peak lr of the unfrozen backbone
    lr_decay: float = 0.8  # backbone stage k from the top gets backbone_lr * lr_decay**k
    # the shared defaults overridden (docs/part_b.md): after the probe 8 epochs at 5e-4, then --refit
    epochs: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    patience: int = 0  # every epoch: with 8, stopping could only end a run in the high-rate dip (docs/part_b.md)
    refit: bool = True  # on birds50 val falls without a fifth of the train photos; the refit adds val's
    wandb_project: str = "inat12k-partB"


SHAPE_FIELDS = ("arch", "strategy", "freeze_upto", "head", "image_size")


def get_args_parser() -> OneLineParser:
    d = ConfigB()
    parser = OneLineParser(prog="trainB.py", allow_abbrev=False,
                           description="Fine-tune an ImageNet-pretrained torchvision or timm model on iNaturalist-12K.")
    group = parser.add_argument_group("model")
    group.add_argument("--arch", default=d.arch,
                       help="a torchvision classifier (resnet*, efficientnet*, convnext*, vit_*, ...) or any timm model "
                       "(tf_efficientnet_lite0, ...); a name both have is torchvision's, timm/NAME asks timm "
                       f"(default: {d.arch})")
    group.add_argument("--weights", default=d.weights,
                       help="DEFAULT (the source's pretrained weights, downloaded), a torchvision name (IMAGENET1K_V1, "
                       "IMAGENET1K_V2), none, or a state-dict file (.pth/.bin/.safetensors), matched by name or else "
                       "by order and shape (default: DEFAULT)")
    group.add_argument("--norm", type=choice(*NORMS), default=d.norm,
                       help="input normalisation: auto = what the weights expect (torchvision's preset, timm's "
                       "pretrained_cfg; ImageNet statistics for a file of unknown origin), imagenet, or half "
                       f"(mean = std = 0.5, TensorFlow ports) (default: {d.norm})")
    group.add_argument("-s", "--strategy", type=choice(*STRATEGIES), default=d.strategy,
                       help=f"{', '.join(STRATEGIES)} (default: {d.strategy})")
    group.add_argument("--freeze_upto", "--freeze-upto", default=d.freeze_upto,
                       help="last frozen stage for --strategy freeze_upto, inclusive: middle (the stage halfway down: "
                       "layer2 of a ResNet, blocks.3 of EfficientNet-Lite0), or a stage's name (conv1, layer1..layer4 "
                       f"for ResNets; --dry_run lists them) (default: {d.freeze_upto})")
    group.add_argument("--head", type=choice("linear", "mlp"), default=d.head,
                       help=f"new classifier: linear, or mlp (hidden layer, ReLU, dropout) (default: {d.head})")
    group.add_argument("--head_hidden", "--head-hidden", type=number(int, 1, 65536), default=d.head_hidden,
                       help=f"hidden width of the mlp head (default: {d.head_hidden})")
    group.add_argument("--head_dropout", "--head-dropout", type=number(float, 0, 1, high_open=True),
                       default=d.head_dropout, help=f"dropout in the head (default: {d.head_dropout})")
    group.add_argument("--head_epochs", "--head-epochs", type=number(int, 0), default=d.head_epochs,
                       help=f"gradual: epochs that train only the head before unfreezing (default: {d.head_epochs})")
    group.add_argument("--probe_epochs", "--probe-epochs", type=number(int, 0, 100_000), default=d.probe_epochs,
                       help="first train the new head alone for this many cheap passes over the frozen backbone's "
                       "features (LP-FT: a trained head keeps fine-tuning from distorting the pretrained features), "
                       f"then the epochs as the strategy says; 0 = off (default: {d.probe_epochs})")
    group.add_argument("--probe_lr", "--probe-lr", type=number(float, 0, low_open=True), default=d.probe_lr,
                       help=f"peak lr of the --probe_epochs passes (default: {d.probe_lr})")
    add_bool(group, "--freeze_bn", "--freeze-bn", default=d.freeze_bn,
             help="keep every BatchNorm in eval mode with its pretrained running statistics, also in the layers "
             "that train (their scale and shift still learn)")
    group.add_argument("-blr", "--backbone_lr", "--backbone-lr", type=number(float, 0, low_open=True),
                       default=d.backbone_lr, help=f"peak lr of unfrozen backbone layers (default: {d.backbone_lr})")
    group.add_argument("--lr_decay", "--lr-decay", type=number(float, 0, 1, low_open=True), default=d.lr_decay,
                       help="per-stage lr factor going down the backbone (layer-wise decay), 1 = same lr "
                       f"everywhere (default: {d.lr_decay})")
    group.add_argument("--feature_cache", "--feature-cache", type=choice("auto", "true", "false"), default=d.feature_cache,
                       help="freeze_all: train the head on the frozen backbone's features of the (not augmented) images, "
                       "computed once and kept on disk; false = the backbone on augmented images every step (default: auto)")
    add_train_args(parser, d)
    add_action_args(parser)
    return parser


def config_from_args(args) -> ConfigB:
    return _config_from_args(ConfigB, args)


@dataclass(frozen=True, kw_only=True)
class StrategyPlan:
    """What --strategy means, decided in plan_for() alone; everything else reads these fields."""
    label: str  # in run names: freeze_all, freeze_upto_middle, full, gradual
    freeze_at_start: str | None = None  # FREEZE_ALL, the last frozen stage (inclusive), or None
    unfreeze_after: int | None = None  # gradual: everything trains after this epoch (frozen parameters
    #                                    are in the optimizer from the start; DDP must allow unused ones)
    on_features: bool = False  # the head trains on features of the frozen backbone, computed once
    #                            (freeze_all, unless --feature_cache false: measured no better on birds50)
    backbone_trains: bool = False  # some backbone stage trains at some point (--backbone_lr matters)


def plan_for(cfg: ConfigB) -> StrategyPlan:
    return {
        "freeze_all": StrategyPlan(label="freeze_all", freeze_at_start=FREEZE_ALL, on_features=cfg.feature_cache != "false"),
        "freeze_upto": StrategyPlan(label=f"freeze_upto_{cfg.freeze_upto}", freeze_at_start=cfg.freeze_upto,
                                    backbone_trains=True),
        "full": StrategyPlan(label="full", backbone_trains=True),
        "gradual": StrategyPlan(label="gradual", freeze_at_start=FREEZE_ALL, unfreeze_after=cfg.head_epochs,
                                backbone_trains=True),
    }[cfg.strategy]


def build_model(cfg: ConfigB, num_classes: int = 10, weights: str | None = None) -> FineTuneNet:
    """The model with the strategy's initial freezing applied (weights: override cfg.weights)."""
    model = build_finetune_model(cfg.arch, num_classes, cfg.weights if weights is None else weights,
                                 cfg.head, cfg.head_hidden, cfg.head_dropout)
    model.bn_frozen = cfg.freeze_bn
    model.freeze_upto(plan_for(cfg).freeze_at_start)
    return model


def check_config(cfg: ConfigB) -> None:
    """Checks that need no data and no download: arch, weights name, stage name, input size."""
    find_family(cfg.arch)
    check_weights(*resolve_arch(cfg.arch), cfg.weights)
    if cfg.image_size < 32:
        raise UsageError(f"image_size={cfg.image_size} is too small for {cfg.arch} (need >= 32); raise --image_size")
    fixed = fixed_input_size(cfg.arch)
    if fixed and cfg.image_size != fixed:
        raise UsageError(f"--arch {cfg.arch} takes only {fixed}x{fixed} inputs (fixed position embeddings); "
                         f"use --image_size {fixed}")
    unfreeze_after = plan_for(cfg).unfreeze_after
    if unfreeze_after is not None and unfreeze_after >= cfg.epochs:
        raise UsageError(f"--head_epochs {cfg.head_epochs} leaves no epoch to fine-tune the backbone "
                         f"(--epochs {cfg.epochs}); lower --head_epochs or raise --epochs")
    build_structure(cfg)


def build_structure(cfg: ConfigB) -> FineTuneNet:
    """The model without weights, for checks: on the meta device (no memory, instant) where the
    architecture's constructor allows it, else on the CPU."""
    try:
        with torch.device("meta"):
            return build_model(cfg, weights="none")
    except NotImplementedError:  # e.g. regnet reads tensor values while it is built
        return build_model(cfg, weights="none")


def run_name(cfg: ConfigB) -> str:
    if cfg.run_name:
        return cfg.run_name
    plan = plan_for(cfg)
    head = cfg.head if cfg.head == "linear" else f"mlp{cfg.head_hidden}"
    probe, backbone = f"-probe{cfg.probe_epochs}" * bool(cfg.probe_epochs), f"-blr{cfg.backbone_lr:g}" * plan.backbone_trains
    return f"{cfg.arch.replace('/', '_')}-{plan.label}-{head}{probe}-lr{cfg.lr:g}{backbone}"


def inputs(cfg: ConfigB) -> Preprocessing:
    """Normalisation and eval crop share the weights expect (--norm overrides the normalisation)."""
    return preprocessing(*resolve_arch(cfg.arch), cfg.weights, cfg.norm)


def sizes_of(cfg: ConfigB, prep: Preprocessing | None = None) -> Sizes:
    """Decode size, eval resize (the weights' crop share of --image_size) and crop."""
    return sizes_for(cfg.image_size, (prep or inputs(cfg)).crop_pct)


def eval_transform(cfg: ConfigB, prep: Preprocessing | None = None):
    prep = prep or inputs(cfg)
    return plain_transform(sizes_of(cfg, prep), prep.mean, prep.std)


def param_groups(model: FineTuneNet, cfg: ConfigB) -> list[dict]:
    groups = []
    for name, lr, named in model.parameter_groups(cfg.lr, cfg.backbone_lr, cfg.lr_decay,
                                                  include_frozen=plan_for(cfg).unfreeze_after is not None):
        groups.extend(split_decay(named, lr, cfg.weight_decay, name=f"{name}."))
    return groups


def unfreeze_after_head_epochs(cfg: ConfigB):
    unfreeze_after = plan_for(cfg).unfreeze_after

    def at_epoch_start(model: FineTuneNet, epoch: int) -> None:
        if epoch > unfreeze_after and model.frozen:
            model.freeze_upto(None)
            trainable, _ = model.count_parameters()
            print(f"epoch {epoch}: backbone unfrozen, {trainable:,} parameters train "
                  f"(head lr {cfg.lr:g}, backbone lr {cfg.backbone_lr:g})")
    return at_epoch_start


def config_from_checkpoint(checkpoint: dict) -> ConfigB:
    return config_from_dict(ConfigB, checkpoint["config"])


def rebuild_from_checkpoint(checkpoint: dict):
    """No download: the architecture comes from the config, the weights from the checkpoint."""
    cfg = config_from_checkpoint(checkpoint)
    model = build_model(cfg, len(checkpoint["class_names"]), weights="none")
    model.load_state_dict(inference_weights(checkpoint))
    return cfg, model, eval_transform(cfg)


def recipe_for(cfg: ConfigB, resuming: bool = False) -> ModelRecipe:
    """What trainB contributes to the shared run: the model, its optimizer groups and framing, the
    strategy's freezing and feature cache, the probe."""
    # With --resume the weights come from last.pt: skip the download (--refit's fresh model needs them).
    weights = "none" if resuming and not cfg.refit else None
    prep, plan = inputs(cfg), plan_for(cfg)
    sizes, mean, std = sizes_of(cfg, prep), prep.mean, prep.std
    print(prep.describe(sizes.eval_resize, sizes.image))
    return ModelRecipe(
        script="trainB",
        new_model=lambda num_classes: build_model(cfg, num_classes, weights),
        param_groups=lambda model: param_groups(model, cfg),
        train_transform=train_transform(sizes, cfg.data_aug and not plan.on_features and AugmentSpec.from_config(cfg),
                                        mean, std),
        eval_transform=eval_transform(cfg, prep),
        sizes=sizes,
        mean=mean,
        std=std,
        at_epoch_start=unfreeze_after_head_epochs(cfg) if plan.unfreeze_after is not None else None,
        find_unused_parameters=plan.unfreeze_after is not None,  # what trains changes mid-run
        split_features=FineTuneNet.split if plan.on_features else None,
        augment=not plan.on_features,  # cached features are computed once, from images not augmented
        init_from_data=functools.partial(probe_head, FineTuneNet.split, cfg=cfg) if cfg.probe_epochs else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = SPEC.parse_args(argv)
    if (code := checkpoint_action(SPEC, args)) is not None:  # --predict, --test_only
        return code
    cfg = config_for_run(SPEC, args)
    if args.dry_run:  # the run's name shows in its folder's otherwise
        model = build_structure(cfg)
        print(f"{run_name(cfg)}\n{cfg.arch}, strategy {cfg.strategy}: " + "{:,} trainable and {:,} frozen parameters".format(
            *model.count_parameters()) + f"; stages {', '.join(model.stage_names())}")
        return 0

    recipe = recipe_for(cfg, resuming=bool(args.resume))

    def describe(model: FineTuneNet) -> str:
        upto = f" (frozen up to {model.stage_named(cfg.freeze_upto)})" if cfg.strategy == "freeze_upto" else ""
        return (f"{cfg.arch} ({cfg.weights}), head {cfg.head}, strategy {cfg.strategy}{upto}: "
                "{:,} parameters train, {:,} frozen".format(*model.count_parameters()))

    return train_and_test(cfg, recipe, run_name(cfg) + ("-lr_find" if args.lr_find else ""), resume=args.resume,
                          lr_find_steps=args.lr_find_steps if args.lr_find else 0,
                          after_test=pictures_maker(cfg, guided=False) if cfg.pictures else None, summary_text=describe)


SPEC = ScriptSpec(name="trainB", get_args_parser=get_args_parser, config_from_args=config_from_args,
                  config_from_checkpoint=config_from_checkpoint, check_config=check_config, model_structure=build_structure,
                  rebuild_from_checkpoint=rebuild_from_checkpoint, sizes=sizes_of, shape_fields=SHAPE_FIELDS)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="trainB.py"))

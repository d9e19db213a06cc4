"""Part B: a torchvision or timm classifier with a new N-way head, and stage-wise freezing.

    >>> net = build_finetune_model("resnet50", num_classes=10, weights="DEFAULT")
    >>> net.freeze_upto("layer2")        # conv1, layer1, layer2 frozen (inclusive, like timm)
    >>> net.freeze_upto(FREEZE_ALL)      # only the new head trains
    >>> build_finetune_model("tf_efficientnet_lite0", 10, "lite0.pth").stage_names()
    ['conv_stem', 'blocks.0', ..., 'blocks.6', 'conv_head']

torchvision models need the family table below (where the head is, how the stages split);
timm models say it themselves (pretrained_cfg's classifier, group_matcher's stages).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelConfigError
from .weights import create_network, resolve_arch

FREEZE_ALL = "all"


@dataclass(frozen=True)
class Family:
    prefix: str
    head: str  # path of the final Linear layer
    stages: str  # how the backbone splits into stages, in forward order


# Longest prefix first, so mobilenet_v3 wins over mobilenet.
FAMILIES = (
    Family("wide_resnet", "fc", "resnet"),
    Family("resnext", "fc", "resnet"),
    Family("resnet", "fc", "resnet"),
    Family("regnet", "fc", "regnet"),
    Family("efficientnet", "classifier.1", "features"),
    Family("mobilenet_v2", "classifier.1", "features"),
    Family("mobilenet_v3", "classifier.3", "features"),
    Family("convnext", "classifier.2", "features"),
    Family("densenet", "classifier", "features"),
    Family("swin", "head", "features"),
    Family("vit", "heads.head", "vit"),
)
SUPPORTED = "resnet*, resnext*, wide_resnet*, regnet*, efficientnet*, mobilenet_v2/v3*, convnext*, densenet*, swin*, vit_*"


def find_family(arch: str) -> Family:
    """The head path and stage layout of --arch (torchvision's table, or what timm says)."""
    source, name = resolve_arch(arch)
    if source == "timm":
        from .weights import timm_pretrained_cfg

        head = timm_pretrained_cfg(name)
        head = getattr(head, "classifier", None) if head is not None else None
        if not isinstance(head, str):
            raise ModelConfigError(f"--arch {arch}: timm names no single classifier to replace; pick another model")
        return Family(name, head, "timm")
    for family in FAMILIES:
        if name.startswith(family.prefix):
            return family
    raise ModelConfigError(f"--arch {arch} has no known head to replace; supported torchvision families: "
                           f"{SUPPORTED}, or any timm model")


def fixed_input_size(arch: str) -> int | None:
    """The only input size --arch takes, where its position embeddings fix it (ViTs), else None."""
    family = find_family(arch)
    if family.stages == "timm":
        from .weights import timm_pretrained_cfg

        cfg = timm_pretrained_cfg(resolve_arch(arch)[1])
        return int(cfg.input_size[-1]) if cfg is not None and getattr(cfg, "fixed_input_size", False) else None
    return 224 if family.prefix == "vit" else None


def make_head(in_features: int, num_classes: int, kind: str = "linear", hidden: int = 512,
              dropout: float = 0.0) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes)) if dropout > 0 \
            else nn.Linear(in_features, num_classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    raise ModelConfigError(f"unknown --head '{kind}'; choose linear or mlp")


class FineTuneNet(nn.Module):
    """A torchvision or timm classifier whose head was replaced; knows its stages and what is frozen.

    Frozen modules stay in eval() whatever train() is called with: frozen BatchNorm must not
    update its running statistics, or the frozen features drift under the head.
    """

    def __init__(self, net: nn.Module, arch: str, family: Family):
        super().__init__()
        self.net = net
        self.arch = arch
        self.family = family
        self.frozen: list[str] = []  # module paths (in self.net) held frozen
        # Every BatchNorm normalises with its pretrained running statistics, in eval mode, even
        # where its scale and shift train: a small fine-tuning batch's statistics are noisy, and
        # a probed head (LP-FT) was fitted to the pretrained ones.
        self.bn_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def head(self) -> nn.Module:
        return self.net.get_submodule(self.family.head)

    def stages(self) -> list[tuple[str, list[str]]]:
        """(stage name, module paths) in forward order, e.g. ("layer2", ["layer2"])."""
        net, kind = self.net, self.family.stages
        if kind == "timm":
            return timm_stages(net, self.family.head)
        if kind == "resnet":
            return [("conv1", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]
        if kind == "regnet":
            return [("stem", ["stem"])] + [(f"trunk_output.{n}", [f"trunk_output.{n}"])
                                           for n, _ in net.trunk_output.named_children()]
        if kind == "vit":
            return [("conv_proj", ["conv_proj"])] + [(f"encoder.layers.{n}", [f"encoder.layers.{n}"])
                                                     for n, _ in net.encoder.layers.named_children()]
        return [(f"features.{n}", [f"features.{n}"]) for n, _ in net.features.named_children()]

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the head (pooled backbone features), with the whole net in eval mode."""
        parent_path, _, leaf = self.family.head.rpartition(".")
        parent = self.net.get_submodule(parent_path) if parent_path else self.net
        head = getattr(parent, leaf)
        was_training = self.training
        setattr(parent, leaf, nn.Identity())
        try:
            self.eval()
            return self.net(x)
        finally:
            setattr(parent, leaf, head)
            self.train(was_training)

    def split(self) -> tuple:
        """(the backbone as a function of images, the head): for training the head alone on
        features of a frozen backbone."""
        return self.features, self.head

    def stage_names(self) -> list[str]:
        return [name for name, _ in self.stages()]

    def _paths_outside_head(self) -> list[str]:
        """Every module path that does not hold the head, as high up the tree as possible."""
        paths, head = [], self.family.head

        def walk(module: nn.Module, prefix: str) -> None:
            for name, child in module.named_children():
                path = f"{prefix}{name}"
                if path == head:
                    continue
                if head.startswith(path + "."):
                    walk(child, path + ".")
                else:
                    paths.append(path)

        walk(self.net, "")
        return paths

    def stage_named(self, stage: str) -> str:
        """The stage --freeze_upto names: its full name, its last part (layer2, or 3 for blocks.3),
        or "middle", the stage halfway down (ResNet's layer2 of conv1..layer4, Lite0's blocks.3)."""
        names = self.stage_names()
        if stage == "middle":
            return names[len(names) // 2]
        short = {n.rsplit(".", 1)[-1]: n for n in names}
        if short.get(stage, stage) not in names:
            raise ModelConfigError(f"--freeze_upto {stage} is not a stage of {self.arch}; choose middle or one of "
                                   f"{', '.join(names)}")
        return short.get(stage, stage)

    def freeze_upto(self, stage: str | None) -> None:
        """Freeze every stage up to and including `stage`; FREEZE_ALL freezes all but the head;
        None unfreezes everything. The head always stays trainable."""
        for param in self.net.parameters():
            param.requires_grad_(True)
        if stage is None:
            self.frozen = []
        elif stage == FREEZE_ALL:
            self.frozen = self._paths_outside_head()
            for param in self.net.parameters(recurse=False):  # e.g. a ViT's class token
                param.requires_grad_(False)
        else:
            upto = self.stage_names().index(self.stage_named(stage))
            self.frozen = [path for _, paths in self.stages()[: upto + 1] for path in paths]
        for path in self.frozen:
            for param in self.net.get_submodule(path).parameters():
                param.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "FineTuneNet":
        super().train(mode)
        for path in self.frozen:
            self.net.get_submodule(path).eval()
        if self.bn_frozen:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def parameter_groups(self, lr: float, backbone_lr: float, lr_decay: float = 1.0,
                         include_frozen: bool = False) -> list[tuple[str, float, list[tuple[str, nn.Parameter]]]]:
        """(group name, lr, named parameters): the head at lr, each backbone stage at
        backbone_lr * lr_decay**k (k = 0 for the last stage, growing towards the input), and
        parameters in no stage at backbone_lr. Frozen parameters are left out unless
        include_frozen (for strategies that unfreeze later)."""
        def wanted(param: nn.Parameter) -> bool:
            return include_frozen or param.requires_grad

        seen: set[int] = set()
        groups = []
        head = [(f"{self.family.head}.{n}", p) for n, p in self.head.named_parameters() if wanted(p)]
        seen.update(id(p) for _, p in self.head.named_parameters())
        groups.append(("head", lr, head))
        for depth, (name, paths) in enumerate(reversed(self.stages())):
            params = [(f"{path}.{n}", p) for path in paths for n, p in self.net.get_submodule(path).named_parameters()]
            seen.update(id(p) for _, p in params)
            groups.append((name, backbone_lr * lr_decay**depth, [(n, p) for n, p in params if wanted(p)]))
        rest = [(n, p) for n, p in self.net.named_parameters() if id(p) not in seen and wanted(p)]
        groups.append(("other", backbone_lr, rest))
        return [g for g in groups if g[2]]

    def count_parameters(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters()) - trainable


def timm_stages(net: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    """timm's coarse parameter groups (stem, each stage, the final conv) as (name, module paths),
    the head left out. Each group is given by the highest modules that hold only its parameters
    (blocks.0, not its 30 leaf layers) and named by the first of them: conv_stem, blocks.0, ..."""
    from timm.models import group_modules

    group_of = {path: gid for gid, paths in group_modules(net, net.group_matcher(coarse=True)).items()
                for path in paths}
    covering: dict[int, list[str]] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path == head:
                continue
            groups = {gid for leaf, gid in group_of.items() if leaf == path or leaf.startswith(path + ".")}
            if len(groups) == 1 and not head.startswith(path + "."):
                covering.setdefault(groups.pop(), []).append(path)
            elif groups:
                walk(child, path + ".")

    walk(net, "")
    return [(paths[0], paths) for _, paths in sorted(covering.items())]


def build_finetune_model(arch: str = "resnet50", num_classes: int = 10, weights: str = "DEFAULT",
                         head: str = "linear", head_hidden: int = 512, head_dropout: float = 0.0) -> FineTuneNet:
    """Load arch with weights (DEFAULT, a torchvision name, none or a file) and give it a new
    num_classes head."""
    family = find_family(arch)
    net = create_network(*resolve_arch(arch), weights)
    old = net.get_submodule(family.head)
    if not isinstance(old, nn.Linear):
        raise ModelConfigError(f"--arch {arch}: expected a Linear head at {family.head}, found {type(old).__name__}")
    parent_path, _, leaf = family.head.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    setattr(parent, leaf, make_head(old.in_features, num_classes, head, head_hidden, head_dropout))
    # The head's path may now point at a Sequential; keep pointing at the module we set.
    return FineTuneNet(net, arch, family)

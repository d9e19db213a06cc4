"""Where part B's network and its pretrained weights come from, and how its inputs must look.

Two sources of architectures: torchvision (its name wins when both have it, so `resnet50` is
torchvision's) and timm (any other name; `timm/NAME` asks timm explicitly, e.g. `timm/resnet50`).

    >>> source, name = resolve_arch("tf_efficientnet_lite0")        # ("timm", "tf_efficientnet_lite0")
    >>> net = create_network(source, name, "path/to/weights.pth")   # 1000-class ImageNet net
    >>> preprocessing("timm", name, "path/to/weights.pth", "auto")  # mean/std 0.5, crop 0.875

A weights file may come from another implementation of the same network: its tensors are
matched by name when the names agree, else by order and shape (as the TensorFlow ports of
EfficientNet are laid out), else it is refused naming the first tensor that differs.
"""

from __future__ import annotations

import difflib
import os
import socket
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import ModelConfigError

SOURCES = ("torchvision", "timm")
NORMS = ("auto", "imagenet", "half")
NORM_VALUES = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "half": ((0.5,) * 3, (0.5,) * 3)}
DEFAULT_CROP_PCT = 0.875  # 224 of 256: what ImageNet weights were evaluated with before 2021


class WeightsUnavailable(ModelConfigError):
    """Pretrained weights could not be fetched; never silently replaced by random ones."""


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def timm_pretrained_cfg(name: str):
    """timm's default pretrained_cfg of a model (classifier path, mean/std, crop, input size,
    hub id), or None where timm has none."""
    return _timm().get_pretrained_cfg(name)


def torchvision_models() -> set[str]:
    return set(torchvision.models.list_models(module=torchvision.models))


def resolve_arch(arch: str) -> tuple[str, str]:
    """--arch -> (source, model name): torchvision's name first, then timm's; `timm/NAME` and
    `torchvision/NAME` choose the source."""
    source, _, name = arch.partition("/")
    if name and source in SOURCES:
        known = _known(source, name)
        if not known:
            raise ModelConfigError(f"unknown --arch '{arch}': {source} has no model '{name}'{_suggest(name)}")
        return source, name
    if arch in torchvision_models():
        return "torchvision", arch
    if _known("timm", arch):
        return "timm", arch
    raise ModelConfigError(f"unknown --arch '{arch}'; use a torchvision classifier (resnet50, efficientnet_b0, "
                           f"convnext_tiny, vit_b_16) or a timm model (tf_efficientnet_lite0, ...){_suggest(arch)}")


def _known(source: str, name: str) -> bool:
    if source == "torchvision":
        return name in torchvision_models()
    timm = _timm()
    if timm is None:
        raise ModelConfigError(f"--arch {name} needs timm, which is not installed; pip install timm")
    return timm.is_model(name)


def _suggest(name: str) -> str:
    timm = _timm()
    names = sorted(set(torchvision_models()) | set(timm.list_models() if timm else []))  # a name both have once
    close = difflib.get_close_matches(name.split("/")[-1], names, n=3, cutoff=0.75)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def weights_kind(source: str, name: str, weights: str) -> str:
    """none, default, enum (a torchvision weights name such as IMAGENET1K_V2) or file."""
    if weights.lower() in ("none", "random", ""):
        return "none"
    if weights.lower() == "default":
        return "default"
    if source == "torchvision" and weights.upper() in torchvision.models.get_model_weights(name).__members__:
        return "enum"
    return "file"


def check_weights(source: str, name: str, weights: str) -> None:
    """Fail early (no download, no model) on a weights name that does not exist or a missing file."""
    if weights_kind(source, name, weights) != "file" or Path(weights).expanduser().is_file():
        return
    if source == "torchvision":
        choices = ", ".join(torchvision.models.get_model_weights(name).__members__)
    else:
        choices = "DEFAULT (timm's pretrained weights)"
    what = "a folder, not a file" if Path(weights).expanduser().is_dir() else "not an existing file"
    raise ModelConfigError(f"--weights {weights} is neither a weights name for {name} ({choices}, none) nor a "
                           f"file ({what}); pass one of those or the path of a state-dict file")


def _torchvision_enum(name: str, weights: str):
    enum = torchvision.models.get_model_weights(name)
    return enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights.upper()]


def create_network(source: str, name: str, weights: str) -> nn.Module:
    """The architecture with its original 1000-class head and the asked weights loaded."""
    kind = weights_kind(source, name, weights)
    check_weights(source, name, weights)
    if source == "timm":
        if kind == "default":
            return _timm_pretrained(name)
        net = _timm().create_model(name, pretrained=False)
    else:
        net = torchvision.models.get_model(name, weights=None)
        if kind in ("default", "enum"):
            net.load_state_dict(_torchvision_download(_torchvision_enum(name, weights)))
    if kind == "file":
        load_weights_file(net, Path(weights).expanduser(), name)
    return net


def _torchvision_download(weights) -> dict:
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        file_name = os.path.basename(weights.url)
        cache = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        reason = getattr(error, "reason", None) or str(error).splitlines()[0]
        raise WeightsUnavailable(
            f"could not download {weights} ({one_line(reason, 80)}); place {file_name} from {weights.url} at {cache}, "
            "or pass --weights PATH, or --weights none to train from random init"
        ) from None


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, found in one try (DNS or connect, 5 s at most),
    or None. Without it, timm's download retries for about a minute before failing. Not asked
    behind a proxy (a direct connection may fail where the proxy works) or in offline mode."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE")):
        return None
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        return f"{host} cannot be reached: {error.strerror or error}"
    return None


def _hub_cached_file(hub_id: str) -> str | None:
    """The weights file of hub_id already in the local Hugging Face cache, if there is one."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def _timm_pretrained(name: str) -> nn.Module:
    timm = _timm()
    cfg = timm_pretrained_cfg(name)
    hub_id, url = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)
    where = f"hf-hub:{hub_id}" if hub_id else url or "nowhere"
    try:
        if hub_id and (reason := _hub_unreachable()):
            if (cached := _hub_cached_file(hub_id)) is None:
                raise OSError(f"no network: {reason}")
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=cached))
        return timm.create_model(name, pretrained=True)
    except Exception as error:  # noqa: BLE001 - the hub raises OSError, HTTP and its own errors alike
        raise WeightsUnavailable(
            f"could not download timm's weights of {name} from {where} ({one_line(error, 80)}); download the file "
            "(model.safetensors or pytorch_model.bin) where there is a network and pass --weights PATH, "
            "or --weights none to train from random init") from None


def one_line(error, limit: int) -> str:
    text = " ".join(str(error).split())
    return text[:limit]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt/.bin (torch.load, weights only) or .safetensors file, unwrapped
    from the usual checkpoint containers ("state_dict", "model") and DDP's "module." prefix."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means "not a usable weights file"
        raise ModelConfigError(f"--weights {path}: not a loadable state dict ({one_line(error, 100)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelConfigError(f"--weights {path} holds a {type(state).__name__}, not a state dict of tensors; "
                               "pass a file of the network's ImageNet weights")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights_file(net: nn.Module, path: Path, name: str) -> str:
    """Load path into net by name, else by order and shape; how it matched, in a few words."""
    state = read_state_dict(path)
    own = net.state_dict()
    if state.keys() == own.keys():
        pairs = [(key, key) for key in own]
        how = "by name"
    else:
        theirs, ours = list(state), list(own)
        if len(theirs) != len(ours):  # one side may lack BatchNorm's step counters
            theirs = [k for k in theirs if not k.endswith("num_batches_tracked")]
            ours = [k for k in ours if not k.endswith("num_batches_tracked")]
        pairs = list(zip(ours, theirs))
        how = f"by order ({len(pairs)} tensors; the file names them differently)"
        if len(theirs) != len(ours):
            raise ModelConfigError(f"--weights {path} does not fit {name}: it holds {len(theirs)} tensors, {name} has "
                                   f"{len(ours)}; pass the file of {name}'s ImageNet weights")
    for ours_key, their_key in pairs:
        if tuple(state[their_key].shape) != tuple(own[ours_key].shape):
            raise ModelConfigError(
                f"--weights {path} does not fit {name}: {their_key} {tuple(state[their_key].shape)} differs from "
                f"{ours_key} {tuple(own[ours_key].shape)}; pass the file of {name}'s ImageNet weights")
    # strict: every tensor of net is in the mapping (num_batches_tracked may be absent from a file)
    missing, _ = net.load_state_dict({ours_key: state[their_key] for ours_key, their_key in pairs}, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing:
        raise ModelConfigError(f"--weights {path} does not fit {name}: it has nothing for {missing[0]}; pass the file "
                               f"of {name}'s ImageNet weights")
    return how


@dataclass(frozen=True)
class Preprocessing:
    """What the weights expect: normalisation and the eval center crop's share of the resize."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    origin: str  # where the values come from, for the run's printout

    def describe(self, eval_resize: int, image_size: int) -> str:
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return (f"preprocessing: mean ({mean}), std ({std}), eval resize {eval_resize} + center crop "
                f"{image_size} ({self.origin})")


def preprocessing(source: str, name: str, weights: str, norm: str = "auto") -> Preprocessing:
    """The weights' own preprocessing (torchvision's preset, timm's pretrained_cfg); --norm
    imagenet|half overrides the normalisation for a file of unknown origin. Needs neither a
    download nor the file itself (a checkpoint's --test_only rebuilds it from the config)."""
    known = _known_preprocessing(source, name, weights)
    if norm != "auto":
        mean, std = NORM_VALUES[norm]
        crop_pct = known.crop_pct if known else DEFAULT_CROP_PCT
        return Preprocessing(mean, std, crop_pct, f"--norm {norm}")
    if known is not None:
        return known
    mean, std = NORM_VALUES["imagenet"]
    return Preprocessing(mean, std, DEFAULT_CROP_PCT, "ImageNet statistics, no weights to follow"
                         if weights.lower() in ("none", "random", "") else
                         "ImageNet statistics: the file's origin is unknown, set --norm if it differs")


def _known_preprocessing(source: str, name: str, weights: str) -> Preprocessing | None:
    if source == "timm":
        # A file given for a timm architecture is taken to be that architecture's weights.
        cfg = timm_pretrained_cfg(name)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        if not cfg.get("mean"):
            return None
        return Preprocessing(tuple(cfg["mean"]), tuple(cfg["std"]), float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
                             f"timm's pretrained_cfg of {name}")
    if weights_kind(source, name, weights) not in ("default", "enum"):
        return None
    chosen = _torchvision_enum(name, weights)
    preset = chosen.transforms()
    return Preprocessing(tuple(preset.mean), tuple(preset.std), int(preset.crop_size[0]) / int(preset.resize_size[0]),
                         f"torchvision's preset of {chosen}")

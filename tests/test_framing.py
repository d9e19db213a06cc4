"""One framing: every unaugmented pass over train images (a probe's or the feature cache's
features) sees exactly what val and test see of the same files (plain_transform: the eval resize,
then the center crop), on both data paths and in both scripts, and the same on every pass."""

from __future__ import annotations

import importlib

import pytest
import torch

from data.loaders import in_order
from utils.distributed import DistInfo
from utils.inputs import load_data
from utils.run import Run
from utils.runtime import Precision

COMMON = ["-is", "32", "-b", "8", "--num_workers", "0", "--wandb_mode", "disabled", "--amp", "off",
          "--channels_last", "false"]

CASES = {
    "trainA": ("trainA", ["-nf", "4", "-fo", "same", "-dn", "16", "--crop_pct", "0.95"]),
    # torchvision's preset for ResNet50's DEFAULT weights: resize 232 for a 224 crop (34 for 32),
    # where random crops take from 8/7 of the crop (37)
    "trainB-resnet50": ("trainB", ["--arch", "resnet50", "--weights", "DEFAULT", "--strategy", "full"]),
    "trainB-resnet50-freeze_all": ("trainB", ["--arch", "resnet50", "--weights", "DEFAULT",
                                              "--strategy", "freeze_all"]),
    "trainB-lite0": ("trainB", ["--arch", "tf_efficientnet_lite0", "--weights", "none", "--strategy", "full"]),
}


def run_data(script: str, argv: list[str]):
    module = importlib.import_module(script)
    cfg = module.config_from_args(module.get_args_parser().parse_args(argv))
    recipe = module.recipe_for(cfg)
    run = Run(cfg, recipe, DistInfo(), Precision(torch.device("cpu")), None)
    return load_data(run), recipe


def images_of(loader) -> torch.Tensor:
    return torch.cat([images for images, _ in loader])


@pytest.mark.parametrize("cache", ["auto", "off"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_in_order_pass_over_train_is_the_val_framing_of_the_same_files(case, cache, tiny_data, capsys):
    script, extra = CASES[case]
    data, recipe = run_data(script, ["-p", str(tiny_data), "--cache", cache, *COMMON, *extra])
    train = data.train_set
    expected = torch.stack([recipe.eval_transform(train.load(i)) for i in range(len(train))])
    first, second = images_of(in_order(data.loaders[0])), images_of(in_order(data.loaders[0]))
    assert first.shape == expected.shape
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    assert torch.equal(first, second)
    # and val is framed the same way (its own files through the same transform)
    val = data.val_set
    torch.testing.assert_close(images_of(data.loaders[1]),
                               torch.stack([recipe.eval_transform(val.load(i)) for i in range(len(val))]),
                               atol=1e-5, rtol=0)


def test_the_resnet50_preset_frames_val_at_232_for_224():
    import trainB

    cfg = trainB.config_from_args(trainB.get_args_parser().parse_args(["--arch", "resnet50"]))
    sizes = trainB.sizes_of(cfg)
    assert (sizes.eval_resize, sizes.image, sizes.train_resize) == (232, 224, 256)

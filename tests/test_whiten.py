"""--whiten: the first conv set from the patch statistics of train images (models/whiten.py)."""

import dataclasses

import pytest
import torch
from torch import nn

import trainA
from conftest import TINY_ARGS
from data import NatureData, build_eval_transform, sample_images
from models import build_cnn, first_conv, whiten_first_conv_
from models.whiten import whitening_filters


def correlated_images(n=12, size=20, seed=0):
    """Images whose channels and neighbouring pixels are correlated, with a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    x = x + 0.8 * x.roll(1, dims=-1)
    x[:, 1] += 0.9 * x[:, 0]
    return x + torch.tensor([0.5, -0.3, 0.1])[:, None, None]


def test_the_filters_centre_and_decorrelate_the_patches_to_unit_variance():
    images = correlated_images()
    filters, biases = whitening_filters(images, 3, 54)
    assert filters.shape == (54, 3, 3, 3) and biases.shape == (54,)
    assert torch.equal(filters[1::2], -filters[0::2]) and torch.equal(biases[1::2], -biases[0::2])
    # The first ten directions (variance far above eps): outputs are centred, unit-variance, uncorrelated.
    out = nn.functional.conv2d(images.double(), filters[0:20:2].double(), biases[0:20:2].double())
    out = out.transpose(0, 1).reshape(10, -1)
    assert out.mean(1).abs().max() < 1e-4
    assert torch.allclose(torch.cov(out), torch.eye(10, dtype=torch.float64), atol=2e-3)
    # ... ordered by the variance they explain in the input: the first filter is the shortest.
    norms = filters[0::2].flatten(1).norm(dim=1)
    assert torch.all(norms[1:] >= norms[:-1] * 0.999)


@pytest.mark.parametrize("kernel,out,whitened", [(1, 32, 6), (2, 7, 7), (3, 32, 32), (4, 8, 8)])
def test_any_kernel_and_width_whitens_what_it_can_and_keeps_the_rest(kernel, out, whitened):
    torch.manual_seed(0)
    model = build_cnn(3, 32, num_filters=out, filter_org="same", filter_size=kernel, batch_norm=False, num_blocks=2)
    before = first_conv(model).weight.detach().clone()
    images = correlated_images()
    assert whiten_first_conv_(model, images) == whitened
    conv = first_conv(model)
    filters, biases = whitening_filters(images, kernel, out)
    assert torch.allclose(conv.weight[:whitened], filters) and torch.allclose(conv.bias[:whitened], biases)
    assert torch.equal(conv.weight[whitened:], before[whitened:])  # 1x1: only 2 x 3 directions exist
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_images_are_drawn_by_the_seed_without_touching_the_global_random_stream(tiny_data):
    train = NatureData(tiny_data, "train", image_size=32)
    transform = build_eval_transform(32)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = sample_images(train, 6, transform, seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert a.shape == (6, 3, 32, 32)
    assert torch.equal(a, sample_images(train, 6, transform, seed=1))
    assert not torch.equal(a, sample_images(train, 6, transform, seed=2))
    assert len(sample_images(train, 10_000, transform, seed=1)) == len(train)


@pytest.mark.parametrize("mode", ["frozen", "init", "off"])
def test_a_run_whitens_its_first_conv_from_the_train_split_and_frozen_keeps_it(tiny_data, tmp_path, capsys, mode):
    args = ["--data_dir", str(tiny_data), "-e", "2", *TINY_ARGS, "--seed", "3", "--whiten", mode,
            "--output_dir", str(tmp_path / "runs")]
    assert trainA.main(args) == 0
    printed = capsys.readouterr().out
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    weight = torch.load(run_dir / "last.pt", weights_only=True)["model"]["features.0.conv.weight"]
    cfg = trainA.ConfigA(image_size=32)
    train = NatureData(tiny_data, "train", image_size=32, seed=3)
    images = sample_images(train, trainA.WHITEN_IMAGES, build_eval_transform(32, trainA.sizes_of(cfg).eval_resize), 3)
    expected, _ = whitening_filters(images, 3, 4)
    assert ("whiten: first conv's 4 filters from the patches of 24 train images" in printed) == (mode != "off")
    distance = ((weight - expected).norm() / expected.norm()).item()
    if mode == "frozen":
        assert torch.equal(weight, expected)  # two epochs of AdamW with weight decay left it as set
    elif mode == "init":  # trained, starting from the whitening filters
        assert 0 < distance < 0.5
    else:  # PyTorch's random init, nothing like them
        assert distance > 0.5


def test_a_checkpoint_from_before_whiten_trains_its_first_conv_on_resume():
    """Checkpoints written before --whiten had a trained, randomly initialised first conv:
    rebuilt under today's default (frozen) they must keep it trainable."""
    old = {k: v for k, v in dataclasses.asdict(trainA.ConfigA(image_size=64)).items() if k != "whiten"}
    cfg = trainA.config_from_checkpoint({"config": old})
    assert cfg.whiten == "off" and trainA.ConfigA().whiten != "off"
    assert first_conv(trainA.build_model(cfg, 3)).weight.requires_grad

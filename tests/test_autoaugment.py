"""The batched auto-augment policies against torchvision's own, operation by operation and in
distribution."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2

from data.autoaugment import OPS, BatchPolicy, apply_op, magnitude_table, reference_op


def photo_like(count: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields with edges and noise: every operation has something to change."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(size, size + 8), mode="bilinear", align_corners=False)
    noisy = smooth * 0.8 + torch.rand(count, 3, size, size + 8, generator=g) * 0.2
    return (noisy * 255).round().to(torch.uint8)


MAGNITUDES = [-0.6, -0.2, 0.0, 0.35, 0.9]


@pytest.mark.parametrize("name", [op for op in OPS if op != "Identity"])
def test_each_operation_matches_torchvision_within_uint8_rounding(name):
    images = photo_like(len(MAGNITUDES) * 2)
    table = magnitude_table("trivialwide", 31, images.shape[-2], images.shape[-1])[OPS.index(name)]
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Posterize", "Solarize"):
        # bins of the real space (rotation 90 included; round shears like 0.2 put whole rows on a
        # rounding tie, which torchvision's float32 grid breaks pixel by pixel and the row shift
        # does not: the policy never draws them)
        picks = table[torch.tensor([0, 7, 15, 20, 30])]
        magnitudes = torch.cat([picks, -picks if name not in ("Posterize", "Solarize") else picks])
    else:
        magnitudes = torch.tensor(MAGNITUDES + [-m for m in MAGNITUDES], dtype=torch.float64)
    ours = apply_op(name, images, magnitudes)
    theirs = torch.stack([reference_op(name, image, float(m)) for image, m in zip(images, magnitudes)])
    difference = (ours.int() - theirs.int()).abs()
    assert ours.dtype == torch.uint8 and ours.shape == images.shape
    assert (difference <= 1).float().mean() >= 0.999, (name, difference.max(), (difference > 1).sum())
    changed = [not torch.equal(t, i) for t, i in zip(theirs, images)]
    assert sum(changed) >= len(images) // 2, (name, changed)  # the comparison is not of untouched images


@pytest.mark.parametrize("policy", ["trivialwide", "randaugment"])
def test_operations_and_magnitudes_are_drawn_as_torchvision_draws_them(policy, monkeypatch):
    """What torchvision's own policy picks over many calls against our draws: the same
    operations, the same magnitudes, uniform over both and over the sign."""
    reference = v2.TrivialAugmentWide() if policy == "trivialwide" else v2.RandAugment()
    seen = []
    monkeypatch.setattr(type(reference), "_apply_image_or_video_transform",
                        lambda self, image, name, magnitude, **kw: seen.append((name, round(magnitude, 4))) or image)
    image = torch.zeros(3, 40, 48, dtype=torch.uint8)
    torch.manual_seed(0)
    for _ in range(3000):
        reference(image)
    ops, magnitudes = BatchPolicy(policy).draw(3000, 40, 48, torch.Generator().manual_seed(0))
    ours = [(OPS[o], round(float(m), 4)) for o, m in zip(ops.flatten().tolist(), magnitudes.flatten().tolist())]
    assert set(ours) <= set(p for p in _space(reference, 40, 48))
    assert {name for name, _ in seen} == {name for name, _ in ours} == set(OPS)
    signed = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
              "Sharpness")
    for sample in (seen, ours):
        counts = torch.tensor([sum(1 for name, _ in sample if name == op) for op in OPS], dtype=torch.float)
        expected = len(sample) / len(OPS)
        assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all(), counts
        moved = [m for name, m in sample if name in signed and m != 0]
        share = sum(1 for m in moved if m < 0) / len(moved)
        assert abs(share - 0.5) < 5 * math.sqrt(0.25 / len(moved)), share
    if policy == "trivialwide":  # magnitude bins uniform: the mean |shear| is the table's mean
        shears = [abs(m) for name, m in ours if name == "ShearX"]
        assert abs(sum(shears) / len(shears) - 0.495) < 0.05


def _space(reference, height, width):
    """Every (operation, magnitude) the torchvision policy can produce."""
    pairs = []
    for name, (magnitudes_fn, signed) in reference._AUGMENTATION_SPACE.items():
        values = magnitudes_fn(31, height, width)
        if values is None:
            pairs.append((name, 0.0))
            continue
        chosen = values if isinstance(reference, v2.TrivialAugmentWide) else values[reference.magnitude:reference.magnitude + 1]
        for value in chosen.tolist():
            pairs.append((name, round(float(value), 4)))
            if signed:
                pairs.append((name, round(-float(value), 4)))
    return pairs


def test_the_same_generator_seed_gives_the_same_batch():
    images = photo_like(16)
    policy = BatchPolicy("randaugment")
    first = policy(images, torch.Generator().manual_seed(5))
    again = policy(images, torch.Generator().manual_seed(5))
    other = policy(images, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("size", [(32, 40), (33, 47), (64, 64)])
@pytest.mark.parametrize("policy", ["trivialwide", "randaugment"])
def test_moves_match_torchvision_on_every_magnitude_the_policy_draws(policy, size):
    """Shears and translations are whole-pixel moves along one axis, rotation a gather of rounded
    sources: held to torchvision on its whole space (both signs), square and odd sizes."""
    height, width = size
    table = magnitude_table(policy, 31, height, width)
    for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        values = table[OPS.index(name)] if policy == "trivialwide" else table[OPS.index(name), 9:10]
        magnitudes = torch.cat([values, -values])
        images = photo_like(len(magnitudes), size=height, seed=1)[..., :width]
        ours = apply_op(name, images, magnitudes)
        theirs = torch.stack([reference_op(name, image, float(m)) for image, m in zip(images, magnitudes)])
        assert (ours == theirs).float().mean() >= 0.999, (name, (ours != theirs).float().mean())


@pytest.mark.parametrize("name", ["Equalize", "AutoContrast"])
def test_histogram_ops_keep_torchvisions_handling_of_flat_channels(name):
    """Channels with one value (and for Equalize one value and a few others: PIL's step 0) are
    left as they are; the rest equalized or stretched exactly as torchvision does."""
    g = torch.Generator().manual_seed(0)
    one_value = torch.full((2, 3, 8, 8), 7, dtype=torch.uint8)
    outlier = one_value.clone()
    outlier[:, :, 0, 0] = 200
    three_values = (torch.rand(3, 3, 20, 20, generator=g) * 3).to(torch.uint8) * 100
    mixed = torch.cat([photo_like(2)[..., :8, :8], outlier])
    for images in (one_value, outlier, three_values, mixed, photo_like(4)):
        reference = v2.functional.equalize if name == "Equalize" else v2.functional.autocontrast
        assert torch.equal(apply_op(name, images, torch.zeros(len(images), dtype=torch.float64)), reference(images))


@pytest.mark.parametrize("policy", ["trivialwide", "randaugment"])
def test_each_image_gets_the_operations_drawn_for_it_in_turn(policy):
    """The batch is sorted by operation each round and put back once: every image must still
    come out as its own draws applied one after the other."""
    images = photo_like(24, seed=3)
    batched = BatchPolicy(policy)(images, torch.Generator().manual_seed(7))
    ops, magnitudes = BatchPolicy(policy).draw(len(images), images.shape[-2], images.shape[-1],
                                               torch.Generator().manual_seed(7))
    for i, image in enumerate(images):
        one = image[None]
        for round_ops, round_magnitudes in zip(ops, magnitudes):
            name = OPS[int(round_ops[i])]
            if name != "Identity":
                one = apply_op(name, one, round_magnitudes[i:i + 1])
        assert torch.equal(batched[i], one[0]), (i, [OPS[int(o[i])] for o in ops])

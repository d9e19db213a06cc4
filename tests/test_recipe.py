"""The training tools of the recipe: augmentation strength, auto-augment, MixUp/CutMix, model
EMA, test-time flips, global pooling and the train subset, on both data paths."""

import dataclasses

import pytest
import torch
from torch import nn

import trainA
import trainB
from conftest import TINY_ARGS, interrupted_in_epoch, make_dataset, only_dir, read_metrics, run_main
from data import AugmentSpec, NatureData, build_train_transform, stratified_subset
from data.augment import BatchAugment
from data.folder import Sample
from models import build_cnn
from utils.ema import WeightEMA
from data.augment import build_mix
from utils.runtime import Precision
from utils.evaluation import evaluate, predict_logits
from utils.optim import Optimisation
from utils.train import train_one_epoch

TOOLS = ["--ema_decay", "0.9", "--mixup_alpha", "0.4", "--cutmix_alpha", "1.0", "--auto_augment", "trivialwide",
         "--tta", "flip", "--global_pool", "avg", "--crop_scale", "0.5", "--jitter", "0.1", "--erasing", "0.3",
         "--whiten", "frozen"]




# --- augmentation spec, both paths ----------------------------------------------------------

def test_augment_spec_rejects_out_of_range_values():
    for bad in (dict(crop_scale=0), dict(crop_scale=1.5), dict(jitter=1), dict(erasing=-0.1), dict(auto_augment="x")):
        with pytest.raises(ValueError):
            AugmentSpec(**bad)


def test_streaming_transform_follows_the_spec():
    names = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    full = build_train_transform(32, AugmentSpec(crop_scale=0.35, jitter=0.2, erasing=0.1, auto_augment="randaugment"))
    assert names(full)[1:4] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment"]
    assert "ColorJitter" in names(full) and "RandomErasing" in names(full)
    assert full.transforms[1].scale == (0.35, 1.0)
    plain = build_train_transform(32, AugmentSpec(crop_scale=0.8, jitter=0, erasing=0))
    assert "ColorJitter" not in names(plain) and "RandomErasing" not in names(plain)
    assert plain.transforms[1].scale == (0.8, 1.0)
    # One set of defaults: augment=True is what the scripts run by default
    default = build_train_transform(32, True)
    assert default.transforms[1].scale == (trainA.ConfigA().crop_scale, 1.0)
    assert "ColorJitter" not in names(default) and "RandomErasing" not in names(default)
    assert AugmentSpec.from_config(trainA.ConfigA()) == AugmentSpec() == AugmentSpec.from_config(trainB.ConfigB())


@pytest.mark.parametrize("policy", ["trivialwide", "randaugment"])
def test_device_auto_augment_is_per_image_seeded_and_in_range(policy):
    images = torch.randint(0, 256, (12, 3, 36, 36), dtype=torch.uint8)
    images[1] = images[0]
    spec = AugmentSpec(crop_scale=1, ratio=(1, 1), flip=False, jitter=0, erasing=0, auto_augment=policy)
    augment = BatchAugment(32, True, (0, 0, 0), (1, 1, 1), spec)
    out = augment(images, torch.Generator().manual_seed(3))
    assert out.shape == (12, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, augment(images, torch.Generator().manual_seed(4)))
    # the policy changed something in most images, and not the same thing in two equal inputs
    plain = BatchAugment(32, True, (0, 0, 0), (1, 1, 1), AugmentSpec(crop_scale=1, ratio=(1, 1), flip=False,
                                                                     jitter=0, erasing=0))(images, torch.Generator())
    changed = [(out[i] - plain[i]).abs().max() > 1e-3 for i in range(12)]
    assert sum(changed) >= 6
    assert not torch.equal(out[0], out[1])


def test_device_augmentation_draws_do_not_touch_the_global_rng():
    augment = BatchAugment(32, True, (0, 0, 0), (1, 1, 1), AugmentSpec(auto_augment="trivialwide", erasing=0.5))
    images = torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("crop_scale", [1.0, 0.2])
def test_crop_scale_bounds_the_kept_area_on_the_device_path(crop_scale):
    # A picture whose columns count 0..S-1: the crop's width in source pixels shows in the output.
    size = 64
    ramp = torch.arange(size, dtype=torch.float32).repeat(size, 1)
    images = (ramp / (size - 1) * 255).round().to(torch.uint8).expand(200, 3, size, size).contiguous()
    spec = AugmentSpec(crop_scale=crop_scale, ratio=(1, 1), flip=False, jitter=0, erasing=0)
    out = BatchAugment(size, True, (0, 0, 0), (1, 1, 1), spec)(images, torch.Generator().manual_seed(0))
    width = out[:, 0, 0, -1] - out[:, 0, 0, 0]  # share of the source width covered
    assert width.min() >= crop_scale ** 0.5 - 0.05
    if crop_scale < 1:
        assert width.min() < 0.6  # small crops do occur


# --- subset -------------------------------------------------------------------------------------

def test_train_fraction_is_stratified_seeded_and_keeps_every_class():
    samples = [Sample(f"{c}_{i}.jpg", c) for c in range(3) for i in range(10 * (c + 1))]
    subset = stratified_subset(samples, 0.25, seed=1)
    counts = [sum(s.label == c for s in subset) for c in range(3)]
    assert counts == [round(10 * 0.25), round(20 * 0.25), round(30 * 0.25)]
    assert subset == stratified_subset(samples, 0.25, seed=1) and subset != stratified_subset(samples, 0.25, seed=2)
    assert [s.label for s in stratified_subset(samples, 0.01, 0)] == [0, 1, 2]
    assert stratified_subset(samples, 1.0, 0) == samples


def test_train_fraction_subsamples_train_only(tmp_path):
    data = make_dataset(tmp_path / "d", train_per_class=20)
    full = {s: len(NatureData(data, s)) for s in ("train", "val", "test")}
    part = {s: len(NatureData(data, s, train_fraction=0.5)) for s in ("train", "val", "test")}
    assert part["train"] == full["train"] // 2 and part["val"] == full["val"] and part["test"] == full["test"]


# --- model ---------------------------------------------------------------------------------------

def test_global_avg_pool_makes_the_head_independent_of_image_size():
    small = build_cnn(10, 64, num_filters=8, global_pool="avg")
    large = build_cnn(10, 256, num_filters=8, global_pool="avg")
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in large.parameters())
    assert isinstance(small.classifier[0], nn.AdaptiveAvgPool2d)
    assert small(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
    flat = build_cnn(10, 256, num_filters=8)
    assert sum(p.numel() for p in flat.parameters()) > sum(p.numel() for p in large.parameters())


# --- MixUp / CutMix, EMA, TTA -------------------------------------------------------------------

@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0), (0, 1.0), (0.4, 1.0)])
def test_mixing_gives_soft_targets_that_sum_to_one(mixup, cutmix):
    mix = build_mix(mixup, cutmix, 5)
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 5
    mixed, soft = mix(images, labels)
    assert mixed.shape == images.shape and soft.shape == (8, 5)
    assert torch.allclose(soft.sum(1), torch.ones(8)) and (soft.max(1).values >= 0.5 - 1e-6).all()
    assert build_mix(0, 0, 5) is None


def test_train_accuracy_under_mixing_counts_the_dominant_label():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    loader = [(torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2]))] * 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    opt = Optimisation(optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=0.1),
                       torch.amp.GradScaler("cpu", enabled=False), mix=build_mix(0.4, 0, 3))
    torch.manual_seed(0)
    stats = train_one_epoch(model, loader, opt, Precision(torch.device("cpu")), 1, show_progress=False)
    assert stats.images == 18 and 0 <= stats.accuracy <= 1 and stats.loss > 0


def test_ema_warms_up_then_averages_weights_and_batch_norm_buffers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = WeightEMA(model, 0.99)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    ema.update()  # the first update copies the weights
    assert torch.equal(ema.module[0].weight, model[0].weight)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(1.0)
    decay = ema.current_decay()
    ema.update()
    assert torch.allclose(ema.module[0].weight, decay * before + (1 - decay) * model[0].weight)
    assert torch.allclose(ema.module[1].running_mean, torch.full((4,), 1 - decay))
    for _ in range(2000):
        ema.update()
    assert ema.current_decay() == 0.99
    state = ema.state_dict()
    other = WeightEMA(model, 0.99)
    other.load_state_dict(state)
    assert other.updates == ema.updates and torch.equal(other.module[0].weight, ema.module[0].weight)


def test_flip_tta_averages_the_image_and_its_mirror():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 6, 5))
    x = torch.rand(2, 3, 4, 6)
    expected = (model(x) + model(x.flip(-1))) / 2
    assert torch.allclose(predict_logits(model, x, "flip"), expected)
    assert torch.equal(predict_logits(model, x, "none"), model(x))
    # evaluate() uses it: a model that only sees the right half scores differently with flips
    loader = [(x, torch.tensor([0, 1]))]
    plain = evaluate(model, loader, Precision(torch.device("cpu")), 5, show_progress=False)
    flipped = evaluate(model, loader, Precision(torch.device("cpu")), 5, show_progress=False, tta="flip")
    assert plain.loss != flipped.loss


def test_val_features_with_their_mirror_score_as_flip_tta_on_images_does():
    """freeze_all validates on cached features: with --tta flip they hold each image's mirror too,
    so the head's val_accuracy (which picks best.pt) is measured as the test on images is."""
    from data.loaders import FeatureBatches
    from utils.features import compute_features, val_tta

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, (3, 5)), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    head = nn.Linear(16, 5)
    images, labels = torch.rand(40, 3, 12, 14), torch.randint(0, 5, (40,))
    loader = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, 40, 16)]
    cpu = Precision(torch.device("cpu"))
    features, targets = compute_features(backbone, loader, cpu, mirror=True)
    assert features.shape == (40, 2, 16) and torch.equal(targets, labels)
    on_images = evaluate(nn.Sequential(backbone, head), loader, cpu, 5, show_progress=False, tta="flip")
    on_features = evaluate(head, FeatureBatches(features, targets, 16, False, 0), cpu, 5, show_progress=False,
                           tta="views")
    assert on_features.accuracy == on_images.accuracy and on_features.loss == pytest.approx(on_images.loss)
    plain = evaluate(head, FeatureBatches(features[:, 0], targets, 16, False, 0), cpu, 5, show_progress=False)
    assert plain.loss != pytest.approx(on_images.loss)  # the mirror view counts
    assert val_tta(FeatureBatches(features, targets, 16, False, 0)) == "views"
    assert val_tta(FeatureBatches(features[:, 0], targets, 16, False, 0)) == "none"


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["auto", "off"])
def test_every_tool_on_resumes_exactly_and_tests_with_the_average(tiny_data, tmp_path, monkeypatch, capsys, cache):
    common = ["--data_dir", str(tiny_data), "-e", "3", *TINY_ARGS, "--seed", "2", "--cache", cache, *TOOLS]
    assert trainA.main([*common, "--output_dir", str(tmp_path / "full")]) == 0
    full_dir = only_dir(tmp_path / "full")
    full = read_metrics(full_dir)
    printed = capsys.readouterr().out

    with interrupted_in_epoch(monkeypatch, 3):
        assert trainA.main([*common, "--output_dir", str(tmp_path / "cut")]) == 130
    cut_dir = only_dir(tmp_path / "cut")
    last = torch.load(cut_dir / "last.pt", weights_only=True)
    assert "ema" in last and last["ema"]["updates"] > 0
    assert trainA.main(["--resume", str(cut_dir / "last.pt"), "--num_workers", "0"]) == 0
    keys = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    assert [[r[k] for k in keys] for r in read_metrics(cut_dir)] == [[r[k] for k in keys] for r in full]

    # best.pt holds the averaged weights; --test_only reproduces the reported test accuracy
    best = torch.load(full_dir / "best.pt", weights_only=True)
    last = torch.load(full_dir / "last.pt", weights_only=True)
    averaged = {k[len("module."):]: v for k, v in last["ema"]["averaged"].items() if k.startswith("module.")}
    if best["epoch"] == last["epoch"]:
        assert all(torch.equal(best["model"][k], averaged[k]) for k in best["model"])
    accuracy = [line for line in printed.splitlines() if "test_accuracy" in line][0].split("test_accuracy ")[1][:6]
    capsys.readouterr()
    assert trainA.main(["--test_only", "--checkpoint", str(full_dir / "best.pt"), "--num_workers", "0"]) == 0
    assert f"test_accuracy {accuracy}" in capsys.readouterr().out
    assert trainA.main(["--predict", str(tiny_data / "val" / "fungi"), "--checkpoint", str(full_dir / "last.pt")]) == 0


def test_deeper_blocks_train_and_their_checkpoint_rebuilds_the_same_network(tiny_data, tmp_path, capsys):
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", *TINY_ARGS, "--convs_per_block", "2",
                        "--output_dir", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "features.0.more.0" in printed  # the model table lists the second conv of block 1
    run_dir = only_dir(tmp_path / "r")
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["config"]["convs_per_block"] == 2 and "features.4.more.0.weight" in best["model"]
    accuracy = [line for line in printed.splitlines() if "test_accuracy" in line][0].split("test_accuracy ")[1][:6]
    assert trainA.main(["--test_only", "--checkpoint", str(run_dir / "best.pt"), "--num_workers", "0"]) == 0
    assert f"test_accuracy {accuracy}" in capsys.readouterr().out


def test_train_fraction_run_uses_part_of_train(tiny_data, tmp_path, capsys):
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", *TINY_ARGS, "--train_fraction", "0.5",
                        "--output_dir", str(tmp_path / "r")]) == 0
    assert "data: 12 train, 6 val, 12 test images" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--crop_scale", "0"), ("--jitter", "1"), ("--erasing", "nan"),
                                        ("--auto_augment", "autoaugment"), ("--mixup_alpha", "-1"),
                                        ("--cutmix_alpha", "inf"), ("--ema_decay", "1"), ("--tta", "five_crop"),
                                        ("--train_fraction", "0"), ("--global_pool", "max"),
                                        ("--convs_per_block", "0"), ("--convs_per_block", "1.5"),
                                        ("--crop_pct", "0.5"), ("--crop_pct", "1.1")])
def test_bad_recipe_values_are_one_line_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainA.main([flag, value, "--dry_run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_dry_run_accepts_every_tool():
    result = run_main("trainA.py", "--dry_run", *TOOLS, "--train_fraction", "0.3", "-is", "64")
    assert result.returncode == 0, result.stderr
    assert "AdaptiveAvgPool2d" in result.stdout


def test_a_checkpoint_from_before_the_new_flags_keeps_its_own_augmentation_and_no_tta():
    from utils.config import config_from_dict

    old = {k: v for k, v in dataclasses.asdict(trainA.ConfigA()).items()
           if k not in ("crop_scale", "jitter", "erasing", "tta", "auto_augment", "crop_pct")}
    cfg = config_from_dict(trainA.ConfigA, old)
    assert (cfg.crop_scale, cfg.jitter, cfg.erasing, cfg.tta, cfg.crop_pct) == (0.35, 0.2, 0.1, "none", 0.875)
    assert cfg.auto_augment == "none"
    saved_now = config_from_dict(trainA.ConfigA, dataclasses.asdict(trainA.ConfigA()))
    assert saved_now == trainA.ConfigA()  # a current checkpoint round-trips unchanged


def test_a_checkpoint_from_before_global_pool_avg_became_the_default_still_loads_flattened():
    """Checkpoints written before --global_pool existed flatten the last map (their dense layer
    is as wide as that map); rebuilding them under today's default (avg) must not change that."""
    old_cfg = dataclasses.replace(trainA.ConfigA(), global_pool="none", image_size=64)
    model = trainA.build_model(old_cfg, 3)
    saved = {k: v for k, v in dataclasses.asdict(old_cfg).items() if k != "global_pool"}
    checkpoint = {"config": saved, "class_names": ["a", "b", "c"], "model": model.state_dict()}
    cfg, rebuilt, _ = trainA.rebuild_from_checkpoint(checkpoint)  # strict load: shapes must match
    assert cfg.global_pool == "none" and trainA.ConfigA().global_pool == "avg"
    x = torch.randn(2, 3, 64, 64)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


def test_every_screened_recipe_parses_and_the_table_ranks_by_val(tmp_path):
    """benchmarks/recipes_*.txt (the GPU screens of docs/accuracy.md) hold only valid flags, and
    the screen's table puts runs and recipes in order of best val_accuracy, a cut-off run included."""
    import shlex
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    import screen_recipes

    files = sorted((root / "benchmarks").glob("recipes_*.txt"))
    assert [f.name for f in files] == ["recipes_128.txt", "recipes_next_128.txt"]
    for path in files:
        recipes = screen_recipes.read_recipes(path)
        assert ("defaults", "") in recipes and len(recipes) >= 5, path.name
        for _, flags in recipes:
            trainA.config_from_args(trainA.SPEC.parse_args(["-is", "128", "-e", "30", *shlex.split(flags)]))
    runs = []
    for name, seed, vals in [("a", 0, [0.5, 0.7]), ("b", 0, [0.8]), ("b", 1, [0.62]), ("c", 0, [])]:
        run_dir = tmp_path / f"{name}{seed}"
        run_dir.mkdir()
        if vals:
            with open(run_dir / "metrics.csv", "w") as f:
                f.write("epoch,train_accuracy,val_accuracy,epoch_time_s\n")
                f.writelines(f"{i + 1},0.9,{v},60\n" for i, v in enumerate(vals))
        runs.append((name, "", seed, run_dir))
    text = screen_recipes.table(runs, "-e 2")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:5]] == ["b", "a", "b", "c"]
    assert "| 0.8000 (1) |" in rows[1] and "| 2 | 0.7000 (2) |" in rows[2]
    assert rows[-2].startswith("| b | 0.7100 | 2 |") and rows[-1].startswith("| a | 0.7000 | 1 |")

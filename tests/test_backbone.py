import json
import urllib.error

import pytest
import torch
from torchvision.transforms import v2

import trainB
from conftest import TINY_ARGS, assert_one_line_error, only_dir, run_main
from models import ModelConfigError
from models.backbone import FREEZE_ALL, build_finetune_model
from utils.cli import run_cli

B_ARGS = [a for a in TINY_ARGS if a not in ("-nf", "4", "-fo", "same", "-dn", "16")] + ["--arch", "resnet18",
                                                                                        "--weights", "none",
                                                                                        "--refit", "false"]


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny",
                                  "regnet_y_400mf", "densenet121", "vit_b_16", "swin_t"])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_head_swap_gives_n_outputs_for_each_family(arch, head):
    # Real module tree and shapes without the arithmetic (regnet cannot be built on meta).
    with torch.device("cpu" if arch.startswith("regnet") else "meta"):
        model = build_finetune_model(arch, num_classes=7, weights="none", head=head, head_hidden=16)
        model.freeze_upto(FREEZE_ALL)
        out = model.eval()(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 7)
    trainable, _ = model.count_parameters()
    assert trainable == sum(p.numel() for p in model.head.parameters())


def test_unknown_arch_lists_supported_families():
    with pytest.raises(ModelConfigError, match="resnet50, efficientnet_b0"):
        build_finetune_model("resnet5000", weights="none")
    with pytest.raises(ModelConfigError, match="no known head"):
        build_finetune_model("googlenet", weights="none")


def trainable_prefixes(model) -> set[str]:
    return {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage,expected", [
    ("conv1", {"layer1", "layer2", "layer3", "layer4", "fc"}),
    ("layer1", {"layer2", "layer3", "layer4", "fc"}),
    ("layer2", {"layer3", "layer4", "fc"}),
    ("layer3", {"layer4", "fc"}),
    ("layer4", {"fc"}),
    (FREEZE_ALL, {"fc"}),
    (None, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
])
def test_freeze_upto_is_inclusive_and_keeps_the_head_trainable(stage, expected):
    model = build_finetune_model("resnet18", 5, "none")
    model.freeze_upto(stage)
    assert trainable_prefixes(model) == expected


def test_frozen_batchnorm_running_stats_do_not_move_in_training():
    torch.manual_seed(0)
    model = build_finetune_model("resnet18", 5, "none")
    model.freeze_upto("layer2")
    before = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.randint(0, 5, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(model.named_buffers())
    frozen = [n for n in before if n.startswith(("net.bn1", "net.layer1", "net.layer2"))]
    moving = [n for n in before if n.startswith(("net.layer3", "net.layer4"))]
    assert frozen and moving
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in moving)
    assert not model.net.layer1.training and model.net.layer3.training


def test_parameter_groups_get_discriminative_learning_rates():
    cfg = trainB.ConfigB(arch="resnet18", weights="none", strategy="full", lr=1e-2, backbone_lr=1e-3, lr_decay=0.5)
    model = trainB.build_model(cfg, 5)
    groups = trainB.param_groups(model, cfg)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head.decay"] == 1e-2
    assert lrs["layer4.decay"] == pytest.approx(1e-3)
    assert lrs["layer3.decay"] == pytest.approx(5e-4)
    assert lrs["conv1.decay"] == pytest.approx(1e-3 * 0.5**4)
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("no_decay"))
    in_groups = [p for g in groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups}) == len(list(model.parameters()))


def test_freeze_all_optimizer_holds_only_the_head():
    cfg = trainB.ConfigB(arch="resnet18", weights="none", strategy="freeze_all")
    model = trainB.build_model(cfg, 5)
    params = [p for g in trainB.param_groups(model, cfg) for p in g["params"]]
    assert sum(p.numel() for p in params) == 512 * 5 + 5


def test_eval_transform_follows_the_weights_preset():
    cfg = trainB.ConfigB(arch="resnet50", weights="IMAGENET1K_V2")
    steps = trainB.eval_transform(cfg).transforms
    resize = next(t for t in steps if isinstance(t, v2.Resize))
    crop = next(t for t in steps if isinstance(t, v2.CenterCrop))
    assert resize.size == [232] and list(crop.size) == [224, 224]
    cfg = trainB.ConfigB(arch="resnet50", weights="IMAGENET1K_V1")
    assert next(t for t in trainB.eval_transform(cfg).transforms if isinstance(t, v2.Resize)).size == [256]


def test_weights_that_cannot_be_downloaded_give_one_line_naming_the_file(monkeypatch, capsys, tmp_path, tiny_data):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code = run_cli(trainB.main, ["--data_dir", str(tiny_data), "--arch", "resnet18", "--weights", "DEFAULT",
                                 "--output_dir", str(tmp_path / "runs"), "--wandb_mode", "disabled"], prog="trainB.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "could not download ResNet18_Weights.IMAGENET1K_V1" in err[0]
    assert "resnet18-f37072fd.pth" in err[0] and str(tmp_path / "torch") in err[0] and "--weights PATH" in err[0]


def test_weights_from_a_file(tmp_path):
    reference = build_finetune_model("resnet18", 5, "none").net
    torch.manual_seed(1)
    source = __import__("torchvision").models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_finetune_model("resnet18", 5, str(tmp_path / "r18.pth"))
    assert torch.equal(model.net.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert not torch.equal(model.net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    torch.save({"junk": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ModelConfigError, match="does not fit resnet18"):
        build_finetune_model("resnet18", 5, str(tmp_path / "bad.pth"))


@pytest.mark.parametrize("strategy", [["--strategy", "freeze_all"], ["--strategy", "freeze_upto", "--freeze_upto", "layer2"],
                                      ["--strategy", "full"], ["--strategy", "gradual", "--head_epochs", "1"]])
def test_each_strategy_runs_end_to_end_and_test_only_reproduces(tiny_data, tmp_path, strategy, capsys):
    out = tmp_path / "runs"
    assert trainB.main(["--data_dir", str(tiny_data), "-e", "2", "--output_dir", str(out), *B_ARGS, *strategy]) == 0
    run_dir = only_dir(out)
    for name in ("config.json", "metrics.csv", "best.pt", "last.pt", "test_metrics.json"):
        assert (run_dir / name).is_file()
    printed = capsys.readouterr().out
    assert "parameters train" in printed and "frozen" in printed
    if strategy[1] == "gradual":
        assert "epoch 2: backbone unfrozen" in printed
    accuracy = json.loads((run_dir / "test_metrics.json").read_text())["test_accuracy"]
    assert trainB.main(["--test_only", "--checkpoint", str(run_dir / "best.pt"), "--num_workers", "0"]) == 0
    assert f"test_accuracy {accuracy:.4f}" in capsys.readouterr().out


def test_gradual_resume_after_unfreezing_keeps_everything_trainable(tiny_data, tmp_path):
    out = tmp_path / "runs"
    args = ["--data_dir", str(tiny_data), "--output_dir", str(out), *B_ARGS, "--strategy", "gradual", "--head_epochs", "1"]
    assert trainB.main([*args, "-e", "2"]) == 0
    run_dir = only_dir(out)
    assert trainB.main(["--resume", str(run_dir / "last.pt"), "-e", "3", "--num_workers", "0"]) == 0
    assert (run_dir / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs


@pytest.mark.parametrize("argv,needle", [
    (["--strategy", "bogus"], "'bogus' is not one of freeze_all, freeze_upto, full, gradual"),
    (["--strategy", "freeze_upto", "--freeze_upto", "layer9"], "layer9 is not a stage of resnet50; choose middle or one of conv1, layer1"),
    (["--arch", "vit_b_16", "--image_size", "128", "--dry_run"], "only 224x224"),
    (["--weights", "IMAGENET9K"], "neither a weights name for resnet50"),
])
def test_bad_part_b_flags_are_one_line(argv, needle):
    assert_one_line_error(run_main("trainB.py", *argv, "--wandb_mode", "disabled"), needle)


def test_checkpoint_of_the_other_script_is_refused(tiny_data, tmp_path, capsys):
    import trainA

    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "a"), *TINY_ARGS]) == 0
    run_dir = only_dir(tmp_path / "a")
    code = run_cli(trainB.main, ["--test_only", "--checkpoint", str(run_dir / "best.pt")], prog="trainB.py")
    assert code == 2 and "written by trainA.py" in capsys.readouterr().err


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_feature_cache_matches_the_plain_path_within_noise(tmp_path, cache, capsys):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "easy", classes=("amphibia", "fungi", "insecta", "mammalia"),
                        train_per_class=16, test_per_class=6)
    accuracy = {}
    for feature_cache in ("true", "false"):
        out = tmp_path / f"runs-{feature_cache}"
        assert trainB.main(["--data_dir", str(data), "-e", "4", "--output_dir", str(out), *B_ARGS, "--strategy",
                            "freeze_all", "-da", "false", "--feature_cache", feature_cache, "--cache", cache, "--probe_epochs", "0",
                            "-lr", "0.01", "--seed", "3"]) == 0
        run_dir = only_dir(out)
        accuracy[feature_cache] = json.loads((run_dir / "test_metrics.json").read_text())["test_accuracy"]
        if feature_cache == "true":
            assert "computed once" in capsys.readouterr().out
            # best.pt holds the whole model, so --test_only (on images) gives the same accuracy.
            assert trainB.main(["--test_only", "--checkpoint", str(run_dir / "best.pt"), "--num_workers", "0"]) == 0
            assert f"test_accuracy {accuracy['true']:.4f}" in capsys.readouterr().out
    assert accuracy["true"] >= 0.5 and accuracy["false"] >= 0.5, accuracy  # chance is 0.25
    assert abs(accuracy["true"] - accuracy["false"]) <= 0.2, accuracy


def test_feature_cache_applies_only_to_freeze_all():
    assert trainB.plan_for(trainB.ConfigB(strategy="freeze_all", data_aug=False)).on_features
    assert trainB.plan_for(trainB.ConfigB(strategy="freeze_all", data_aug=True)).on_features
    assert not trainB.plan_for(trainB.ConfigB(strategy="freeze_all", feature_cache="false")).on_features
    assert trainB.plan_for(trainB.ConfigB(strategy="freeze_all", feature_cache="true")).on_features
    assert not trainB.plan_for(trainB.ConfigB(strategy="full", feature_cache="true")).on_features


@pytest.mark.parametrize("arch,middle", [("resnet50", "layer2"), ("tf_efficientnet_lite0", "blocks.3")])
def test_freeze_upto_middle_fits_every_arch_and_is_the_default(arch, middle, capsys):
    """--freeze_upto's default names the stage halfway down, so freeze_upto runs on any arch
    (it was ResNet's layer2, which stopped a Lite0 run with 'not a stage')."""
    pytest.importorskip("timm")
    assert trainB.ConfigB().freeze_upto == "middle"
    cfg = trainB.ConfigB(arch=arch, weights="none", strategy="freeze_upto")
    model = trainB.build_structure(cfg)
    assert model.stage_named("middle") == middle
    upto = model.stage_names().index(middle) + 1
    assert set(model.frozen) == {path for _, paths in model.stages()[:upto] for path in paths}
    assert 0 < upto < len(model.stage_names())  # some stages frozen, some train
    assert trainB.main(["--strategy", "freeze_upto", "--arch", arch, "--weights", "none", "--dry_run"]) == 0
    assert "stages " in capsys.readouterr().out

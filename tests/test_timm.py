"""timm as part B's second model source, and weights from a file of another implementation.
timm's own test models (test_efficientnet: 0.36 M parameters) keep the runs to seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import trainB
from conftest import ROOT, assert_one_line_error, interrupted_in_epoch, only_dir, run_main
from models import ModelConfigError
from models.backbone import FREEZE_ALL, build_finetune_model
from models.weights import create_network, load_weights_file, resolve_arch
from utils.errors import EXIT_INTERRUPTED

pytest.importorskip("timm")

ARCH = "test_efficientnet"
ARGS = ["--arch", ARCH, "--weights", "none", "-is", "32", "-b", "8", "--num_workers", "0", "--wandb_mode",
        "disabled", "--amp", "off", "--channels_last", "false", "--no_pictures", "--refit", "false"]


def test_a_name_both_sources_have_is_torchvisions_and_timm_slash_asks_timm():
    assert resolve_arch("resnet50") == ("torchvision", "resnet50")
    assert resolve_arch("timm/resnet50") == ("timm", "resnet50")
    assert resolve_arch("torchvision/resnet50") == ("torchvision", "resnet50")
    assert resolve_arch("tf_efficientnet_lite0") == ("timm", "tf_efficientnet_lite0")
    assert type(build_finetune_model("timm/resnet18", 3, "none").net).__module__.startswith("timm")


def test_timm_stages_are_named_by_their_modules_and_freeze_inclusively():
    model = build_finetune_model(ARCH, 3, "none")
    assert model.stage_names() == ["conv_stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]
    model.freeze_upto("blocks.1")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("net.conv_stem", "net.bn1", "net.blocks.0.", "net.blocks.1.")) for n in trainable)
    assert any(n.startswith("net.blocks.2.") for n in trainable) and "net.classifier.weight" in trainable
    model.freeze_upto(FREEZE_ALL)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"net.classifier.weight",
                                                                         "net.classifier.bias"}
    model.train()
    assert not model.net.blocks[0].training and model.net.classifier.training


def test_features_are_the_heads_input():
    model = build_finetune_model(ARCH, 3, "none", head="mlp", head_hidden=8).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.head(model.features(images)), model(images), atol=1e-6)


@pytest.mark.parametrize("strategy", [["--strategy", "freeze_all", "--probe_epochs", "2"],
                                      ["--strategy", "freeze_upto", "--freeze_upto", "blocks.2"],
                                      ["--strategy", "full", "--probe_epochs", "3"],
                                      ["--strategy", "gradual", "--head_epochs", "1"]])
def test_each_strategy_runs_a_timm_model_and_test_only_and_predict_reproduce(tiny_data, tmp_path, strategy, capsys):
    out = tmp_path / "runs"
    assert trainB.main(["--data_dir", str(tiny_data), "-e", "2", "--output_dir", str(out), *ARGS, *strategy]) == 0
    run_dir = only_dir(out)
    printed = capsys.readouterr().out
    assert "preprocessing: mean (0.485, 0.456, 0.406)" in printed
    if "freeze_all" in strategy:  # the probe's features are the feature cache's: computed once
        assert "images reused from the probe" in printed and printed.count("computed once") == 1  # the probe's
    if "--probe_epochs" in strategy:
        assert f"probe: the head trained alone for {strategy[3]} epochs" in printed
    accuracy = json.loads((run_dir / "test_metrics.json").read_text())["test_accuracy"]
    assert trainB.main(["--test_only", "--checkpoint", str(run_dir / "best.pt"), "--num_workers", "0"]) == 0
    assert f"test_accuracy {accuracy:.4f}" in capsys.readouterr().out
    image = next((tiny_data / "val" / "fungi").iterdir())
    assert trainB.main(["--predict", str(image), "--checkpoint", str(run_dir / "best.pt")]) == 0
    assert image.name in capsys.readouterr().out


def test_a_timm_run_interrupted_and_resumed_matches_an_uninterrupted_one(tiny_data, tmp_path, monkeypatch):
    args = ["--data_dir", str(tiny_data), *ARGS, "--strategy", "gradual", "--head_epochs", "1", "--seed", "1",
            "-e", "3"]
    assert trainB.main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    with interrupted_in_epoch(monkeypatch, 3):
        assert trainB.main([*args, "--output_dir", str(tmp_path / "part")]) == EXIT_INTERRUPTED
    (part,) = (tmp_path / "part").iterdir()
    assert trainB.main(["--resume", str(part / "last.pt"), "--num_workers", "0"]) == 0
    (whole,) = (tmp_path / "whole").iterdir()
    assert (whole / "metrics.csv").read_text().splitlines()[3].split(",")[:5] == \
        (part / "metrics.csv").read_text().splitlines()[3].split(",")[:5]


def test_a_timm_model_under_torchrun_with_its_refit(tiny_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "trainB.py"), "--data_dir", str(tiny_data), "-e", "1", "--device", "cpu",
                             "--output_dir", str(tmp_path / "runs"), *ARGS, "--strategy", "gradual",
                             "--head_epochs", "0", "--refit", "true"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_dir(tmp_path / "runs")
    results = json.loads((run_dir / "test_metrics.json").read_text())
    assert results["test_images"] == 12 and results["tested"] == "refit.pt"  # both ranks refit, rank 0 saves
    assert "refit epoch 1/1" in result.stdout and (run_dir / "refit.pt").exists()


def renamed(state: dict) -> dict:
    """The same tensors under another implementation's names, in the same order."""
    return {f"_layer{i}.{key.rsplit('.', 1)[-1]}": value for i, (key, value) in enumerate(state.items())}


def test_a_file_with_other_names_loads_by_order_and_shape(tmp_path):
    torch.manual_seed(3)
    source = create_network("timm", ARCH, "none")
    torch.save(renamed(source.state_dict()), tmp_path / "port.pth")
    target = create_network("timm", ARCH, "none")
    assert "by order" in load_weights_file(target, tmp_path / "port.pth", ARCH)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    # without BatchNorm's step counters (TensorFlow ports have none) it still lines up
    no_counters = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": renamed(no_counters)}, tmp_path / "port2.pth")
    assert "by order" in load_weights_file(create_network("timm", ARCH, "none"), tmp_path / "port2.pth", ARCH)


def test_a_file_that_fits_nothing_is_refused_naming_the_first_shape_that_differs(tmp_path):
    state = renamed(create_network("timm", ARCH, "none").state_dict())
    key = list(state)[3]
    state[key] = torch.zeros(7, 7)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ModelConfigError, match=rf"{key} \(7, 7\) differs from bn1\.running_mean \(\d+,\)"):
        create_network("timm", ARCH, str(tmp_path / "odd.pth"))
    torch.save(dict(list(state.items())[:10]), tmp_path / "short.pth")
    with pytest.raises(ModelConfigError, match=r"holds \d+ tensors, test_efficientnet has \d+"):
        create_network("timm", ARCH, str(tmp_path / "short.pth"))


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "tf_efficientnet_lite00"], "unknown --arch 'tf_efficientnet_lite00'"),
    (["--arch", "timm/resnet5000"], "timm has no model 'resnet5000'"),
    (["--arch", ARCH, "--strategy", "freeze_upto", "--freeze_upto", "blocks.9"],
     "blocks.9 is not a stage of test_efficientnet; choose middle or one of conv_stem, blocks.0, blocks.1"),
    (["--arch", ARCH, "--weights", "missing.pth"], "--weights missing.pth is neither a weights name"),
    (["--arch", "test_vit", "--image_size", "64"], "only 160x160 inputs"),
    (["--norm", "tf"], "'tf' is not one of auto, imagenet, half"),
])
def test_bad_timm_flags_are_one_line(argv, needle):
    assert_one_line_error(run_main("trainB.py", *argv, "--dry_run", "--wandb_mode", "disabled"), needle)


def test_a_timm_download_that_fails_is_one_line_naming_what_to_do(tiny_data, tmp_path, monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("[Errno -2] Name or service not known\nwhile requesting HEAD https://huggingface.co/...")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    result = run_main("trainB.py", "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "runs"),
                      "--arch", ARCH, "--weights", "DEFAULT", "-is", "32", "--wandb_mode", "disabled")
    assert_one_line_error(result, f"could not download timm's weights of {ARCH}", "pass --weights PATH")
    assert not (tmp_path / "runs").exists()


def _no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_without_a_network_timm_weights_fail_at_once_instead_of_retrying(monkeypatch):
    """timm's hub download retries for about a minute with no network (50 s measured); one try
    of the host decides, and the download is never started."""
    import huggingface_hub
    import timm

    from models.weights import WeightsUnavailable, create_network

    _no_network(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    real, asked = timm.create_model, []

    def recording(name, pretrained=False, **kwargs):
        asked.append(pretrained)
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    with pytest.raises(WeightsUnavailable, match="huggingface.co cannot be reached.*pass --weights PATH"):
        create_network("timm", ARCH, "DEFAULT")
    assert True not in asked


def test_without_a_network_timm_weights_already_downloaded_are_used(monkeypatch, tmp_path):
    import huggingface_hub
    import timm

    from models.weights import create_network

    torch.manual_seed(3)
    saved = timm.create_model(ARCH).state_dict()
    torch.save(saved, tmp_path / "pytorch_model.bin")
    _no_network(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename, **k: str(tmp_path / filename) if filename == "pytorch_model.bin" else None)
    net = create_network("timm", ARCH, "DEFAULT")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())

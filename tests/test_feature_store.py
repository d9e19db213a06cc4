"""freeze_all computes each backbone feature once a run (probe, epochs, refit and both tests
share them) and keeps them on disk across runs, keyed by files, framing, views and the
backbone's weights: a second run of a sweep over the head's flags runs no image through the
backbone; a changed file or other weights compute again."""

from __future__ import annotations

import json
import os

import pytest
import torch

import trainB
from conftest import only_dir, write_image
from models.backbone import FineTuneNet
from utils.feature_store import FeatureStore, store_dir

pytest.importorskip("timm")

B_ARGS = ["--arch", "test_efficientnet", "--weights", "none", "-is", "32", "-b", "8", "--num_workers", "0",
          "--wandb_mode", "disabled", "--amp", "off", "--channels_last", "false", "--no_pictures",
          "--strategy", "freeze_all", "-e", "2", "--probe_epochs", "3"]


@pytest.fixture
def backbone_passes(monkeypatch):
    """Images that went through a FineTuneNet's backbone (its features()), counted."""
    count = {"images": 0}
    real = FineTuneNet.features

    def counted(self, x):
        count["images"] += x.shape[0]
        return real(self, x)

    monkeypatch.setattr(FineTuneNet, "features", counted)
    return count


def run(tiny_data, tmp_path, *extra, name="run"):
    out = tmp_path / name
    argv = ["-p", str(tiny_data), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), *B_ARGS, *extra]
    assert trainB.main(argv) == 0
    run_dir = only_dir(out)
    return run_dir, json.loads((run_dir / "test_metrics.json").read_text())


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_each_image_goes_through_the_backbone_once_per_view_in_a_run(tiny_data, tmp_path, backbone_passes, cache,
                                                                     capsys):
    # tiny_data: 24 train, 6 val (of 30), 12 test images; --tta flip: val and test with mirrors
    run_dir, metrics = run(tiny_data, tmp_path, "--cache", cache, "--tta", "flip")
    assert backbone_passes["images"] == 24 + 2 * 6 + 2 * 12
    assert (run_dir / "refit.pt").is_file() and metrics["tested"] == "refit.pt"
    assert "best_pt_test_accuracy" in metrics


def test_a_second_run_over_the_heads_flags_reads_the_features(tiny_data, tmp_path, backbone_passes, capsys):
    run(tiny_data, tmp_path, "--tta", "flip", name="first")
    assert backbone_passes["images"] == 24 + 2 * 6 + 2 * 12
    entries = list(store_dir(str(tmp_path / "cache")).glob("*.pt"))
    assert len(entries) == 3  # train, val with mirrors, test with mirrors
    backbone_passes["images"] = 0
    _, metrics = run(tiny_data, tmp_path, "--tta", "flip", "--lr", "0.003", "--head_dropout", "0.5", name="second")
    assert backbone_passes["images"] == 0
    assert "features read from" in capsys.readouterr().out
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_stored_features_give_the_numbers_computed_ones_give(tiny_data, tmp_path, capsys):
    _, first = run(tiny_data, tmp_path, name="first")
    _, second = run(tiny_data, tmp_path, name="second")  # everything read from the store
    _, fresh = run(tiny_data, tmp_path, "--cache", "off", name="fresh")  # nothing stored, computed again
    for key in ("test_accuracy", "test_loss", "best_val_accuracy", "best_pt_test_accuracy"):
        assert first[key] == second[key] == fresh[key], key


def test_a_changed_file_or_other_weights_compute_again(tiny_data, tmp_path, backbone_passes, capsys):
    run(tiny_data, tmp_path, "--tta", "none", name="first")
    assert backbone_passes["images"] == 24 + 6 + 12
    # one test image replaced by other content under the same name: only the test split again
    victim = sorted((tiny_data / "val" / "fungi").iterdir())[0]
    write_image(victim, (10, 10, 10), seed=123)
    os.utime(victim, ns=(1, 1))
    backbone_passes["images"] = 0
    run(tiny_data, tmp_path, "--tta", "none", name="second")
    assert backbone_passes["images"] == 12
    # other weights (--seed changes nothing of a backbone file, so give one): everything again
    import timm

    torch.manual_seed(7)
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), tmp_path / "other.pth")
    backbone_passes["images"] = 0
    run(tiny_data, tmp_path, "--tta", "none", "--weights", str(tmp_path / "other.pth"), name="third")
    assert backbone_passes["images"] == 24 + 6 + 12


def test_a_broken_entry_is_computed_again_and_an_unwritable_store_only_warns(tmp_path, capsys):
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(3, 4), torch.tensor([0, 1, 2])

    store = FeatureStore(tmp_path / "features")
    store.get("k", compute, torch.device("cpu"))
    (tmp_path / "features" / "k.pt").write_bytes(b"not a torch file")
    (features, labels), reused = store.get("k", compute, torch.device("cpu"))
    assert not reused and len(calls) == 2 and "unreadable" in capsys.readouterr().err
    assert store.get("k", compute, torch.device("cpu"))[1] is True
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    (features, _), reused = FeatureStore(blocked / "features").get("k", compute, torch.device("cpu"))
    assert features.shape == (3, 4) and not reused
    assert "cannot keep features" in capsys.readouterr().err


def test_file_names_that_are_not_utf8_key_the_store_as_they_key_the_decoded_images(tmp_path, capsys):
    """The store's key reads the file names as the decoded-image cache does (os.fsencode): a class
    folder whose name is not valid UTF-8 trains with its features stored and read back."""
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data", classes=("amphibia", "fungi"))
    for split in ("train", "val"):
        os.rename(os.fsencode(data / split / "fungi"), os.fsencode(data / split) + b"/pilz_\xff")
    from utils.cli import run_cli  # as a user runs it: the names print with escapes

    for name in ("first", "second"):
        argv = ["-p", str(data), "--output_dir", str(tmp_path / name), "--cache_dir", str(tmp_path / "cache"), *B_ARGS]
        assert run_cli(trainB.main, argv, prog="trainB.py") == 0
    assert "features read from" in capsys.readouterr().out

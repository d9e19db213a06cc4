"""--refit: after the epochs, a fresh model trained the same way on the train and val images
together for best.pt's number of epochs, saved as refit.pt and tested (its test is the run's
test_accuracy; best.pt's is reported beside it)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import trainA
import trainB
import utils.train
from conftest import TINY_ARGS, assert_one_line, assert_one_line_error, only_dir, read_metrics, run_main, state_of
from utils.errors import EXIT_DIVERGED, EXIT_INTERRUPTED

pytest.importorskip("timm")

TRAIN_ONE_EPOCH = utils.train.train_one_epoch  # the real one, before any test patches it

B_ARGS = ["--arch", "test_efficientnet", "--weights", "none", "-is", "32", "-b", "8", "--num_workers", "0",
          "--wandb_mode", "disabled", "--amp", "off", "--channels_last", "false", "--no_pictures", "--patience", "0"]


@pytest.fixture
def val_peaks_at_epoch_2(monkeypatch):
    """Validation says 0.5, 0.9, 0.7, ... whatever the model does, so best.pt is epoch 2 of 3."""
    real = utils.train.evaluate
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.6])

    def scored(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), accuracy=next(scores))

    monkeypatch.setattr(utils.train, "evaluate", scored)


@pytest.fixture
def nth_epoch_fails(monkeypatch):
    """fail(n, error): the n-th epoch trained in this process (counting the refit's) raises error."""
    real = utils.train.train_one_epoch

    def fail(n: int, error: BaseException) -> None:
        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise error
            return real(*args, **kwargs)

        monkeypatch.setattr(utils.train, "train_one_epoch", counted)
    return fail


def test_part_b_refits_by_default_part_a_does_not():
    assert trainB.ConfigB().refit is True and trainA.ConfigA().refit is False
    assert trainB.main(["--dry_run", "--arch", "resnet18", "--weights", "none"]) == 0  # parses with the default


def refit_lines(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith("refit epoch ")]


def test_refit_trains_a_fresh_model_on_train_and_val_for_best_pt_epochs_on_the_same_schedule(
        tiny_data, tmp_path, capsys, val_peaks_at_epoch_2):
    out = tmp_path / "runs"
    argv = ["--data_dir", str(tiny_data), "-e", "3", "--output_dir", str(out), *B_ARGS, "--strategy", "full",
            "--probe_epochs", "2", "--refit"]
    assert trainB.main(argv) == 0
    run_dir, printed = only_dir(out), capsys.readouterr().out
    assert "data: 24 train, 6 val" in printed
    assert "refit: a fresh model on the 30 train and val images for 2 epochs (best.pt's)" in printed
    # The schedule is the run's: each refit epoch starts at the learning rate the run's epoch did.
    run_lrs = [f"{float(row['lr']):.2e}" for row in read_metrics(run_dir)][:2]
    assert [re.search(r"lr (\S+)", line).group(1) for line in refit_lines(printed)] == run_lrs
    assert "probe: the head trained alone for 2 epochs on frozen features of 30 train images" in printed
    results = json.loads((run_dir / "test_metrics.json").read_text())
    assert results["tested"] == "refit.pt" and results["best_epoch"] == 2
    assert {"best_pt_test_accuracy", "best_pt_test_loss"} <= results.keys()
    assert f"refit.pt (2 epochs on train + val): test_loss {results['test_loss']:.4f}" in printed
    refit, best = (torch.load(run_dir / name, weights_only=True) for name in ("refit.pt", "best.pt"))
    assert refit["refit_epochs"] == 2 and refit["config"]["refit"] is True
    assert any(not torch.equal(refit["model"][k], best["model"][k]) for k in best["model"])
    assert state_of(run_dir)["state"] == "finished"
    # refit.pt is a checkpoint like best.pt: --test_only reproduces the run's test of it.
    assert trainB.main(["--test_only", "--checkpoint", str(run_dir / "refit.pt"), "--num_workers", "0"]) == 0
    assert f"test_accuracy {results['test_accuracy']:.4f}" in capsys.readouterr().out


def test_refit_on_cached_features_trains_the_head_on_train_and_val_features(tiny_data, tmp_path, capsys):
    assert trainB.main(["--data_dir", str(tiny_data), "-e", "2", "--output_dir", str(tmp_path / "runs"), *B_ARGS,
                        "--strategy", "freeze_all", "--refit"]) == 0
    printed = capsys.readouterr().out
    best_epoch = json.loads((only_dir(tmp_path / "runs") / "test_metrics.json").read_text())["best_epoch"]
    assert printed.count("images reused from the probe") == 1  # the run's 24 + 6 (and mirrors)
    assert "frozen features of 30 images reused from the run (train and val)" in printed  # the refit's
    assert len(refit_lines(printed)) == best_epoch


def test_ctrl_c_in_the_refit_keeps_the_run_and_resume_runs_only_the_refit(tiny_data, tmp_path, capsys, nth_epoch_fails,
                                                                          monkeypatch):
    out = tmp_path / "runs"
    nth_epoch_fails(3, KeyboardInterrupt())  # epochs 1 and 2, then the refit's first
    argv = ["--data_dir", str(tiny_data), "-e", "2", "--output_dir", str(out), *B_ARGS, "--strategy", "full",
            "--probe_epochs", "0", "--refit"]
    assert trainB.main(argv) == EXIT_INTERRUPTED
    run_dir = only_dir(out)
    err = capsys.readouterr().err
    assert "best.pt, last.pt kept" in err and f"--resume {run_dir / 'last.pt'}" in err
    assert not (run_dir / "refit.pt").exists() and not (run_dir / "test_metrics.json").exists()
    assert state_of(run_dir)["state"] == "interrupted"
    monkeypatch.setattr(utils.train, "train_one_epoch", TRAIN_ONE_EPOCH)
    built = []
    real_build = trainB.build_model
    monkeypatch.setattr(trainB, "build_model", lambda cfg, n=10, weights=None: built.append(weights) or
                        real_build(cfg, n, weights))
    assert trainB.main(["--resume", str(run_dir / "last.pt"), "--num_workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert len(read_metrics(run_dir)) == 2 and "epoch 3/" not in printed  # no epoch past the run's
    assert len(refit_lines(printed)) >= 1 and (run_dir / "refit.pt").exists()
    # the refit's fresh model starts from the pretrained weights (--weights), not from none
    assert built[-1] is None
    assert json.loads((run_dir / "test_metrics.json").read_text())["tested"] == "refit.pt"


def test_a_nan_in_the_refit_is_one_line_and_keeps_best_pt(tiny_data, tmp_path, capsys, nth_epoch_fails):
    nth_epoch_fails(2, utils.train.NonFiniteLoss(1, 3))
    argv = ["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "runs"), *B_ARGS,
            "--strategy", "full", "--probe_epochs", "0", "--refit"]
    assert trainB.main(argv) == EXIT_DIVERGED
    run_dir = only_dir(tmp_path / "runs")
    assert_one_line(capsys.readouterr().err, "the refit stopped: loss became NaN/inf", "best.pt is kept",
                    "--test_only --checkpoint")
    assert (run_dir / "best.pt").exists() and not (run_dir / "refit.pt").exists()
    assert state_of(run_dir)["state"] == "failed"


def test_a_finished_run_refits_on_resume_with_refit_and_not_twice(tiny_data, tmp_path, capsys):
    out = tmp_path / "runs"
    # --cache off: the refit streams the train and val images through a DataLoader, as the run did
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "2", "--output_dir", str(out), *TINY_ARGS,
                        "--cache", "off"]) == 0
    run_dir = only_dir(out)
    assert not (run_dir / "refit.pt").exists()
    before = json.loads((run_dir / "test_metrics.json").read_text())
    capsys.readouterr()
    assert trainA.main(["--resume", str(run_dir / "last.pt"), "--refit", "--num_workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert len(refit_lines(printed)) == before["best_epoch"] and len(read_metrics(run_dir)) == 2
    after = json.loads((run_dir / "test_metrics.json").read_text())
    assert after["tested"] == "refit.pt" and after["best_pt_test_accuracy"] == pytest.approx(before["test_accuracy"])
    # with refit.pt written there is nothing left to do
    assert_one_line_error(run_main("trainA.py", "--resume", str(run_dir / "last.pt"), "--refit"), "nothing to train")


def test_a_full_disk_when_refit_pt_is_written_is_one_line_and_state_says_failed(tiny_data, tmp_path, capsys,
                                                                                monkeypatch):
    import utils.checkpoint

    real = utils.checkpoint.atomic_torch_save

    def full_disk(obj, path):
        if str(path).endswith("refit.pt"):
            raise OSError(28, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(utils.checkpoint, "atomic_torch_save", full_disk)
    argv = ["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "runs"), *B_ARGS,
            "--strategy", "freeze_all", "--refit"]
    assert trainB.main(argv) == EXIT_DIVERGED
    run_dir = only_dir(tmp_path / "runs")
    assert_one_line(capsys.readouterr().err, "could not write refit.pt", "No space left on device")
    assert (run_dir / "best.pt").exists() and (run_dir / "last.pt").exists()
    assert state_of(run_dir)["state"] == "failed"

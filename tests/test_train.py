import json
from types import SimpleNamespace

import pytest
import torch

import trainA
import utils.train
from conftest import TINY_ARGS, epoch_of, interrupted_in_epoch, make_dataset, only_dir, read_metrics
from utils.runtime import Precision
from utils.checkpoint import CheckpointWriter
from utils.distributed import DistInfo
from utils.optim import Optimisation
from utils.train import FitInputs, NonFiniteLoss, fit




@pytest.mark.parametrize("cache", ["auto", "off"])
def test_end_to_end_run_leaves_a_complete_run_directory(tiny_data, tmp_path, capsys, cache):
    out = tmp_path / "runs"
    code = trainA.main(["--data_dir", str(tiny_data), "-e", "2", "--output_dir", str(out), *TINY_ARGS,
                        "--cache", cache])
    assert code == 0
    run_dir = only_dir(out)
    for name in ("config.json", "metrics.csv", "best.pt", "last.pt", "test_metrics.json", "model_summary.txt"):
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["class_names"] == ["amphibia", "fungi", "insecta"]
    assert best["config"]["num_filters"] == 4 and best["script"] == "trainA"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["image_size"] == 32 and config["class_names"] == best["class_names"]
    results = json.loads((run_dir / "test_metrics.json").read_text())
    assert results["test_images"] == 12
    printed = capsys.readouterr().out
    assert f"test_accuracy {results['test_accuracy']:.4f}" in printed

    # --test_only needs nothing but the checkpoint and reproduces the reported accuracy.
    code = trainA.main(["--test_only", "--checkpoint", str(run_dir / "best.pt"), "--num_workers", "0",
                        "--cache", cache])
    assert code == 0
    assert f"test_accuracy {results['test_accuracy']:.4f}" in capsys.readouterr().out


def test_offline_wandb_run_logs_and_writes_local_files(tiny_data, tmp_path):
    out = tmp_path / "runs"
    args = [a if a != "disabled" else "offline" for a in TINY_ARGS]
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *args]) == 0
    run_dir = only_dir(out)
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(read_metrics(run_dir)) == 1


class SimulatedKill(BaseException):
    """Stands in for SIGKILL: nothing in fit() may catch it or save on the way out."""


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    common = ["--data_dir", str(tiny_data), "-e", "3", *TINY_ARGS, "-da", "true", "--seed", "5"]
    assert trainA.main([*common, "--output_dir", str(tmp_path / "full")]) == 0
    full = read_metrics(only_dir(tmp_path / "full"))

    real = utils.train.train_one_epoch

    def dies_in_epoch_3(*args, **kwargs):
        if epoch_of(args, kwargs) == 3:
            raise SimulatedKill
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.train, "train_one_epoch", dies_in_epoch_3)
    with pytest.raises(SimulatedKill):
        trainA.main([*common, "--output_dir", str(tmp_path / "cut")])
    monkeypatch.setattr(utils.train, "train_one_epoch", real)
    run_dir = only_dir(tmp_path / "cut")
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2
    assert trainA.main(["--resume", str(run_dir / "last.pt"), "--num_workers", "0"]) == 0
    resumed = read_metrics(run_dir)
    keys = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def test_ctrl_c_saves_last_pt_and_exits_130(tiny_data, tmp_path, monkeypatch, capsys):
    with interrupted_in_epoch(monkeypatch, 2):
        code = trainA.main(["--data_dir", str(tiny_data), "-e", "3", "--output_dir", str(tmp_path / "runs"), *TINY_ARGS])
    assert code == 130
    run_dir = only_dir(tmp_path / "runs")
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["interrupted"] is True and last["epoch"] == 1
    err = capsys.readouterr().err
    assert "interrupted during epoch 2" in err and f"--resume {run_dir / 'last.pt'}" in err
    assert trainA.main(["--resume", str(run_dir / "last.pt"), "--num_workers", "0"]) == 0
    assert [r["epoch"] for r in read_metrics(run_dir)] == ["1", "2", "3"]


class NaNAfter(torch.nn.Module):
    """Cross-entropy that turns NaN from a given call on, like a diverging run."""

    def __init__(self, bad_from_call: int):
        super().__init__()
        self.calls, self.bad_from_call = 0, bad_from_call

    def forward(self, logits, targets):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls >= self.bad_from_call else loss


def test_nan_loss_stops_with_epoch_and_step_and_keeps_best(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    data = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(NonFiniteLoss) as info:
        opt = Optimisation(optimizer, scheduler, NaNAfter(8))
        fit(FitInputs(model, data, data[:2], Precision(torch.device("cpu")), "none", 3), opt,
            CheckpointWriter(tmp_path, {"config": {}}, model, opt, DistInfo()), SimpleNamespace(epochs=3, patience=0, seed=0),
            log_epoch=lambda m: None)
    assert (info.value.epoch, info.value.step) == (2, 3)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())


def test_huge_learning_rate_run_stops_cleanly(tiny_data, tmp_path, capsys):
    code = trainA.main(["--data_dir", str(tiny_data), "-e", "3", "--output_dir", str(tmp_path), *TINY_ARGS,
                        "-lr", "1e12", "--optimizer", "sgd", "-bn", "false", "--warmup_epochs", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "loss became NaN/inf at epoch 1, step" in err and "lower --lr" in err


def test_learns_an_easy_task_well_above_chance(tmp_path):
    data = make_dataset(tmp_path / "easy", classes=("amphibia", "fungi", "insecta", "mammalia"),
                        train_per_class=24, test_per_class=8)
    out = tmp_path / "runs"
    args = [a if a != "4" else "8" for a in TINY_ARGS]  # 8 filters
    assert trainA.main(["--data_dir", str(data), "-e", "6", "--output_dir", str(out), *args, "-da", "false",
                        "-lr", "3e-3"]) == 0
    results = json.loads((only_dir(out) / "test_metrics.json").read_text())
    assert results["test_accuracy"] >= 0.75, results  # chance is 0.25


def test_compile_flag_compiles_the_trained_model_and_checkpoints_stay_plain(tiny_data, tmp_path, monkeypatch):
    compiled = []

    def fake_compile(model, **kwargs):  # the real one needs a compiler toolchain and minutes
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *TINY_ARGS,
                        "--compile", "true"]) == 0
    assert len(compiled) == 1
    state = torch.load(only_dir(out) / "best.pt", weights_only=True)["model"]
    assert not any(key.startswith("_orig_mod") for key in state)

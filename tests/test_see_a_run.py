"""Seeing runs without wandb: curves.png, `python -m utils.runs_table`, --lr_find, full-colour pictures."""

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import trainA
import trainB
from conftest import TINY_ARGS, interrupted_in_epoch, only_dir, read_metrics
from utils import runs_table as runs
from utils.curves import plot_curves
from utils.lr_find import END_LR, START_LR, lr_find
from utils.runtime import Precision



def metrics_rows(run_dir: Path) -> int:
    return len(read_metrics(run_dir))


def test_curves_png_follows_metrics_csv_also_after_a_resume(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    args = ["--data_dir", str(tiny_data), "-e", "3", *TINY_ARGS, "--output_dir", str(out)]
    with interrupted_in_epoch(monkeypatch, 3):
        assert trainA.main(args) == 130
    run_dir = only_dir(out)
    picture = Image.open(run_dir / "curves.png")
    assert picture.mode in ("RGB", "RGBA") and picture.size[0] > 800
    assert metrics_rows(run_dir) == 2 and plot_curves(run_dir / "metrics.csv", tmp_path / "c.png") == 2
    before = (run_dir / "curves.png").read_bytes()
    assert trainA.main(["--resume", str(run_dir / "last.pt"), "--num_workers", "0"]) == 0
    assert metrics_rows(run_dir) == 3 and plot_curves(run_dir / "metrics.csv", tmp_path / "c.png") == 3
    assert (run_dir / "curves.png").read_bytes() != before  # redrawn with the third epoch


def test_runs_table_lists_finished_interrupted_and_broken_runs(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    common = ["--data_dir", str(tiny_data), *TINY_ARGS, "--output_dir", str(out)]
    assert trainA.main([*common, "-e", "1", "--run_name", "done", "-lr", "0.01"]) == 0
    with interrupted_in_epoch(monkeypatch, 2):
        assert trainA.main([*common, "-e", "3", "--run_name", "stopped", "-lr", "0.001"]) == 130
    broken = out / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "metrics.csv").write_text("epoch,val_accuracy\n1,abc\n\x00\x01")
    capsys.readouterr()
    assert runs.main([str(out), "--csv", str(tmp_path / "table.csv")]) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    lines = printed.out.splitlines()
    header = lines[0].split()
    assert header[:8] == list(runs.BASE_COLUMNS) and "lr" in header and "epochs" in header
    by_name = {line.split()[0]: line.split() for line in lines[1:]}
    assert by_name["done"][2] == "finished" and by_name["stopped"][2] == "interrupted"
    assert by_name["broken"][2] == "failed"
    assert by_name["stopped"][3] == "1"  # epochs done
    lr_column = header.index("lr")
    assert by_name["done"][lr_column] == "0.01" and by_name["stopped"][lr_column] == "0.001"
    with open(tmp_path / "table.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == header and len(table) == 4


def test_lr_find_ramps_suggests_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    images = torch.randn(64, 3, 2, 2)
    labels = (images.flatten(1).sum(1) > 0).long() + (images[:, 0, 0, 0] > 1).long()
    loader = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 64, 8)] * 10
    optimizer = torch.optim.AdamW([{"params": model[1].parameters(), "lr": 1e-3},
                                   {"params": model[3].parameters(), "lr": 1e-2}])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = lr_find(model, optimizer, loader, Precision(torch.device("cpu")), nn.CrossEntropyLoss(), steps=60)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2] and not optimizer.state
    assert result.lrs[0] == pytest.approx(START_LR) and 5 < len(result.lrs) <= 60
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))
    assert START_LR <= result.suggestion <= END_LR


@pytest.mark.parametrize("script", ["trainA", "trainB"])
def test_lr_find_flag_writes_its_files_and_no_checkpoint(tiny_data, tmp_path, capsys, script):
    out = tmp_path / "runs"
    if script == "trainA":
        code = trainA.main(["--data_dir", str(tiny_data), *TINY_ARGS, "-b", "2", "--lr_find", "--lr_find_steps", "12",
                            "--output_dir", str(out)])
    else:
        args = [a for a in TINY_ARGS if a not in ("-nf", "4", "-fo", "same", "-dn", "16")]
        code = trainB.main(["--data_dir", str(tiny_data), *args, "-b", "2", "--arch", "resnet18", "--weights", "none",
                            "--strategy", "freeze_all", "--lr_find", "--lr_find_steps", "12", "--output_dir", str(out)])
    assert code == 0
    run_dir = only_dir(out)
    assert (run_dir / "lr_find.png").exists() and (run_dir / "lr_find.csv").exists()
    assert not list(run_dir.glob("*.pt"))
    printed = capsys.readouterr().out
    assert "suggested --lr" in printed or "no suggestion" in printed
    if script == "trainB" and "suggested" in printed:
        assert "--backbone_lr" in printed
    with open(run_dir / "lr_find.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert 2 <= len(rows) <= 12 and float(rows[0]["lr"]) == pytest.approx(START_LR)
    assert json.loads((run_dir / "state.json").read_text())["state"] == "lr_find"
    from utils.runs_table import run_state

    assert run_state(run_dir) == "lr_find"  # not "failed": it ended as it should


def test_pictures_are_full_colour(tiny_data, tmp_path):
    out = tmp_path / "runs"
    args = [a for a in TINY_ARGS if a != "--no_pictures"]
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", *args, "--output_dir", str(out)]) == 0
    run_dir = only_dir(out)
    for name in ("prediction_grid.png", "filters.png", "feature_maps.png", "confusion_matrix.png", "curves.png",
                 "guided_backprop.png"):
        assert Image.open(run_dir / name).mode in ("RGB", "RGBA"), name


def test_ctrl_c_while_curves_are_drawn_is_not_lost(tmp_path, monkeypatch):
    """matplotlib can swallow a KeyboardInterrupt raised inside it; the signal is held while the
    picture is drawn and raised right after, so Ctrl-C always stops the run."""
    import os
    import signal

    import utils.curves
    from utils.tracking import Tracker

    def swallowing_plot(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a point where Python delivers pending signals
        except KeyboardInterrupt:  # what the library does
            pass
        return 0

    monkeypatch.setattr(utils.curves, "plot_curves", swallowing_plot)
    tracker = Tracker(tmp_path, {}, "disabled", "", "", "run")
    metrics = {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5, "lr": 0.1}
    # Python's own Ctrl-C handler, as in a terminal (pytest started as a background job inherits an
    # ignored SIGINT, which the run rightly keeps ignoring: checked last)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            tracker.log_epoch(metrics)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        tracker.log_epoch({**metrics, "epoch": 2})
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_runs_of_both_scripts_get_a_table_each(tiny_data, tmp_path, capsys):
    """trainA's and trainB's settings barely overlap: one table would hold every key of both
    (dozens of columns, wrapped beyond reading); each script's runs get their own."""
    import trainB

    out = tmp_path / "runs"
    common = ["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), "--num_workers", "0",
              "--wandb_mode", "disabled", "--amp", "off", "--no_pictures", "-is", "32", "-b", "8"]
    assert trainA.main([*common, *TINY_ARGS[:6], "--run_name", "a"]) == 0
    b_args = ["--arch", "test_efficientnet", "--weights", "none", "--strategy", "freeze_all", "--probe_epochs", "2",
              "--refit", "false"]
    assert trainB.main([*common, *b_args, "--run_name", "b1", "-lr", "0.01"]) == 0
    assert trainB.main([*common, *b_args, "--run_name", "b2", "-lr", "0.001"]) == 0
    capsys.readouterr()
    assert runs.main([str(out), "--csv", str(tmp_path / "t.csv")]) == 0
    text = capsys.readouterr().out
    a_part, b_part = text.split("trainB runs:")
    assert a_part.startswith("trainA runs:") and "arch" not in a_part
    b_header = b_part.strip().splitlines()[0].split()
    assert "lr" in b_header and "num_filters" not in b_header and "arch" not in b_header  # the same arch: not listed
    with open(tmp_path / "t.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 4  # the CSV keeps every run in one table

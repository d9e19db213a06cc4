"""What a test reports: top-1, top-5 and balanced (mean per-class) accuracy, counted on the
device in one pass; the per-class table printed once."""

from __future__ import annotations

import json

import torch
from torch import nn

from utils.evaluation import evaluate
from utils.runtime import Precision


class FixedLogits(nn.Module):
    """Returns the logits it is given (the 'images' are logits already)."""

    def forward(self, x):
        return x


def test_top5_and_balanced_accuracy_are_what_they_say():
    torch.manual_seed(0)
    logits = torch.randn(40, 8)
    labels = torch.cat([torch.zeros(30, dtype=torch.long), torch.randint(1, 8, (10,))])  # class 0 dominates
    loader = [(logits[i:i + 16], labels[i:i + 16]) for i in range(0, 40, 16)]
    stats = evaluate(FixedLogits(), loader, Precision(torch.device("cpu")), 8, show_progress=False)
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert abs(stats.top5_accuracy - top5) < 1e-6
    predicted = logits.argmax(1)
    per_class = [(predicted[labels == c] == c).float().mean().item() for c in labels.unique()]
    assert abs(stats.balanced_accuracy - sum(per_class) / len(per_class)) < 1e-6
    assert abs(stats.accuracy - (predicted == labels).float().mean().item()) < 1e-6
    # three classes: top-5 is every class, so 1
    three = evaluate(FixedLogits(), [(logits[:, :3], labels.clamp(max=2))], Precision(torch.device("cpu")), 3,
                     show_progress=False)
    assert three.top5_accuracy == 1.0


def test_test_metrics_json_and_the_console_give_top5_and_balanced_once(tiny_data, tmp_path, capsys):
    import trainA
    from conftest import TINY_ARGS, only_dir

    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "runs"), *TINY_ARGS,
                        "--refit", "true"]) == 0
    metrics = json.loads((only_dir(tmp_path / "runs") / "test_metrics.json").read_text())
    assert 0 <= metrics["test_balanced_accuracy"] <= 1 and metrics["test_top5_accuracy"] == 1.0  # 3 classes
    out = capsys.readouterr().out
    assert out.count(" top5 ") == 2  # best.pt's line and refit.pt's
    assert out.count("  amphibia ") == 1  # the per-class table once, for refit.pt


def test_config_json_records_the_command_commit_packages_and_device(tiny_data, tmp_path, capsys):
    import trainA
    from conftest import TINY_ARGS, only_dir

    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "runs"), *TINY_ARGS]) == 0
    config = json.loads((only_dir(tmp_path / "runs") / "config.json").read_text())
    env = config["environment"]
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"] == torch.__version__
    assert env["device"].startswith("cpu (") and isinstance(env["command"], list)
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert config["epochs"] == 1  # the settings themselves stay where they were
    assert "the run took" in capsys.readouterr().out


def test_the_epoch_line_gives_the_lr_the_epoch_started_and_ended_with(tiny_data, tmp_path, capsys):
    """metrics.csv's lr is the epoch's first value; the console line says so by giving both ends
    (epoch 1 of a one-cycle run is its warm-up)."""
    import trainA
    from conftest import TINY_ARGS, only_dir, read_metrics

    assert trainA.main(["--data_dir", str(tiny_data), "-e", "2", "--output_dir", str(tmp_path / "runs"), *TINY_ARGS,
                        "--patience", "0"]) == 0
    rows = read_metrics(only_dir(tmp_path / "runs"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 1/2"))
    start, end = line.split("  lr ", 1)[1].split()[0].split("..")
    assert float(start) == float(f"{float(rows[0]['lr']):.2e}") and float(end) == float(f"{float(rows[1]['lr']):.2e}")


def _predictions(run_dir):
    import csv

    with open(run_dir / "test_predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_test_predictions_csv_ties_each_tested_image_to_its_file(tiny_data, tmp_path, capsys):
    """A row per test image the run tested (an unreadable one skipped on the cached path):
    its file, true class, top-5 with probabilities; the rows agree with test_metrics.json."""
    import trainA
    import trainB
    from conftest import TINY_ARGS, only_dir

    (tiny_data / "val" / "fungi" / "broken.jpg").write_bytes(b"not an image")
    runs = {
        "A cached": lambda out: trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", out, *TINY_ARGS]),
        "B freeze_all": lambda out: trainB.main([
            "--data_dir", str(tiny_data), "-e", "1", "--output_dir", out, "--arch", "test_efficientnet", "--weights",
            "none", "-is", "32", "-b", "8", "--num_workers", "0", "--wandb_mode", "disabled", "--amp", "off",
            "--no_pictures", "--strategy", "freeze_all", "--probe_epochs", "2", "--refit", "false"]),
    }
    for name, run in runs.items():
        out = tmp_path / name
        assert run(str(out)) == 0, name
        run_dir = only_dir(out)
        rows = _predictions(run_dir)
        metrics = json.loads((run_dir / "test_metrics.json").read_text())
        readable = [p for p in (tiny_data / "val").rglob("*.jpg") if p.name != "broken.jpg"]
        assert sorted(r["file"] for r in rows) == sorted(str(p.relative_to(tiny_data / "val")) for p in readable)
        for row in rows:
            assert row["true_class"] == row["file"].split("/")[0]
            assert row["predicted_class"] == row["top1_class"] and row["correct"] == str(int(
                row["true_class"] == row["predicted_class"]))
            probabilities = [float(row[f"top{i}_probability"]) for i in (1, 2, 3)]
            assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 5e-4  # 3 classes: all of them
        assert abs(sum(int(r["correct"]) for r in rows) / len(rows) - metrics["test_accuracy"]) < 1e-9, name
    # streaming with an unreadable test file: the rows cannot be tied to files, so none are written
    out = tmp_path / "A streaming"
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *TINY_ARGS,
                        "--cache", "off"]) == 0
    assert not (only_dir(out) / "test_predictions.csv").exists()
    assert "test_predictions.csv not written" in capsys.readouterr().out

"""Refusals and limits: a bad split, numbers out of range, checkpoints that are folders, messages
with newlines, --predict piped into head, a resume or --test_only that would do nothing or ignore
a flag, outputs at 1,000 classes, class and run names file systems and terminals dislike."""

from __future__ import annotations

from pathlib import Path

import pytest

import trainA
from conftest import ROOT, TINY_ARGS, assert_one_line_error, make_dataset, only_dir, run_main


def break_split(root: Path, split: str) -> int:
    """Turn every image of a split folder into a git-lfs pointer file; returns how many."""
    files = [f for f in (root / split).rglob("*.jpg")]
    for f in files:
        f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1234\n")
    return len(files)


@pytest.mark.parametrize("script", ["trainA.py", "trainB.py"])
@pytest.mark.parametrize("cache", ["auto", "off"])
@pytest.mark.parametrize("folder,split", [("val", "test"), ("train", "train")])
def test_a_split_left_empty_by_unreadable_files_is_refused_before_anything_is_written(tmp_path, script, cache,
                                                                                      folder, split):
    data = make_dataset(tmp_path / "data")
    count = break_split(data, folder)
    out = tmp_path / "runs"
    args = [a for a in TINY_ARGS if script == "trainA.py" or a not in ("-nf", "4", "-fo", "same", "-dn", "16")]
    extra = ["--arch", "resnet18", "--weights", "none"] if script == "trainB.py" else []
    result = run_main(script, "--data_dir", str(data), "--output_dir", str(out), "--cache", cache,
                      "--cache_dir", str(tmp_path / "cache"), *args, *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    if split == "train":  # the val split, carved from train/ and first to be read in the cached path, or train
        assert "split in" in last and "unreadable" in last, last
    else:
        assert f"every one of the {count} files of the test split" in last, last
    assert "git-lfs" in last and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["-fo", "inf"], "'inf' is not a finite number"),
    (["-fo", "nan"], "'nan' is not a finite number"),
    (["-fo", "1e308"], "1e308 must be <= 16"),
    (["--seed", "18446744073709551617"], "--seed: 18446744073709551617 must be <= 4294967295"),
    (["-e", "1e30"], "--epochs: 1e30 must be <= 2147483647"),
    (["-lr", "inf"], "--learning_rate: 'inf' is not a finite number"),
])
def test_numbers_at_their_limits_are_refused_up_front(argv, needle):
    assert_one_line_error(run_main("trainA.py", *argv, "--dry_run"), needle)


def test_a_checkpoint_that_is_a_folder_is_named_as_one(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"")
    result = run_main("trainA.py", "--test_only", "--checkpoint", str(tmp_path / "run"))
    assert_one_line_error(result, f"checkpoint '{tmp_path / 'run'}' is a folder (it holds best.pt), not a file")


def test_an_error_message_with_newlines_is_printed_on_one_line(tmp_path, monkeypatch):
    from data import DatasetError

    def fails(argv):
        raise DatasetError("download of http://127.0.0.1/x.zip failed: HTTP 310 redirect loop\nLocation: a\nLocation: b")

    import io
    import contextlib
    from utils.cli import run_cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_cli(fails, [], prog="trainA.py") == 2
    assert err.getvalue().count("\n") == 1 and "redirect loop Location: a Location: b" in err.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    data = make_dataset(root / "data")
    assert trainA.main(["--data_dir", str(data), "-e", "1", "--output_dir", str(root / "runs"), *TINY_ARGS]) == 0
    run_dir = only_dir(root / "runs")
    return data, run_dir


def test_predict_piped_into_head_ends_quietly(finished):
    import subprocess
    import sys

    data, run_dir = finished
    command = (f"{sys.executable} {ROOT / 'trainA.py'} --predict {data / 'val'} --checkpoint {run_dir / 'best.pt'} "
               "--device cpu | head -1")
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.stdout.count("\n") == 1 and ".jpg:" in result.stdout
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_predict_skips_hidden_folders_and_files(finished, tmp_path, capsys):
    data, run_dir = finished
    photos = tmp_path / "photos"
    photo = next((data / "val" / "fungi").iterdir())
    for name in ("a.jpg", ".ipynb_checkpoints/a-checkpoint.jpg", ".thumbnails/a.jpg", "._a.jpg"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(photo.read_bytes())
    assert trainA.main(["--predict", str(photos), "--checkpoint", str(run_dir / "best.pt")]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if ".jpg:" in line]
    assert len(printed) == 1 and printed[0].startswith(str(photos / "a.jpg"))


def test_a_resume_with_nothing_to_train_is_refused_before_touching_the_run(finished):
    data, run_dir = finished
    before = (run_dir / "config.json").read_text(), (run_dir / "metrics.csv").read_text()
    for epochs in ([], ["-e", "1"]):
        result = run_main("trainA.py", "--resume", str(run_dir / "last.pt"), *epochs)
        assert_one_line_error(result, "has trained 1 epochs and --epochs is 1", "pass --epochs above 1")
    assert ((run_dir / "config.json").read_text(), (run_dir / "metrics.csv").read_text()) == before


def test_an_early_stopped_run_resumes_only_with_more_patience(tmp_path):
    data = make_dataset(tmp_path / "data")
    # lr 1e-6: val_accuracy cannot improve after epoch 1, so patience 1 stops after epoch 2
    args = ["--data_dir", str(data), "--output_dir", str(tmp_path / "runs"), *TINY_ARGS, "-e", "5", "--patience", "1",
            "-lr", "1e-6"]
    assert trainA.main(args) == 0
    run_dir = only_dir(tmp_path / "runs")
    done = len((run_dir / "metrics.csv").read_text().splitlines()) - 1
    assert done < 5
    assert_one_line_error(run_main("trainA.py", "--resume", str(run_dir / "last.pt")),
                          f"stopped early after epoch {done}", "pass a larger --patience")
    assert trainA.main(["--resume", str(run_dir / "last.pt"), "--patience", "0", "--num_workers", "0"]) == 0
    assert len((run_dir / "metrics.csv").read_text().splitlines()) - 1 == 5


@pytest.mark.parametrize("flag", [["-lr", "0.5"], ["--mixup_alpha", "0.2"], ["-is", "64"]])
def test_test_only_refuses_flags_it_would_ignore(finished, flag):
    _, run_dir = finished
    result = run_main("trainA.py", "--test_only", "--checkpoint", str(run_dir / "best.pt"), *flag, "--wandb_mode",
                      "disabled")
    assert_one_line_error(result, "--test_only evaluates the checkpoint with its own saved settings",
                          "would be ignored")


def test_test_only_takes_a_tta_of_its_own(finished, monkeypatch):
    """Test-time augmentation changes no weight: --test_only --tta none|flip evaluates the same
    checkpoint either way (the run's own choice without the flag)."""
    import utils.actions

    _, run_dir = finished
    seen = []
    real = utils.actions.evaluate
    monkeypatch.setattr(utils.actions, "evaluate", lambda *a, tta, **kw: seen.append(tta) or real(*a, tta=tta, **kw))
    for flags in (["--tta", "none"], ["--tta", "flip"], []):
        assert trainA.main(["--test_only", "--checkpoint", str(run_dir / "best.pt"), "--num_workers", "0", *flags]) == 0
    assert seen == ["none", "flip", "flip"]  # the run's own: trainA's default, flip


def test_pictures_and_tables_stay_bounded_at_a_thousand_classes(tmp_path, capsys):
    import numpy as np
    from types import SimpleNamespace

    from utils.actions import report_test
    from utils.confusion import confusion_counts, confusion_matrix_picture
    from utils.drawing import MAX_CLASSES_SHOWN

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 1000, 20_000)
    predictions = np.where(rng.random(20_000) < 0.7, targets, rng.integers(0, 1000, 20_000))
    names = [f"species_{i:04d}" for i in range(1000)]
    matrix = confusion_counts(targets.tolist(), predictions.tolist(), 1000)
    picture = confusion_matrix_picture(matrix, names, tmp_path / "cm.png")
    assert max(picture.size) < 2000, picture.size
    accuracy = np.diag(matrix) / matrix.sum(1)
    stats = SimpleNamespace(loss=1.0, accuracy=0.7, images=20_000, per_class_accuracy=lambda: accuracy.tolist(),
                            top5_accuracy=0.9, balanced_accuracy=float(accuracy.mean()))
    results = report_test(stats, names, "best.pt")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) <= MAX_CLASSES_SHOWN + 2 and len(results["test_per_class_accuracy"]) == 1000
    worst = names[int(np.argmin(accuracy))]
    assert any(line.strip().startswith(worst) for line in printed)


def test_the_printed_model_summary_is_the_model_that_trains(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", classes=("amphibia", "fungi", "insecta", "mammalia"))
    assert trainA.main(["--data_dir", str(data), "-e", "1", "--output_dir", str(tmp_path / "runs"), *TINY_ARGS]) == 0
    printed = capsys.readouterr().out
    import re

    # the output layer's row: "<name>  Linear  <classes>  <params>  <macs>"
    assert re.search(r"Linear\s+4\s", printed) and not re.search(r"Linear\s+10\s", printed), printed


def test_class_names_that_differ_only_in_unicode_normalisation_are_one_class(tmp_path):
    import unicodedata

    data = make_dataset(tmp_path / "data", classes=("amphibia", "fungi"))
    for split, form in (("train", "NFC"), ("val", "NFD")):
        (data / split / "fungi").rename(data / split / unicodedata.normalize(form, "champignon_café"))
    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(data), "-e", "1", "--output_dir", str(out), *TINY_ARGS]) == 0


@pytest.mark.parametrize("project,needle", [("team/project", "cannot hold /; put the team in --wandb_entity"),
                                            ("p" * 129, "must be 1 to 128 characters")])
def test_a_wandb_project_name_wandb_refuses_is_one_line_before_any_work(tiny_data, tmp_path, project, needle):
    result = run_main("trainA.py", "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "runs"),
                      "--wandb_project", project, *TINY_ARGS)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "runs").exists()


def test_a_run_name_too_long_for_the_file_system_gets_a_short_folder(tiny_data, tmp_path):
    name = "sweep-" + "x" * 300
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "runs"),
                        "--run_name", name, *TINY_ARGS]) == 0
    run_dir = only_dir(tmp_path / "runs")
    assert len(run_dir.name) <= 120 and (run_dir / "test_metrics.json").is_file()


def test_a_class_name_that_is_not_utf8_prints_under_a_strict_utf8_stdout(tmp_path, monkeypatch):
    import io
    import os
    import sys

    from utils.cli import run_cli

    data = make_dataset(tmp_path / "data", classes=("amphibia", "fungi"))
    for split in ("train", "val"):
        os.rename(os.fsencode(data / split / "fungi"), os.fsencode(data / split) + b"/pilz_\xff")
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", strict)
    out = tmp_path / "runs"
    assert run_cli(trainA.main, ["--data_dir", str(data), "-e", "1", "--output_dir", str(out), *TINY_ARGS]) == 0
    run_dir = only_dir(out)
    assert (run_dir / "test_metrics.json").is_file()


def test_checkpoints_are_untrusted_input_for_every_action(tmp_path, tiny_data):
    """A checkpoint of the other script, an empty one and a truncated one, given to --test_only,
    --resume and --predict of either script: one line naming the file, exit 2, nothing run."""
    pytest.importorskip("timm")
    import trainB

    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "a"), *TINY_ARGS]) == 0
    assert trainB.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "b"), "--arch",
                        "test_efficientnet", "--weights", "none", "-is", "32", "-b", "8", "--num_workers", "0",
                        "--wandb_mode", "disabled", "--no_pictures", "--strategy", "freeze_all", "--probe_epochs", "0",
                        "--refit", "false"]) == 0
    a_dir, b_dir = only_dir(tmp_path / "a"), only_dir(tmp_path / "b")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes((a_dir / "last.pt").read_bytes()[:500])
    image = next((tiny_data / "val").rglob("*.jpg"))
    cases = [("trainB.py", a_dir, "written by trainA.py"), ("trainA.py", b_dir, "written by trainB.py")]
    for script, run_dir, needle in cases:
        for action in (["--test_only", "--checkpoint", str(run_dir / "best.pt")], ["--resume", str(run_dir / "last.pt")],
                       ["--predict", str(image), "--checkpoint", str(run_dir / "best.pt")]):
            assert_one_line_error(run_main(script, *action), needle)
    for broken in ("empty.pt", "cut.pt"):
        for action in (["--test_only", "--checkpoint"], ["--resume"], ["--export", "--checkpoint"]):
            assert_one_line_error(run_main("trainA.py", *action, str(tmp_path / broken)), broken, "truncated")

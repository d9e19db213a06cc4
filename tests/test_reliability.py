"""Reliability, round three: each class of failure fixed at its root, tried as a user would.
Round two's cases are in test_reliability_round2.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import trainA
from conftest import ROOT, TINY_ARGS, assert_one_line_error, epoch_of, make_dataset, only_dir, run_main


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
    from utils.pictures import MAX_CLASSES_SHOWN, confusion_counts, confusion_matrix_picture

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


# ---------------------------------------------------------------- signals and storage at the edges of a run
def state_of(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "state.json").read_text())


def test_ctrl_c_during_the_final_test_says_what_is_kept(tiny_data, tmp_path, monkeypatch):
    import utils.finish

    real = utils.finish.evaluate

    def interrupted(*args, **kwargs):
        if str(kwargs.get("desc")).startswith("test"):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.finish, "evaluate", interrupted)
    out = tmp_path / "runs"
    result = run_main("trainA.py", "--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *TINY_ARGS)
    assert result.returncode == 130
    run_dir = only_dir(out)
    assert "nothing to keep" not in result.stderr and "best.pt, last.pt kept in" in result.stderr
    assert state_of(run_dir)["state"] == "interrupted"


def test_a_second_ctrl_c_while_last_pt_is_written_still_saves_it(tiny_data, tmp_path, monkeypatch):
    import os
    import signal

    import torch

    import utils.checkpoint
    from conftest import interrupted_in_epoch

    real = utils.checkpoint.atomic_torch_save

    def impatient(payload, path):
        if payload.get("interrupted"):
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again
        real(payload, path)

    monkeypatch.setattr(utils.checkpoint, "atomic_torch_save", impatient)
    out = tmp_path / "runs"
    with interrupted_in_epoch(monkeypatch, 2):
        result = run_main("trainA.py", "--data_dir", str(tiny_data), "-e", "3", "--output_dir", str(out), *TINY_ARGS)
    assert result.returncode == 130 and "interrupted during epoch 2; saved" in result.stderr, result.stderr
    run_dir = only_dir(out)
    assert torch.load(run_dir / "last.pt", weights_only=True)["interrupted"] is True
    assert state_of(run_dir)["state"] == "interrupted"


def test_a_full_disk_while_last_pt_is_written_is_one_line_and_keeps_the_older_checkpoints(tiny_data, tmp_path,
                                                                                          monkeypatch):
    import errno

    import torch

    import utils.checkpoint

    real, writes = utils.checkpoint.atomic_torch_save, []

    def full_disk(payload, path):
        writes.append(Path(path).name)
        if payload["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(payload, path)

    monkeypatch.setattr(utils.checkpoint, "atomic_torch_save", full_disk)
    out = tmp_path / "runs"
    result = run_main("trainA.py", "--data_dir", str(tiny_data), "-e", "3", "--output_dir", str(out), *TINY_ARGS,
                      "--patience", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "free space" in lines[0]
    run_dir = only_dir(out)
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert state_of(run_dir)["state"] == "failed"


def test_data_workers_that_die_mid_run_save_last_pt_and_name_the_fix(tiny_data, tmp_path, monkeypatch):
    import torch

    import utils.train

    real = utils.train.train_one_epoch

    def bus_error(*args, **kwargs):
        if epoch_of(args, kwargs) == 2:
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that "
                               "dataloader's workers are out of shared memory. Please try to raise your shared "
                               "memory limit.")
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.train, "train_one_epoch", bus_error)
    out = tmp_path / "runs"
    result = run_main("trainA.py", "--data_dir", str(tiny_data), "-e", "3", "--output_dir", str(out), *TINY_ARGS)
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert "out of shared memory" in result.stderr and "--num_workers 0" in result.stderr and "--shm-size" in result.stderr
    run_dir = only_dir(out)
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert state_of(run_dir)["state"] == "interrupted"


@pytest.mark.parametrize("layout", ["zip", "download"])
def test_a_read_only_place_for_the_lock_is_one_line_naming_the_folder(tmp_path, monkeypatch, layout):
    import errno
    import shutil

    import filelock

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(filelock.BaseFileLock, "acquire", read_only)
    if layout == "zip":
        data = make_dataset(tmp_path / "share" / "nature")
        target = Path(shutil.make_archive(str(tmp_path / "share" / "nature"), "zip", data))
        shutil.rmtree(data)
        needle = "unzip"
    else:
        target, needle = tmp_path / "share" / "nature_12K", "pass a --data_dir in a folder you can write to"
    result = run_main("trainA.py", "--data_dir", str(target), "--download", "true", "--data_url",
                      "http://127.0.0.1:9/none.zip", *TINY_ARGS)
    assert_one_line_error(result, f"cannot write in '{tmp_path / 'share'}' (Read-only file system)", needle)


# ---------------------------------------------------------------- our own classes: media, notebooks, containers
def test_windows_formatted_media_class_folders_whose_case_changed_still_match(tmp_path):
    """A copy through FAT/exFAT/NTFS may change a folder name's case (FUNGI for fungi); those file
    systems cannot hold two names differing only in case, so the match is unambiguous."""
    data = make_dataset(tmp_path / "data", classes=("amphibia", "fungi"))
    (data / "val" / "fungi").rename(data / "val" / "FUNGI")
    (data / "train" / "amphibia" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (data / "train" / "amphibia" / "desktop.ini").write_text("[.ShellClassInfo]\r\n")
    assert trainA.main(["--data_dir", str(data), "-e", "1", "--output_dir", str(tmp_path / "runs"), *TINY_ARGS]) == 0


def test_class_names_differing_only_in_case_stay_two_classes(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", classes=("amphibia", "fungi"))
    for split in ("train", "val"):
        (data / split / "amphibia").rename(data / split / "Fungi")
    (data / "val" / "fungi").rename(data / "val" / "mushrooms")
    result = run_main("trainA.py", "--data_dir", str(data), *TINY_ARGS, "--output_dir", str(tmp_path / "runs"))
    assert_one_line_error(result, "missing fungi", "extra mushrooms")


def test_a_notebook_stdout_without_a_file_descriptor(tiny_data, tmp_path, monkeypatch):
    """Jupyter replaces sys.stdout/err with streams that have no fileno() and no reconfigure()."""
    import io
    import sys

    from utils.cli import run_cli

    class NotebookStream(io.TextIOBase):
        def __init__(self):
            self.parts = []

        def write(self, text):
            self.parts.append(text)
            return len(text)

        def fileno(self):
            raise io.UnsupportedOperation("fileno")

    out, err = NotebookStream(), NotebookStream()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    code = run_cli(trainA.main, ["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "runs"),
                                 *TINY_ARGS], prog="trainA.py")
    assert code == 0, "".join(err.parts)[-2000:]
    assert "test_accuracy" in "".join(out.parts)


def test_a_container_without_a_writable_home_still_trains(tiny_data, tmp_path, monkeypatch, capsys):
    """docker run --user 1234 gives a HOME that does not exist and cannot be made: the decoded
    cache's default folder is unusable, so the run streams the images and says so once."""
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/proc/nonexistent-home")
    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *TINY_ARGS]) == 0
    err = capsys.readouterr().err
    assert err.count("decoding images every epoch instead") == 1 and "Traceback" not in err
    assert (next(out.iterdir()) / "test_metrics.json").is_file()


@pytest.mark.parametrize("phase", ["data", "test"])
def test_sigterm_outside_the_epochs_is_an_interrupt_too(tiny_data, tmp_path, monkeypatch, capsys, phase):
    """A wandb agent or a cluster sends SIGTERM at any moment: while the data is read (or a probe
    computes features) and while best.pt is tested, not only inside fit(). It must end the run as
    Ctrl-C does (a one-line message, exit 130, state.json saying so), not kill it silently. The
    handler in place at that moment is called directly, as the signal would."""
    import signal

    import utils.finish
    import utils.run
    from utils.cli import run_cli

    module = {"data": utils.run, "test": utils.finish}[phase]
    real = {"data": utils.run.load_data, "test": utils.finish.evaluate}[phase]
    name = {"data": "load_data", "test": "evaluate"}[phase]

    def terminated(*args, **kwargs):
        if name == "evaluate" and not str(kwargs.get("desc")).startswith("test"):
            return real(*args, **kwargs)
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), handler  # SIG_DFL would kill the process without a word
        handler(signal.SIGTERM, None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, terminated)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "runs"), *TINY_ARGS]
    assert run_cli(trainA.main, argv, prog="trainA.py") == 130
    assert signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert "trainA.py: interrupted" in err and "Traceback" not in err
    if phase == "test":
        run_dir = only_dir(tmp_path / "runs")
        assert (run_dir / "best.pt").is_file() and '"interrupted"' in (run_dir / "state.json").read_text()

"""The machines and media users really have: Windows-formatted disks, notebooks without a file
descriptor, containers without a writable home, SIGTERM outside the epochs."""

from __future__ import annotations

import pytest

import trainA
from conftest import TINY_ARGS, assert_one_line_error, make_dataset, only_dir, run_main


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

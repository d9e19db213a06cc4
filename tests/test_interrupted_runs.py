"""How a run ends when something stops it: Ctrl-C or SIGTERM inside an epoch (and the exact
resume), to the whole process group while loader workers run, in the final test (which a --resume
then finishes), while last.pt is written; a disk that fills; loader workers that die."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainA
import utils.finish
from conftest import (ROOT, TINY_ARGS, assert_one_line_error, epoch_of, interactive_signals, make_dataset, only_dir,
                      run_main, state_of)
from utils.errors import EXIT_INTERRUPTED


def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_older_checkpoints(tiny_data, tmp_path,
                                                                                    monkeypatch):
    """torch's zip writer reports a full disk as RuntimeError ("[enforce fail at
    inline_container.cc:672] . unexpected pos ..."), after part of the file is written."""
    real = torch.save

    def disk_fills(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer" in obj:
            f.write(b"PK\x03\x04" + b"\0" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 364736 vs 364628")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills)
    out = tmp_path / "runs"
    result = run_main("trainA.py", "--data_dir", str(tiny_data), "-e", "3", "--output_dir", str(out), *TINY_ARGS,
                      "--patience", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not write last.pt" in lines[0] and "resume from last.pt" in lines[0], lines
    run_dir = only_dir(out)
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] in (1, 2)
    assert state_of(run_dir)["state"] == "failed"
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_to_the_process_group_with_loader_workers_saves_without_a_traceback(tmp_path, stop):
    """A terminal's Ctrl-C, Slurm's scancel and docker stop signal every process of the job: the
    workers die of the same signal as the run, which is the normal case, not an error to show."""
    data = make_dataset(tmp_path / "data", train_per_class=40, test_per_class=2)
    args = [sys.executable, str(ROOT / "trainA.py"), "--data_dir", str(data), "-e", "200", "--output_dir",
            str(tmp_path / "runs"), *TINY_ARGS, "-b", "2", "--patience", "0", "--cache", "off"]
    args[args.index("--num_workers") + 1] = "2"

    def own_group():
        interactive_signals()
        os.setpgrp()

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=own_group)
    for line in proc.stdout:
        if line.startswith("epoch 1/200"):
            break
    os.killpg(proc.pid, stop)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-2000:]
    assert "interrupted during epoch" in err and "nothing to keep" not in err
    run_dir = only_dir(tmp_path / "runs")
    assert torch.load(run_dir / "last.pt", weights_only=True)["interrupted"] is True
    assert state_of(run_dir)["state"] == "interrupted"


@pytest.fixture
def ctrl_c_in_the_test_of(monkeypatch):
    """Ctrl-C arrives while the named checkpoint (best.pt, refit.pt) is tested, once."""
    real, fired = utils.finish.evaluate, []

    def arm(name: str):
        def interrupted(*args, **kwargs):
            if kwargs.get("desc") == f"test {name}" and not fired:
                fired.append(name)
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(utils.finish, "evaluate", interrupted)
    return arm


def test_resume_after_ctrl_c_in_the_final_test_runs_the_test_and_finishes(tiny_data, tmp_path, ctrl_c_in_the_test_of,
                                                                           capsys):
    ctrl_c_in_the_test_of("best.pt")
    out = tmp_path / "runs"
    argv = ["--data_dir", str(tiny_data), "-e", "2", "--output_dir", str(out), *TINY_ARGS]
    assert trainA.main(argv) == EXIT_INTERRUPTED
    run_dir = only_dir(out)
    assert state_of(run_dir)["state"] == "interrupted" and not (run_dir / "test_metrics.json").exists()
    assert f"--resume {run_dir / 'last.pt'}" in capsys.readouterr().err
    assert trainA.main(["--resume", str(run_dir / "last.pt"), "--num_workers", "0"]) == 0
    assert state_of(run_dir)["state"] == "finished"
    assert json.loads((run_dir / "test_metrics.json").read_text())["best_epoch"] in (1, 2)
    # finished now: a second resume has nothing left to do
    result = run_main("trainA.py", "--resume", str(run_dir / "last.pt"))
    assert result.returncode == 2 and "nothing to train" in result.stderr


def test_resume_after_ctrl_c_in_the_test_of_refit_pt_tests_it_without_refitting(tiny_data, tmp_path,
                                                                                 ctrl_c_in_the_test_of, monkeypatch,
                                                                                 capsys):
    ctrl_c_in_the_test_of("refit.pt")
    out = tmp_path / "runs"
    argv = ["--data_dir", str(tiny_data), "-e", "2", "--output_dir", str(out), *TINY_ARGS, "--refit", "true"]
    assert trainA.main(argv) == EXIT_INTERRUPTED
    run_dir = only_dir(out)
    refit_bytes = (run_dir / "refit.pt").read_bytes()
    import utils.run

    monkeypatch.setattr(utils.run, "refit_on_train_and_val", lambda *a, **k: pytest.fail("refitted again"))
    assert trainA.main(["--resume", str(run_dir / "last.pt"), "--num_workers", "0"]) == 0
    assert (run_dir / "refit.pt").read_bytes() == refit_bytes
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["tested"] == "refit.pt" and "best_pt_test_accuracy" in metrics
    assert state_of(run_dir)["state"] == "finished"


def test_workers_killed_by_sigterm_before_the_run_hears_of_it_read_as_an_interrupt(tiny_data, tmp_path,
                                                                                    monkeypatch):
    """The other order of the same race: torch's SIGCHLD handler reports the dead workers before
    the run's own SIGTERM handler runs."""
    import utils.train
    from conftest import epoch_of

    real = utils.train.train_one_epoch

    def workers_terminated(*args, **kwargs):
        if epoch_of(args, kwargs) == 2:
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.train, "train_one_epoch", workers_terminated)
    out = tmp_path / "runs"
    result = run_main("trainA.py", "--data_dir", str(tiny_data), "-e", "3", "--output_dir", str(out), *TINY_ARGS)
    assert result.returncode == EXIT_INTERRUPTED and "Traceback" not in result.stderr
    assert "interrupted during epoch 2" in result.stderr and "workers died" not in result.stderr
    assert state_of(only_dir(out))["state"] == "interrupted"


@pytest.fixture
def ctrl_c_after_steps(monkeypatch):
    """Ctrl-C arrives in the middle of an epoch: after `steps` optimizer steps of `epoch`."""
    import utils.train

    real_epoch, real_step = utils.train.train_one_epoch, utils.train.step
    where = {"epoch": None, "steps": 0, "current": 0, "taken": 0}  # the probe's passes (utils.features) never count

    def arm(epoch: int, steps: int):
        where.update(epoch=epoch, steps=steps, current=0, taken=0)

    def watched_epoch(*args, **kwargs):
        from conftest import epoch_of

        where["current"], where["taken"] = epoch_of(args, kwargs), 0
        return real_epoch(*args, **kwargs)

    def watched_step(*args, **kwargs):
        if where.get("current") == where.get("epoch"):
            if where["taken"] == where["steps"]:
                where["epoch"] = None  # once
                raise KeyboardInterrupt
            where["taken"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(utils.train, "train_one_epoch", watched_epoch)
    monkeypatch.setattr(utils.train, "step", watched_step)
    return arm


KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


@pytest.mark.parametrize("script,extra,epoch", [
    ("trainA", ["--cache", "auto", "--ema_decay", "0.9", "--mixup_alpha", "0.4"], 2),
    ("trainA", ["--cache", "off"], 1),
    ("trainB", ["--cache", "auto", "--strategy", "full", "--probe_epochs", "0"], 2),
    ("trainB", ["--cache", "off", "--strategy", "freeze_all", "--probe_epochs", "2"], 1),
])
def test_ctrl_c_inside_an_epoch_then_resume_gives_the_uninterrupted_run(tiny_data, tmp_path, ctrl_c_after_steps,
                                                                       script, extra, epoch, capsys):
    """The resume replays the interrupted epoch from its start: the same seeded run gives the same
    metrics.csv, lr included, as one never interrupted (the schedule does not shift)."""
    from conftest import read_metrics

    pytest.importorskip("timm")
    module = __import__(script)
    if script == "trainA":
        common = ["--data_dir", str(tiny_data), "-e", "2", *TINY_ARGS, "--patience", "0", "--seed", "4"]
    else:
        common = ["--data_dir", str(tiny_data), "-e", "2", "--arch", "test_efficientnet", "--weights", "none", "-is",
                  "32", "-b", "8", "--num_workers", "0", "--wandb_mode", "disabled", "--amp", "off",
                  "--channels_last", "false", "--no_pictures", "--patience", "0", "--refit", "false", "--seed", "4"]
    assert module.main([*common, *extra, "--output_dir", str(tmp_path / "whole")]) == 0
    whole = read_metrics(only_dir(tmp_path / "whole"))
    ctrl_c_after_steps(epoch, 1)  # one step of the epoch taken (tiny_data: 3 steps an epoch), then Ctrl-C
    assert module.main([*common, *extra, "--output_dir", str(tmp_path / "cut")]) == EXIT_INTERRUPTED
    run_dir = only_dir(tmp_path / "cut")
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == epoch - 1
    assert (run_dir / "interrupted.pt").is_file()  # what the interrupted epoch had trained is kept too
    assert module.main(["--resume", str(run_dir / "last.pt"), "--num_workers", "0"]) == 0
    resumed = read_metrics(run_dir)
    assert [[r[k] for k in KEYS] for r in resumed] == [[r[k] for k in KEYS] for r in whole]
    assert json.loads((run_dir / "test_metrics.json").read_text())["test_accuracy"] == json.loads(
        (only_dir(tmp_path / "whole") / "test_metrics.json").read_text())["test_accuracy"]


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


@pytest.mark.parametrize("phase", ["refit", "test"])
def test_workers_killed_by_the_groups_sigterm_after_the_epochs_read_as_an_interrupt(tiny_data, tmp_path, monkeypatch,
                                                                                   phase):
    """The same race in the refit and in the final test (loaders with workers run there too):
    torch reports the workers killed by the group's SIGTERM before the run's own handler runs.
    That is the interrupt it is (exit 130, state interrupted, the resume finishes the run), not a
    traceback and not a failed refit."""
    import utils.finish
    import utils.train

    dead = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
    if phase == "refit":
        real = utils.train.train_one_epoch
        calls = []

        def dies_in_the_refit(*args, **kwargs):  # fit() runs 1 epoch; the refit's first one dies
            calls.append(1)
            if len(calls) == 2:
                raise dead
            return real(*args, **kwargs)

        monkeypatch.setattr(utils.train, "train_one_epoch", dies_in_the_refit)
    else:
        def dies_in_the_test(*args, **kwargs):
            raise dead

        monkeypatch.setattr(utils.finish, "evaluate", dies_in_the_test)
    out = tmp_path / "runs"
    result = run_main("trainA.py", "--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *TINY_ARGS,
                      "--refit", "true")
    assert result.returncode == EXIT_INTERRUPTED, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr and "refit stopped" not in result.stderr
    assert state_of(only_dir(out))["state"] == "interrupted"

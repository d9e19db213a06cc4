"""Fixtures: tiny image folders written to tmp_path, so no test needs the real data set."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each class is a distinct colour with noise and a random size, so a tiny CNN can learn it
# and every image file differs.
CLASS_COLOURS = {"amphibia": (200, 40, 40), "fungi": (40, 180, 60), "insecta": (50, 60, 210), "mammalia": (220, 200, 40)}


def write_image(path: Path, colour, size=(48, 40), seed=0, mode="RGB", fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def make_dataset(root: Path, classes=("amphibia", "fungi", "insecta"), train_per_class=10, test_per_class=4,
                 test_name="val", nested: bool = False, seed: int = 0) -> Path:
    """root[/inaturalist_12K]/{train,val}/<class>/*.jpg with varied sizes; returns root."""
    base = root / "inaturalist_12K" if nested else root
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), (test_name, test_per_class)):
        for c, name in enumerate(classes):
            for i in range(count):
                size = (int(rng.integers(36, 70)), int(rng.integers(36, 70)))
                write_image(base / split / name / f"{name}_{i:03d}.jpg", CLASS_COLOURS[name], size,
                            seed=seed * 100_000 + (0 if split == "train" else 50_000) + c * 1000 + i)
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture(autouse=True)
def _quiet_offline_env(monkeypatch, tmp_path):
    """No test may reach wandb's servers or read the developer's credentials."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # decoded-image caches stay in tmp


# Small, fast settings for end-to-end runs through the real scripts.
TINY_ARGS = ["-is", "32", "-nf", "4", "-fo", "same", "-dn", "16", "-b", "8", "--num_workers", "0",
             "--wandb_mode", "disabled", "--amp", "off", "--channels_last", "false", "--no_pictures"]


def run_script(script: str, *args: str, timeout: int = 300, env_extra: dict | None = None):
    """Run a script in a fresh interpreter (subprocess), for when the process itself is the
    subject (imports, signals, exit codes); returns CompletedProcess."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)


def run_main(script: str, *args: str):
    """Run a script's `__main__` path (run_cli(main, argv)) in this process, capturing what it
    prints and its exit code (argparse's SystemExit included): a user's view without paying a
    fresh interpreter and torch import per call. An exception that escapes run_cli is a bug and
    fails the test with its traceback, as it would print one for a user."""
    import importlib
    import io
    from types import SimpleNamespace

    from utils.cli import run_cli

    module = importlib.import_module(script.removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_cli(module.main, list(args), prog=script)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_one_line_error(result, *needles: str, code: int = 2) -> None:
    """Exit code, exactly one line on stderr naming the thing, and no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert_one_line(result.stderr, *needles)


def assert_one_line(err: str, *needles: str) -> None:
    """err (what a run printed on stderr) is one line holding every needle, with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def one_error_line(capsys, *needles: str) -> None:
    """What an in-process call printed on stderr is one line holding every needle."""
    assert_one_line(capsys.readouterr().err, *needles)


def only_dir(output: Path) -> Path:
    """The one run directory a run made under output (its --output_dir)."""
    (run_dir,) = [p for p in Path(output).iterdir() if p.is_dir()]
    return run_dir


def state_of(run_dir: Path) -> dict:
    """A run directory's state.json."""
    import json

    return json.loads((Path(run_dir) / "state.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.csv of a run directory, one dict per epoch."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _train_one_epoch_signature():
    import inspect

    from utils.train import train_one_epoch

    return inspect.signature(train_one_epoch)


TRAIN_ONE_EPOCH = _train_one_epoch_signature()


def epoch_of(args, kwargs) -> int:
    """The epoch a call of utils.train.train_one_epoch is for, found by name, not by position
    (the signature is the real function's, read before any test patches it)."""
    return TRAIN_ONE_EPOCH.bind(*args, **kwargs).arguments["epoch"]


@contextlib.contextmanager
def interrupted_in_epoch(monkeypatch, epoch: int):
    """Within the block, Ctrl-C arrives during `epoch` of any run (train_one_epoch raises it)."""
    import utils.train

    real = utils.train.train_one_epoch

    def interrupted(*args, **kwargs):
        if epoch_of(args, kwargs) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.train, "train_one_epoch", interrupted)
    try:
        yield
    finally:
        monkeypatch.setattr(utils.train, "train_one_epoch", real)


def interactive_signals() -> None:
    """For Popen(preexec_fn=...): the signal dispositions of a terminal. A shell starts background
    jobs (a CI script run with `&`, say) with SIGINT ignored, and Python then never turns Ctrl-C
    into KeyboardInterrupt; a test of what Ctrl-C does must start from the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)

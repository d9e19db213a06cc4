"""The run directory: created fresh (or reopened by --resume), locked while a process owns it,
and its small JSON files (config.json, state.json, test_metrics.json) written atomically."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from .errors import UsageError

RUN_STATES = ("running", "finished", "interrupted", "failed", "lr_find")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_predictions(path: Path, files: list[str], stats, class_names: list[str]) -> None:
    """A row per test image: its file, true and predicted class, and the five likeliest classes
    with their softmax probabilities (stats: an EvalStats kept with keep_predictions)."""
    k = len(stats.top_classes[0]) if stats.top_classes else 0
    tmp = path.with_name(f".{path.name}.tmp")
    # backslashreplace: a file name that is not UTF-8 stays readable, and the file stays UTF-8
    with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "true_class", "predicted_class", "correct",
                         *(f"top{i}_{what}" for i in range(1, k + 1) for what in ("class", "probability"))])
        for file, target, predicted, top, probabilities in zip(files, stats.targets, stats.predictions,
                                                               stats.top_classes, stats.top_probabilities):
            writer.writerow([file, class_names[target], class_names[predicted], int(target == predicted),
                             *(x for c, p in zip(top, probabilities) for x in (class_names[c], f"{p:.4f}"))])
    os.replace(tmp, path)


def environment(device) -> dict:
    """What a run's numbers also depend on, for config.json: the command line, the git commit of
    this code (where it is a git checkout), the package versions and the device."""
    import platform
    import subprocess
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = commit and bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    if device.type == "cuda":
        import torch

        device_name = torch.cuda.get_device_name(device)
    else:
        from .runtime import cpu_description

        device_name = cpu_description() if device.type == "cpu" else device.type
    return {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], "git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(),
            "packages": {name: version(name) for name in ("torch", "torchvision", "timm", "numpy", "pillow", "wandb")},
            "device": f"{device} ({device_name})"}


def write_state(run_dir: Path, state: str, **details) -> None:
    """state.json: how the run ended (read by `python -m utils.runs_table`)."""
    assert state in RUN_STATES, state
    write_json(run_dir / "state.json", {"state": state, **details})


MAX_NAME = 120  # characters of a run folder's name, well under any file system's limit


def create_run_dir(output_dir: str, name: str) -> Path:
    """A fresh folder output_dir/name (name-2, name-3, ... if taken); fails early if unwritable."""
    root = Path(output_dir).expanduser()
    safe = re.sub(r"[^A-Za-z0-9._,+=-]+", "_", name).strip("._") or "run"
    if len(safe) > MAX_NAME:  # file systems allow 255 bytes; a hash keeps long names apart
        safe = f"{safe[:MAX_NAME - 9]}-{hashlib.sha1(safe.encode()).hexdigest()[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 10_000):
            run_dir = root / (safe if attempt == 1 else f"{safe}-{attempt}")
            try:
                run_dir.mkdir()
            except FileExistsError:
                continue
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
            return run_dir
    except OSError as error:
        raise UsageError(f"cannot write to --output_dir '{root}' ({error.strerror}); choose a writable folder") from None
    raise UsageError(f"--output_dir '{root}' already holds 10,000 runs named {safe}; pass --run_name")


_held_locks: list = []  # released by release_run_dirs()


def own_run_dir(run_dir: Path):
    """Lock run_dir for this process, so two processes (say, the same --resume started twice)
    never write one run folder together."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(run_dir / ".run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(f"run folder '{run_dir}' is in use by another process; wait for it to end or "
                         "resume a different run") from None
    except OSError as error:
        raise UsageError(f"cannot lock run folder '{run_dir}' ({error.strerror or error}); "
                         "choose a writable --output_dir") from None
    _held_locks.append(lock)
    return lock


def release_run_dirs() -> None:
    while _held_locks:
        _held_locks.pop().release()

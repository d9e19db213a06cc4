"""Line runs up without wandb: one row per run directory.

    python -m utils.runs_table                   # every run under runs/
    python -m utils.runs_table runs/a runs/b     # these runs (or folders of runs)
    python -m utils.runs_table --csv table.csv   # the same table as CSV

Columns: name, script, state (finished / interrupted / running / failed / lr_find), epochs done (epochs_done), best
val_accuracy and its epoch, test_accuracy, mean train img/s, then the config keys whose values
differ between the listed runs. Sorted by best val_accuracy; runs of trainA and trainB are listed
in a table each (each with its own differing keys), the CSV holds them all. A broken or partial
run directory is listed with what could be read, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

BASE_COLUMNS = ("name", "script", "state", "epochs_done", "best_val_accuracy", "best_epoch", "test_accuracy", "img_s")
# Keys that differ between any two runs without saying anything about the recipe.
IGNORED_KEYS = {"run_name", "output_dir", "class_names", "wandb_project", "wandb_entity", "wandb_mode", "script"}


@dataclass
class RunRow:
    path: Path
    values: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _is_locked(run_dir: Path) -> bool:
    """True while a training process holds the run folder's lock."""
    lock_path = run_dir / ".run.lock"
    if not lock_path.exists():
        return False
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


def _is_float(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def run_state(run_dir: Path) -> str:
    saved = _read_json(run_dir / "state.json").get("state")
    if (run_dir / "test_metrics.json").exists():
        return "finished"
    if _is_locked(run_dir):
        return "running"
    if saved in ("interrupted", "failed", "lr_find"):  # lr_find: a learning-rate finder's run, nothing to test
        return saved
    return "failed"  # started (or crashed) without a clean ending


def read_run(run_dir: Path) -> RunRow:
    row = RunRow(run_dir, config=_read_json(run_dir / "config.json"))
    metrics = []
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            metrics = [r for r in csv.DictReader(f) if _is_float(r.get("val_accuracy"))]
    except (OSError, csv.Error, UnicodeDecodeError):
        pass

    def number(r, key):
        try:
            return float(r[key])
        except (KeyError, TypeError, ValueError):
            return float("nan")

    best = max(metrics, key=lambda r: number(r, "val_accuracy"), default=None)
    speeds = [number(r, "train_images_per_s") for r in metrics]
    speeds = [s for s in speeds if s == s]
    test = _read_json(run_dir / "test_metrics.json").get("test_accuracy")
    row.values = {
        "name": run_dir.name,
        "script": row.config.get("script", "?"),
        "state": run_state(run_dir),
        "epochs_done": len(metrics),
        "best_val_accuracy": number(best, "val_accuracy") if best else float("nan"),
        "best_epoch": int(number(best, "epoch")) if best and number(best, "epoch") == number(best, "epoch") else "-",
        "test_accuracy": float(test) if isinstance(test, (int, float)) else float("nan"),
        "img_s": sum(speeds) / len(speeds) if speeds else float("nan"),
    }
    return row


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path is a run directory (it holds config.json or metrics.csv) or a folder of them."""
    found = []
    for path in paths:
        if not path.is_dir():
            print(f"utils.runs_table: '{path}' is not a folder; skipped", file=sys.stderr)
            continue
        if any((path / name).exists() for name in ("config.json", "metrics.csv", "last.pt")):
            found.append(path)
        else:
            found.extend(sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                                and not p.name == "wandb"))
    return found


def differing_keys(rows: list[RunRow]) -> list[str]:
    """Config keys with more than one value among the runs whose config could be read."""
    readable = [r for r in rows if r.config]
    keys = sorted({k for r in readable for k in r.config} - IGNORED_KEYS)
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in readable}) > 1]


def table(rows: list[RunRow]) -> tuple[list[str], list[list[str]]]:
    keys = differing_keys(rows)
    rows = sorted(rows, key=lambda r: (-r.values["best_val_accuracy"] if r.values["best_val_accuracy"] == r.values["best_val_accuracy"]
                                       else float("inf"), r.values["name"]))

    def text(value) -> str:
        if isinstance(value, float):
            return "-" if value != value else (f"{value:.4f}" if value <= 1 else f"{value:.0f}")
        if isinstance(value, (list, dict)):
            return json.dumps(value)
        return str(value)

    header = [*BASE_COLUMNS, *keys]
    def setting(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, (list, dict)) or value == "":
            return json.dumps(value)
        return str(value).replace(" ", "_")
    body = [[text(r.values[c]) for c in BASE_COLUMNS] + [setting(r.config.get(k)) for k in keys] for r in rows]
    return header, body


def print_table(header: list[str], body: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in body:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.runs_table", description="Compare run directories.")
    parser.add_argument("dirs", nargs="*", default=["runs"], help="run directories or folders of them (default: runs)")
    parser.add_argument("--csv", metavar="PATH", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    runs = [read_run(p) for p in find_runs([Path(d).expanduser() for d in args.dirs])]
    if not runs:
        print(f"no run directories in {', '.join(args.dirs)}", file=sys.stderr)
        return 1
    scripts = sorted({r.values["script"] for r in runs} - {"?"})
    if len(scripts) < 2:
        print_table(*table(runs))
    else:  # a table per script: trainA's and trainB's settings have little in common
        groups = [(f"{script} runs:", [r for r in runs if r.values["script"] == script]) for script in scripts]
        groups.append(("runs whose config.json cannot be read:", [r for r in runs if r.values["script"] == "?"]))
        for index, (title, rows) in enumerate(g for g in groups if g[1]):
            print(f"{chr(10) if index else ''}{title}")
            print_table(*table(rows))
    header, body = table(runs)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Metrics to metrics.csv always, and to Weights & Biases when it is on.

This is the only module that imports wandb, and only when a run asks for it: with
--wandb_mode disabled nothing of wandb is imported.
"""

from __future__ import annotations

import csv
import math
import netrc
import os
import sys
from pathlib import Path
from typing import Any

from .interrupts import interrupts_deferred

CSV_COLUMNS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
    "epoch_time_s", "train_images_per_s",
)


def wandb_logged_in() -> bool:
    """Credentials without importing wandb: WANDB_API_KEY, or the key `wandb login` stores in netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        hosts = netrc.netrc(netrc_path).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_wandb_mode(requested: str) -> tuple[str, str]:
    """(mode, note): the mode a run will use and a line to tell the user why, if not obvious."""
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if requested == "auto" and env_mode in ("online", "offline", "disabled", "dryrun", "run"):
        requested = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
    if requested == "disabled":
        return "disabled", ""
    if os.environ.get("WANDB_SWEEP_ID"):
        return "online", ""  # the agent holds the credentials and the run to log into
    if requested in ("auto", "online") and not wandb_logged_in():
        why = "wandb is not logged in" if requested == "online" else "no wandb login found"
        return "offline", f"note: {why}; logging offline (upload later with `wandb sync`, or run `wandb login`)"
    if requested == "auto":
        return "online", ""
    return requested, ""


class MetricsCSV:
    """Append-only metrics.csv; on resume, rows past the checkpoint's epoch are dropped."""

    def __init__(self, path: Path, keep_through_epoch: int | None = None):
        self.path = path
        if keep_through_epoch is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_through_epoch]
            self._write(rows, "w")
        elif not path.exists():
            self._write([], "w")

    def _write(self, rows: list[dict], mode: str) -> None:
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())

    def append(self, row: dict) -> None:
        self._write([{k: _fmt(v) for k, v in row.items()}], "a")


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


class Tracker:
    """One run's logging. Every process may create one; only the main process writes."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        mode: str,
        project: str,
        entity: str,
        name: str,
        resume_id: str = "",
        keep_through_epoch: int | None = None,
        is_main: bool = True,
    ):
        self.run_dir = run_dir
        self.is_main = is_main
        self.wandb = None
        self.run = None
        self.csv = MetricsCSV(run_dir / "metrics.csv", keep_through_epoch) if is_main else None
        if not is_main:
            return
        mode, note = resolve_wandb_mode(mode)
        if note:
            print(note, file=sys.stderr)
        self.mode = mode
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # lazy: a disabled run never pays for (or depends on) wandb

        init_kwargs: dict[str, Any] = dict(
            config=config, name=name, dir=str(run_dir), mode=mode,
            settings=wandb.Settings(init_timeout=60, console="off"),
        )
        if not os.environ.get("WANDB_SWEEP_ID"):
            # Inside a sweep the agent decides project and entity; passing ours would clash.
            init_kwargs.update(project=project or None, entity=entity or None)
        if resume_id and mode == "online":
            init_kwargs.update(id=resume_id, resume="allow")
        try:
            self.run = wandb.init(**init_kwargs)
        except wandb.errors.Error as error:
            if mode != "online":
                raise
            print(f"note: wandb could not start online ({str(error).splitlines()[0][:100]}); logging offline",
                  file=sys.stderr)
            init_kwargs.update(mode="offline")
            init_kwargs.pop("resume", None)
            self.run = wandb.init(**init_kwargs)
        if name:
            self.run.name = name
        self.wandb = wandb
        self.run.define_metric("epoch")
        for key in ("train_*", "val_*", "lr"):
            self.run.define_metric(key, step_metric="epoch")
        self.run.define_metric("refit/epoch")
        self.run.define_metric("refit/*", step_metric="refit/epoch")

    @property
    def run_id(self) -> str:
        return self.run.id if self.run is not None else ""

    def log_epoch(self, metrics: dict) -> None:
        if not self.is_main:
            return
        self.csv.append(metrics)
        self.draw_curves()
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if _is_number(v)})

    def log_refit_epoch(self, metrics: dict) -> None:
        """--refit's epochs: to wandb under refit/ (metrics.csv and curves.png are the run's own)."""
        if self.is_main and self.run is not None:
            self.run.log({f"refit/{k}": v for k, v in metrics.items() if _is_number(v)})

    def draw_curves(self) -> None:
        """curves.png from metrics.csv (so a resumed run continues the same curves). A picture
        that cannot be drawn is worth a warning, never the run."""
        from .curves import plot_curves

        with interrupts_deferred():
            try:
                plot_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png", title=self.run_dir.name)
            except Exception as error:  # noqa: BLE001
                print(f"warning: could not draw curves.png ({type(error).__name__}: {str(error)[:100]})",
                      file=sys.stderr)

    def log_summary(self, metrics: dict) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                self.run.summary[key] = value

    def log_images(self, images: dict[str, Path]) -> None:
        if self.run is not None and images:
            self.run.log({key: self.wandb.Image(str(path)) for key, path in images.items()})

    def log_confusion_matrix(self, targets: list[int], predictions: list[int], class_names: list[str],
                             max_classes: int = 30) -> None:
        """wandb's interactive matrix, up to max_classes (its table grows with the square of the
        class count; confusion_matrix.png, logged as an image, covers more)."""
        if self.run is not None and len(class_names) <= max_classes:
            self.run.log({"confusion_matrix": self.wandb.plot.confusion_matrix(
                y_true=targets, preds=predictions, class_names=class_names)})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            curves = self.run_dir / "curves.png"
            if curves.exists():
                self.run.log({"curves": self.wandb.Image(str(curves))})
            self.run.finish(exit_code=exit_code)
            self.run = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))

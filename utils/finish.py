"""The end of a run: best.pt (and, with --refit, refit.pt) on the test folder, test_metrics.json,
the pictures, and state.json saying "finished"."""

from __future__ import annotations

import os
import time
from pathlib import Path
from torch import nn

from .actions import report_test
from .checkpoint import load_checkpoint
from .errors import EXIT_OK
from .evaluation import evaluate
from .features import test_features, val_tta
from .inputs import RunData
from data.loaders import CachedBatches

from .outputs import write_json, write_predictions, write_state
from .confusion import confusion_counts, most_confused
from .recipe import Run
from .runtime import Precision
from .tracking import Tracker


def test_of(run: Run, model: nn.Module, data: RunData, name: str):
    """model's test; where the epochs trained a head on frozen features, the head's on the test
    images' features, computed once for every checkpoint tested (their backbones are the same)."""
    if not run.on_features:
        return evaluate(model, data.loaders[2], run.precision, len(data.class_names), desc=f"test {name}",
                        keep_predictions=True, show_progress=run.dist.is_main, reduce=run.dist.reduce,
                        tta=run.cfg.tta)
    split = run.recipe.split_features
    features = test_features(split, model, data, run.precision, run.cfg)
    return evaluate(split(model)[1], features, Precision(run.precision.device), len(data.class_names),
                    desc=f"test {name}", keep_predictions=True, show_progress=False, tta=val_tta(features))


def test_best(run: Run, model: nn.Module, data: RunData, run_dir: Path, tracker: Tracker, after_test) -> int:
    """best.pt on the test folder (with --tta), and with --refit refit.pt after it, whose test is
    then the run's test_accuracy; test_metrics.json, then the pictures (of the last one tested)."""
    state, classes, main = run.state, data.class_names, run.dist.is_main
    tested = [("best.pt", f"best.pt (epoch {state.best_epoch}, val_accuracy {state.best_val_accuracy:.4f})")]
    if run.cfg.refit:
        epochs = f"{state.best_epoch} epoch{'s' * (state.best_epoch != 1)}"
        tested.append(("refit.pt", f"refit.pt ({epochs} on train + val)"))
    results = {}
    for name, header in tested:
        model.load_state_dict(load_checkpoint(run_dir / name)["model"])
        test = test_of(run, model, data, name)
        if main:
            best = {f"best_pt_{k}": v for k, v in results.items() if k in ("test_loss", "test_accuracy")}
            # the per-class table once, for the checkpoint the run reports (the last one tested)
            results = dict(report_test(test, classes, header, per_class_table=name == tested[-1][0]), **best)
    if not main:
        return EXIT_OK
    results.update(best_epoch=state.best_epoch, best_val_accuracy=state.best_val_accuracy, tested=name,
                   test_most_confused=most_confused(confusion_counts(test.targets, test.predictions, len(classes)),
                                                    classes))
    write_json(run_dir / "test_metrics.json", results)
    predictions_csv(run_dir, data, test)
    tracker.log_summary({k: v for k, v in results.items() if not isinstance(v, dict)})
    tracker.log_summary({f"test_accuracy/{k}": v for k, v in results["test_per_class_accuracy"].items()})
    if after_test is not None and not run.dist.enabled:
        after_test(model=model, precision=run.precision, test_set=data.test_set, test_stats=test, run_dir=run_dir,
                   tracker=tracker, class_names=classes)
    tracker.finish()
    write_state(run_dir, "finished")
    minutes = (time.perf_counter() - run.started) / 60
    print(f"saved {run_dir}/best.pt, {'refit.pt, ' if run.cfg.refit else ''}last.pt, metrics.csv, curves.png, "
          f"config.json, test_metrics.json, test_predictions.csv; the run took {minutes:.1f} min")
    return EXIT_OK


def predictions_csv(run_dir: Path, data: RunData, test) -> None:
    """test_predictions.csv for the checkpoint the run reports, where each prediction can be tied
    to its file: the images tested are the test folder's readable ones, in order (the cached path
    knows which; streaming, every file, unless one was skipped); their labels must match."""
    loader, samples = data.loaders[2], data.test_set.samples
    tested = [samples[i] for i in loader.indices.tolist()] if isinstance(loader, CachedBatches) else samples
    if [s.label for s in tested] != test.targets:
        print("test_predictions.csv not written: the tested images cannot be tied to their files "
              "(an unreadable test file skipped with --cache off, or several processes)")
        return
    files = [os.path.relpath(s.path, data.test_set.root) for s in tested]
    write_predictions(run_dir / "test_predictions.csv", files, test, data.class_names)

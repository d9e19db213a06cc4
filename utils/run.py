"""The run's life, shared by both scripts: data -> model (set from the data where the recipe asks,
trainA's --whiten) -> run directory -> training set-up -> fit() -> test of best.pt -> pictures.
A script contributes only a ModelRecipe.

Under torchrun every rank runs this; rank 0 alone prints, logs and writes files.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from data.augment import build_mix
from data.loaders import CachedBatches

from . import distributed
from .checkpoint import (CheckpointWriteError, CheckpointWriter, FitState, check_script, load_checkpoint,
                         restore_training_state)
from .ema import WeightEMA
from .errors import EXIT_DIVERGED, EXIT_INTERRUPTED
from .features import feature_inputs
from .finish import test_best
from .inputs import RunData, load_data, train_and_val
from .interrupts import sigterm_as_interrupt
from .lr_find import run_lr_find
from .optim import Optimisation, build_optimizer, build_scheduler
from .outputs import create_run_dir, environment, own_run_dir, release_run_dirs, write_json, write_state
from .runtime import make_precision, prepare_model, seed_everything
from .tracking import Tracker
from .recipe import ModelRecipe, Run
from .train import (DataWorkersDied, FitInputs, NonFiniteLoss, TrainingInterrupted, fit, is_stop_signal_death,
                    is_worker_death, refit)


def train_and_test(cfg, recipe: ModelRecipe, run_name: str, summary_text: Callable[[nn.Module], str] | None = None,
                   resume: str = "", after_test: Callable | None = None, lr_find_steps: int = 0) -> int:
    """Train with fit(), then evaluate best.pt on the test folder (or, with lr_find_steps, run
    the learning-rate finder instead). Returns the exit code."""
    dist_info, device_name = distributed.setup(cfg.device)
    try:
        distributed.check_batch_size(cfg.batch_size, dist_info.world)
        seed_everything(cfg.seed + dist_info.rank)  # dropout and mixing draw differently per rank
        checkpoint = load_checkpoint(resume) if resume else None
        if checkpoint is not None:
            check_script(checkpoint, recipe.script, resume)
        run = Run(cfg, recipe, dist_info, make_precision(cfg, device_name), checkpoint)
        # SIGTERM (a wandb agent, a cluster's time limit) ends the run as Ctrl-C does in every phase:
        # reading data, a probe, the epochs (fit() says so again), the test
        with sigterm_as_interrupt():
            return _live(run, run_name, summary_text, resume, after_test, lr_find_steps)
    finally:
        release_run_dirs()
        distributed.teardown()


def _live(run: Run, run_name: str, summary_text, resume: str, after_test, lr_find_steps: int) -> int:
    data = load_data(run)
    # Build (and download) the model before creating the run directory, so a failure leaves nothing.
    model = prepare_model(run.recipe.new_model(len(data.class_names)), run.precision)
    if run.recipe.init_from_data is not None and run.checkpoint is None:
        run.say(run.recipe.init_from_data(model, data, run.precision))
    run_dir = open_run_dir(run, run_name, resume)
    try:
        return _in_run_dir(run, run_dir, model, data, run_name, summary_text, after_test, lr_find_steps)
    except KeyboardInterrupt:  # outside the epochs (fit() saves and reports its own)
        return interrupted_between_steps(run, run_dir)
    except RuntimeError as error:  # the refit's or the test's loader workers killed by the group's signal
        if not is_stop_signal_death(error):
            raise
        return interrupted_between_steps(run, run_dir)


def _in_run_dir(run: Run, run_dir: Path, model: nn.Module, data: RunData, run_name: str, summary_text, after_test,
                lr_find_steps: int) -> int:
    cfg, main = run.cfg, run.dist.is_main
    if summary_text is not None and main:  # the model that trains, with the data's class count
        text = summary_text(model)
        print(text)
        (run_dir / "model_summary.txt").write_text(text + "\n")
    opt, state, trained = set_up_training(run, model, data, run_dir)
    config = asdict(cfg)
    if main:
        write_json(run_dir / "config.json", dict(config, script=run.recipe.script, class_names=data.class_names,
                                                 environment=environment(run.precision.device)))
        write_state(run_dir, "running")
    tracker = Tracker(run_dir, config, cfg.wandb_mode, cfg.wandb_project, cfg.wandb_entity, run_name,
                      resume_id=run.checkpoint.get("wandb_run_id", "") if run.checkpoint else "",
                      keep_through_epoch=state.epoch if state else None, is_main=main)
    meta = {"script": run.recipe.script, "config": config, "class_names": data.class_names,
            "wandb_run_id": tracker.run_id, "format": 1, "splits": data.splits}
    describe(run, run_dir, data)
    inputs = fit_inputs(run, model, trained, data)
    if lr_find_steps:
        return run_lr_find(run, model, inputs, opt, lr_find_steps, run_dir, tracker)
    code = train(run, model, inputs, opt, state, run_dir, meta, tracker)
    if code is None and cfg.refit and not refit_done(run, run_dir):
        code = refit_on_train_and_val(run, data, run_dir, meta, tracker)
    if code is not None:
        return code
    return test_best(run, model, data, run_dir, tracker, after_test)


def open_run_dir(run: Run, run_name: str, resume: str) -> Path:
    """A fresh run directory (the resumed run's own with --resume), locked by rank 0."""
    run_dir = None
    if run.dist.is_main:
        run_dir = Path(resume).resolve().parent if run.checkpoint is not None else create_run_dir(run.cfg.output_dir,
                                                                                                   run_name)
        own_run_dir(run_dir)  # held until train_and_test returns
    if run.dist.enabled:
        run_dir = distributed.broadcast_object(run_dir)
    return run_dir


def set_up_training(run: Run, model: nn.Module, data: RunData, run_dir: Path):
    """Optimizer, schedule, scaler, EMA (restored from last.pt on --resume), and the module the
    batches go through (DDP-wrapped under torchrun, compiled with --compile)."""
    cfg, recipe, precision = run.cfg, run.recipe, run.precision
    optimizer = build_optimizer(recipe.param_groups(model), cfg.optimizer, cfg.lr, cfg.momentum)
    steps_per_epoch = len(data.loaders[0])
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs * steps_per_epoch,
                                round(cfg.warmup_epochs * steps_per_epoch))
    opt = Optimisation(optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                       precision.scaler(),
                       mix=build_mix(cfg.mixup_alpha, cfg.cutmix_alpha, len(data.class_names)),
                       before_epoch=functools.partial(recipe.at_epoch_start, model) if recipe.at_epoch_start else None)
    if cfg.ema_decay > 0:
        # With cached features, validation batches are features: they go through the head only.
        opt.ema = WeightEMA(model, cfg.ema_decay,
                            (lambda m: recipe.split_features(m)[1]) if run.on_features else (lambda m: m))
    state = None
    if run.checkpoint is not None:
        state = restore_training_state(run.checkpoint, model, optimizer, scheduler, opt.scaler, opt.ema,
                                       run.dist.rank, run.dist.world)
        run.say(f"resuming {run_dir} after epoch {state.epoch} (best val_accuracy {state.best_val_accuracy:.4f})")
    trained = (distributed.wrap_ddp(model, cfg.sync_bn, recipe.find_unused_parameters, precision.device)
               if run.dist.enabled else model)
    if cfg.compile:
        # Checkpoints keep saving `model`, whose state_dict keys the compiled wrapper would prefix.
        trained = torch.compile(trained)
    return opt, state, trained


def describe(run: Run, run_dir: Path, data: RunData) -> None:
    precision = run.precision
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[precision.autocast_dtype]
    run.say(f"run directory: {run_dir}\ndevice: {precision.device} ({amp_name}"
            f"{', channels_last' if precision.channels_last else ''}), "
            f"{'decoded-image cache' if isinstance(data.loaders[0], CachedBatches) else f'{data.num_workers} data workers'}"
            f"{f', {run.dist.world} processes' if run.dist.enabled else ''}")


def fit_inputs(run: Run, model: nn.Module, trained: nn.Module, data: RunData) -> FitInputs:
    """The images through the whole model, or (trainB's feature cache) features through the head."""
    train_loader, val_loader, _ = data.loaders
    if not run.on_features:
        return FitInputs(trained, train_loader, val_loader, run.precision, run.cfg.tta, len(data.class_names))
    return feature_inputs(run.recipe.split_features, model, data, run.precision, run.cfg, run.say)


def train(run: Run, model: nn.Module, inputs: FitInputs, opt: Optimisation, state: FitState | None, run_dir: Path,
          meta: dict, tracker: Tracker) -> int | None:
    """fit(); an exit code if it ended early (NaN, Ctrl-C), else None with run.state set."""
    cfg, main, script = run.cfg, run.dist.is_main, run.recipe.script
    state = state or FitState()  # fit() updates it in place, so an early end still knows the best epoch
    try:
        writer = CheckpointWriter(run_dir, meta, model, opt, run.dist)  # saves the unwrapped model
        run.state = fit(inputs, opt, writer, cfg, tracker.log_epoch, state, run.dist)
        return None
    except NonFiniteLoss as error:
        kept = (f"best.pt (epoch {state.best_epoch}) is kept" if (run_dir / "best.pt").exists()
                else "no epoch finished, so there is no best.pt")
        if main:
            print(f"{script}.py: error: {error}; training stopped, {kept} in {run_dir}; lower --lr or use --amp off",
                  file=sys.stderr)
            write_state(run_dir, "failed", reason=str(error))
        tracker.log_summary({"diverged": True})
        tracker.finish(exit_code=EXIT_DIVERGED)
        return EXIT_DIVERGED
    except (TrainingInterrupted, DataWorkersDied) as interrupt:
        if main:
            print(f"\n{interrupt}; continue with: python {script}.py --resume {interrupt.checkpoint}", file=sys.stderr)
            write_state(run_dir, "interrupted", epoch=interrupt.epoch, reason=str(interrupt))
        tracker.finish(exit_code=EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except CheckpointWriteError as error:
        if main:
            print(f"{script}.py: error: {error}", file=sys.stderr)
            with contextlib.suppress(OSError):  # the same full disk may refuse state.json too
                write_state(run_dir, "failed", reason=str(error))
        tracker.finish(exit_code=EXIT_DIVERGED)
        return EXIT_DIVERGED


def refit_on_train_and_val(run: Run, data: RunData, run_dir: Path, meta: dict, tracker: Tracker) -> int | None:
    """--refit (sklearn's refit=True): a fresh model trained as this run's was, on the train and val
    images together, for best.pt's number of epochs on a schedule as long as the run's in epochs
    (the learning rates of those epochs, up to the rounding of steps), saved as refit.pt. An exit
    code if it failed, else None."""
    epochs, both = run.state.best_epoch, train_and_val(run, data)
    run.say(f"refit: a fresh model on the {len(both.train_set)} train and val images for {epochs} "
            f"epoch{'s' * (epochs != 1)} (best.pt's)")
    seed_everything(run.cfg.seed + run.dist.rank)
    model = prepare_model(run.recipe.new_model(len(data.class_names)), run.precision)
    if run.recipe.init_from_data is not None:
        run.say(run.recipe.init_from_data(model, both, run.precision))
    fresh = replace(run, checkpoint=None)
    opt, _, trained = set_up_training(fresh, model, both, run_dir)
    try:
        refit(fit_inputs(fresh, model, trained, both), opt, epochs, run.cfg.seed, tracker.log_refit_epoch, run.dist)
        CheckpointWriter(run_dir, dict(meta, refit_epochs=epochs), model, opt, run.dist).save(
            "refit.pt", FitState(epoch=epochs, best_epoch=epochs), full=False)
        return None
    except (RuntimeError, CheckpointWriteError) as error:  # NonFiniteLoss is one, like a DataLoader worker's death
        if isinstance(error, RuntimeError) and not isinstance(error, NonFiniteLoss) and (
                not is_worker_death(error) or is_stop_signal_death(error)):
            raise  # a stop signal's worker deaths are an interrupt (_live)
        why = (str(error) if not isinstance(error, RuntimeError) or isinstance(error, NonFiniteLoss)
               else "data loading workers died (try --num_workers 0)")
    if run.dist.is_main:
        print(f"{run.recipe.script}.py: error: the refit stopped: {why}; best.pt is kept in {run_dir}, test it with "
              f"--test_only --checkpoint {run_dir / 'best.pt'}", file=sys.stderr)
        with contextlib.suppress(OSError):  # the same full disk may refuse state.json too
            write_state(run_dir, "failed", reason=f"refit: {why}")
    tracker.finish(exit_code=EXIT_DIVERGED)
    return EXIT_DIVERGED


def refit_done(run: Run, run_dir: Path) -> bool:
    """A resumed run that trained no epoch and already has its refit.pt (interrupted in the test
    after the refit) tests it rather than refitting again."""
    return (run.checkpoint is not None and run.state.epoch <= int(run.checkpoint.get("epoch", 0))
            and (run_dir / "refit.pt").is_file())


def interrupted_between_steps(run: Run, run_dir: Path) -> int:
    """Ctrl-C outside the epochs (setting up, the final test, the pictures, or a second Ctrl-C
    while last.pt was written): say what is kept, and leave state.json saying so."""
    if run.dist.is_main:
        script = run.recipe.script
        kept = [name for name in ("best.pt", "last.pt", "test_metrics.json") if (run_dir / name).is_file()]
        if "last.pt" in kept:
            how = (f"{', '.join(kept)} kept in {run_dir}; finish the run (what is left of it: epochs, refit, test) "
                   f"with: python {script}.py --resume {run_dir / 'last.pt'}")
        else:
            how = f"no epoch had finished, so nothing was kept in {run_dir}"
        print(f"\n{script}.py: interrupted; {how}", file=sys.stderr)
        with contextlib.suppress(OSError):
            write_state(run_dir, "interrupted", reason=f"interrupted outside training; kept: {', '.join(kept) or 'nothing'}")
    return EXIT_INTERRUPTED

"""One training loop for both scripts: fit() = train_one_epoch() + evaluate() per epoch, with
AMP, checkpoints, early stopping, Ctrl-C and NaN handling; refit() = the same epochs without
validation (--refit). The loop is on one screen at the end of the file: step() (one batch),
train_one_epoch() (one pass), fit() (the epochs, validation, checkpoints); what they lean on
(the errors, the epoch's running sums, what an interrupt saves) comes first."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from data.progress import batch_size_of, progress

from .checkpoint import CheckpointWriter, FitState
from .distributed import DistInfo
from .evaluation import evaluate
from .interrupts import last_words, sigterm_as_interrupt, start_iterating
from .optim import Optimisation
from .runtime import Precision

LOG_EVERY = 20  # steps between progress-bar refreshes; each refresh is one host-device sync


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"loss became NaN/inf at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


class DataWorkersDied(Exception):
    """DataLoader workers were killed (most often: out of shared memory); last.pt was saved."""

    def __init__(self, error: RuntimeError, checkpoint: Path, epoch: int):
        shm = shared_memory_mib()
        reason = (f"out of shared memory (/dev/shm holds {shm} MiB)" if "shared memory" in str(error) or
                  (shm is not None and shm < 1024) else " ".join(str(error).split())[:120])
        super().__init__(f"data loading workers died in epoch {epoch}: {reason}; saved {checkpoint}; resume with "
                         "--num_workers 0, or give the container more shared memory (docker run --shm-size=2g)")
        self.checkpoint, self.epoch = checkpoint, epoch


def is_worker_death(error: RuntimeError) -> bool:
    text = str(error)
    return "DataLoader worker" in text or "shared memory" in text


def is_stop_signal_death(error: RuntimeError) -> bool:
    """Workers killed by Ctrl-C or SIGTERM sent to the whole group: an interrupt, not a fault."""
    return "DataLoader worker" in str(error) and ("Terminated" in str(error) or "Interrupt" in str(error))


def shared_memory_mib() -> int | None:
    try:
        stats = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return stats.f_blocks * stats.f_frsize // 2**20


class TrainingInterrupted(Exception):
    def __init__(self, checkpoint: Path, epoch: int):
        super().__init__(f"interrupted during epoch {epoch}; saved {checkpoint} (the start of epoch {epoch}: a "
                         f"resume replays it) and the weights so far as interrupted.pt")
        self.checkpoint, self.epoch = checkpoint, epoch


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class EpochMeter:
    """One training pass's running loss and accuracy, kept on the device (a host sync only every
    LOG_EVERY steps, when the recent losses are also checked for NaN/inf)."""

    def __init__(self, device: torch.device, epoch: int, steps: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None):
        self.device, self.epoch, self.steps, self.reduce = device, epoch, steps, reduce
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.images = 0
        self.window: list[torch.Tensor] = []  # recent losses, checked for NaN/inf at each refresh
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        batch_size = targets.shape[0]
        self.images += batch_size
        self.loss_sum += loss.detach() * batch_size
        self.correct += (logits.detach().argmax(1) == targets).sum()
        self.window.append(loss.detach())

    def due(self, position: int) -> bool:
        return position % LOG_EVERY == 0 or position == self.steps

    def check(self, position: int) -> dict:
        """NaN/inf check of the recent losses (raises NonFiniteLoss); the progress bar's figures."""
        _check_finite(self.window, self.epoch, position, self.reduce)
        self.window.clear()
        elapsed = time.perf_counter() - self.start
        return dict(loss=f"{self.loss_sum.item() / self.images:.3f}", acc=f"{self.correct.item() / self.images:.3f}",
                    img_s=f"{self.images / elapsed:.0f}")

    def finish(self) -> EpochStats:
        _check_finite(self.window, self.epoch, self.steps, self.reduce)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        loss_sum, correct, images = self.loss_sum, self.correct, self.images
        if self.reduce is not None:  # every rank's share, so the numbers mean what one process would report
            counts = self.reduce(torch.stack([loss_sum.double(), correct.double(),
                                              torch.tensor(float(images), device=self.device, dtype=torch.float64)]))
            loss_sum, correct, images = counts[0], counts[1], int(counts[2])
        images_seen = max(images, 1)
        return EpochStats(float(loss_sum) / images_seen, float(correct) / images_seen, images, seconds)


def _check_finite(window: list[torch.Tensor], epoch: int, last_step: int,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Raise NonFiniteLoss if a loss in window is NaN/inf. Under DDP the count of bad losses is
    all-reduced (every rank checks at the same steps), so all ranks stop together instead of the
    healthy ones waiting forever in the next collective."""
    if not window:
        if reduce is None:
            return
        window = [torch.zeros(())]
    finite = torch.isfinite(torch.stack(window))
    bad = (~finite).sum()
    if reduce is not None:
        bad = reduce(bad.reshape(1).to(torch.float32))[0]
    if bool(bad > 0):
        local = (~finite).nonzero()
        first_bad = int(local[0, 0]) if len(local) else 0  # another rank's NaN: the window's first step
        raise NonFiniteLoss(epoch, last_step - len(window) + 1 + first_bad)


@dataclass
class FitInputs:
    """What fit() trains and validates: the model's images, or (trainB's feature cache) a head's
    features; module is what batches go through (maybe DDP-wrapped or compiled)."""
    module: nn.Module
    train: object
    val: object
    precision: Precision
    tta: str
    num_classes: int


class _Epoch:
    """The epoch fit() is in, for what an interrupt reports."""
    number = 0


@contextlib.contextmanager
def last_pt_on_interrupt(writer: CheckpointWriter, state: FitState):
    """Ctrl-C (or SIGTERM) or dying DataLoader workers inside the block: last.pt keeps the start of
    the interrupted epoch (a resume replays it exactly), interrupted.pt the weights as they are
    (CheckpointWriter.save_interrupted); then raise TrainingInterrupted or DataWorkersDied."""
    at = _Epoch()
    try:
        yield at
    except KeyboardInterrupt:
        with last_words():
            writer.save_interrupted(state)
        raise TrainingInterrupted(writer.run_dir / "last.pt", at.number) from None
    except RuntimeError as error:
        if not is_worker_death(error):
            raise
        with last_words():
            writer.save_interrupted(state)
        if is_stop_signal_death(error):  # the signal reached the workers before this process
            raise TrainingInterrupted(writer.run_dir / "last.pt", at.number) from None
        raise DataWorkersDied(error, writer.run_dir / "last.pt", at.number) from None


def train_epoch(inputs: FitInputs, opt: Optimisation, seed: int, epoch: int, dist: DistInfo) -> tuple[float, EpochStats]:
    """One epoch of fit() or refit(): (its starting lr, its stats)."""
    # Shuffle and worker seeds depend on (seed, epoch) only: a resumed run sees the same batches.
    if getattr(inputs.train, "generator", None) is not None:
        inputs.train.generator.manual_seed(seed * 1_000_003 + epoch)
    if opt.before_epoch is not None:
        opt.before_epoch(epoch)
    lr = opt.optimizer.param_groups[0]["lr"]
    return lr, train_one_epoch(inputs.module, inputs.train, opt, inputs.precision, epoch, reduce=dist.reduce,
                               show_progress=dist.is_main)


def refit(inputs: FitInputs, opt: Optimisation, epochs: int, seed: int, log_epoch: Callable[[dict], None],
          dist: DistInfo = DistInfo()) -> None:
    """--refit's epochs: fit()'s training without validation (the val images are training data
    now) for a number of epochs chosen before, on a schedule built for the run's full length. A
    NaN raises NonFiniteLoss; Ctrl-C raises KeyboardInterrupt (the caller keeps best.pt)."""
    for epoch in range(1, epochs + 1):
        lr, train = train_epoch(inputs, opt, seed, epoch, dist)
        metrics = {"epoch": epoch, "train_loss": train.loss, "train_accuracy": train.accuracy, "lr": lr,
                   "epoch_time_s": train.seconds, "train_images_per_s": train.images_per_s}
        log_epoch(metrics)
        if dist.is_main:
            tqdm.write(f"refit epoch {epoch}/{epochs}  train_loss {train.loss:.4f}  train_accuracy "
                       f"{train.accuracy:.4f}  lr {lr:.2e}  {train.images_per_s:.0f} img/s  {train.seconds:.1f}s")


# ---- the loop: one batch, one pass, the epochs ----------------------------------------------

def step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, opt: Optimisation,
         precision: Precision) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch (opt.mix turns its labels into soft targets first):
    (loss, logits, the labels accuracy counts against: each mixed image's dominant one)."""
    soft_targets = targets
    if opt.mix is not None:
        inputs, soft_targets = opt.mix(inputs, targets)
        targets = soft_targets.argmax(1)
    with precision.autocast():
        logits = model(inputs)
        loss = opt.loss_fn(logits.float(), soft_targets)
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    return loss, logits, targets


def train_one_epoch(model: nn.Module, loader, opt: Optimisation, precision: Precision, epoch: int, *,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    show_progress: bool = True) -> EpochStats:
    """One pass over loader, a step a batch, the schedule and opt.ema after each. reduce:
    DistInfo.reduce under torchrun."""
    model.train()
    meter = EpochMeter(precision.device, epoch, len(loader), reduce)
    bar = progress(start_iterating(loader), f"epoch {epoch} train", len(loader), per_item=batch_size_of(loader),
                   show=show_progress)
    for position, inputs, targets in precision.batches(bar):
        loss, logits, targets = step(model, inputs, targets, opt, precision)
        opt.scheduler.step()
        if opt.ema is not None:
            opt.ema.update()
        meter.add(loss, logits, targets)
        if meter.due(position):
            bar.set_postfix(**meter.check(position), refresh=False)
    return meter.finish()


def fit(inputs: FitInputs, opt: Optimisation, writer: CheckpointWriter, cfg, log_epoch: Callable[[dict], None],
        state: FitState | None = None, dist: DistInfo = DistInfo()) -> FitState:
    """Train for cfg.epochs (from state.epoch on), validating after each epoch, keeping best.pt
    and last.pt, stopping after cfg.patience epochs without a better val_accuracy (0 = never).
    With opt.ema, validation and best.pt use the averaged weights (last.pt holds both). Ctrl-C or
    SIGTERM leaves last.pt at the interrupted epoch's start (interrupted.pt: the weights so far)
    and raises TrainingInterrupted; a NaN/inf loss raises NonFiniteLoss."""
    state, opt.scaler = state or FitState(), opt.scaler or inputs.precision.scaler()
    if cfg.patience and state.epochs_without_improvement >= cfg.patience:
        return state  # stopped early before a resume that only wants the --refit
    if state.epoch == 0:  # a Ctrl-C in the first epoch then resumes from the run's start
        writer.save("last.pt", state, full=True)
    with sigterm_as_interrupt(), last_pt_on_interrupt(writer, state) as at:
        for at.number in range(state.epoch + 1, cfg.epochs + 1):
            epoch = at.number
            lr, train = train_epoch(inputs, opt, cfg.seed, epoch, dist)
            val = evaluate(inputs.module if opt.ema is None else opt.ema.eval_model(), inputs.val, inputs.precision,
                           inputs.num_classes, desc=f"epoch {epoch} val", show_progress=dist.is_main,
                           reduce=dist.reduce, tta=inputs.tta)
            metrics = {"epoch": epoch, "train_loss": train.loss, "train_accuracy": train.accuracy,
                       "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": lr,
                       "epoch_time_s": train.seconds, "train_images_per_s": train.images_per_s}
            if state.record(metrics):
                writer.save("best.pt", state, full=False)
            log_epoch(metrics)
            writer.save("last.pt", state, full=True)
            dist.wait_for_all()
            if dist.is_main:
                tqdm.write(epoch_line(metrics, cfg.epochs, state.best_epoch == epoch, opt.optimizer.param_groups[0]["lr"]))
            if cfg.patience and state.epochs_without_improvement >= cfg.patience:
                if dist.is_main:
                    tqdm.write(f"early stop: val_accuracy has not improved for {cfg.patience} epochs "
                               f"(best {state.best_val_accuracy:.4f} at epoch {state.best_epoch})")
                break
    return state


def epoch_line(m: dict, epochs: int, improved: bool, lr_end: float | None = None) -> str:
    """The epoch's one console line; lr as the epoch's first and last value (metrics.csv keeps the
    first): a one-cycle run's first epoch is its warm-up, 1.25e-04..2.00e-03, not 1.25e-04."""
    lr = f"{m['lr']:.2e}" + (f"..{lr_end:.2e}" if lr_end is not None and f"{lr_end:.2e}" != f"{m['lr']:.2e}" else "")
    return (f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  train_accuracy {m['train_accuracy']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_accuracy {m['val_accuracy']:.4f}{' *' if improved else ''}  "
            f"lr {lr}  {m['train_images_per_s']:.0f} img/s  {m['epoch_time_s']:.1f}s")

"""One training loop for both scripts: fit() = train_one_epoch() + evaluate() per epoch, with
AMP, checkpoints, early stopping, Ctrl-C and NaN handling."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import CheckpointWriter, FitState
from .ema import WeightEMA
from .evaluation import evaluate
from .interrupts import last_words, sigterm_as_interrupt, start_iterating
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


def shared_memory_mib() -> int | None:
    try:
        stats = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return stats.f_blocks * stats.f_frsize // 2**20


class TrainingInterrupted(Exception):
    def __init__(self, checkpoint: Path, epoch: int):
        super().__init__(f"interrupted during epoch {epoch}; saved {checkpoint}")
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


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, loss_fn, precision: Precision,
                    epoch: int, show_progress: bool = True,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    mix: Callable | None = None, ema: WeightEMA | None = None) -> EpochStats:
    """One pass over loader. mix (MixUp/CutMix) turns a batch's labels into soft targets; the
    accuracy is then counted against each mixed image's dominant label. ema is updated after
    every optimizer step."""
    model.train()
    device = precision.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    images = 0
    window: list[torch.Tensor] = []  # recent losses, checked for NaN/inf at each refresh
    start = time.perf_counter()
    bar = tqdm(start_iterating(loader), desc=f"epoch {epoch} train", total=len(loader), leave=False,
               disable=None if show_progress else True, dynamic_ncols=True)
    for step, batch in enumerate(bar, start=1):
        if batch is None:  # every file in the batch was unreadable
            continue
        inputs, targets = precision.to_device(*batch)
        if mix is not None:
            inputs, soft_targets = mix(inputs, targets)
            targets = soft_targets.argmax(1)
        else:
            soft_targets = targets
        with precision.autocast():
            logits = model(inputs)
            loss = loss_fn(logits.float(), soft_targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update()
        batch_size = targets.shape[0]
        images += batch_size
        loss_sum += loss.detach() * batch_size
        correct += (logits.detach().argmax(1) == targets).sum()
        window.append(loss.detach())
        if step % LOG_EVERY == 0 or step == len(loader):
            _check_finite(window, epoch, step, reduce)
            window.clear()
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum.item() / images:.3f}", acc=f"{correct.item() / images:.3f}",
                            img_s=f"{images / elapsed:.0f}", refresh=False)
    _check_finite(window, epoch, len(loader), reduce)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if reduce is not None:  # every rank's share, so the numbers mean what one process would report
        counts = reduce(torch.stack([loss_sum.double(), correct.double(),
                                     torch.tensor(float(images), device=device, dtype=torch.float64)]))
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
class Optimisation:
    """What fit() steps with: the optimizer and its schedule, the loss, and the per-step tools."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: nn.Module
    scaler: torch.amp.GradScaler | None = None  # None: made from the precision (enabled for fp16)
    mix: Callable | None = None  # MixUp/CutMix on train batches
    ema: WeightEMA | None = None  # averaged weights, validated and saved as best.pt
    before_epoch: Callable[[int], None] | None = None  # e.g. trainB's gradual unfreezing


@dataclass
class DistContext:
    """How this process takes part in a torchrun job; the defaults are one process alone."""
    is_main: bool = True
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # all-reduce sum of count tensors
    barrier: Callable[[], None] | None = None
    gather: Callable[[object], list] | None = None  # every rank's object, on every rank


def fit(model: nn.Module, train_loader, val_loader, opt: Optimisation, *, epochs: int, precision: Precision,
        num_classes: int, run_dir: Path, checkpoint_meta: dict, log_epoch: Callable[[dict], None],
        patience: int = 0, seed: int = 0, state: FitState | None = None, tta: str = "none",
        unwrap: Callable[[nn.Module], nn.Module] = lambda m: m, dist: DistContext = DistContext()) -> FitState:
    """Train for epochs (from state.epoch on), validating after each, keeping best.pt/last.pt.

    model is what the batches go through (maybe DDP-wrapped or compiled; unwrap(model) is saved).
    With opt.ema, validation and best.pt use the averaged weights; last.pt holds the raw weights
    and the average, so a resume is exact. Ctrl-C (or SIGTERM) saves last.pt and raises
    TrainingInterrupted; a NaN/inf loss raises NonFiniteLoss.
    """
    state = state or FitState()
    if opt.scaler is None:
        opt.scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.autocast_dtype == torch.float16)
    writer = CheckpointWriter(run_dir, checkpoint_meta, unwrap(model), opt, dist)
    epoch = state.epoch + 1
    with sigterm_as_interrupt():
        try:
            for epoch in range(state.epoch + 1, epochs + 1):
                if _one_epoch(model, train_loader, val_loader, opt, precision, num_classes, epoch, epochs, seed,
                              state, writer, log_epoch, tta, dist, patience):
                    break
        except KeyboardInterrupt:
            # Keep what was trained: the weights and optimizer as they are now. Resuming
            # restarts this epoch from them.
            with last_words():
                writer.save("last.pt", state, full=True, interrupted=True)
            raise TrainingInterrupted(run_dir / "last.pt", epoch) from None
        except RuntimeError as error:
            if not is_worker_death(error):
                raise
            with last_words():
                writer.save("last.pt", state, full=True, interrupted=True)
            raise DataWorkersDied(error, run_dir / "last.pt", epoch) from None
    return state


def _one_epoch(model, train_loader, val_loader, opt: Optimisation, precision: Precision, num_classes: int,
               epoch: int, epochs: int, seed: int, state: FitState, writer: CheckpointWriter, log_epoch,
               tta: str, dist: DistContext, patience: int) -> bool:
    """Train and validate one epoch, save, log; True when early stopping ends the run."""
    # The loader's shuffle and worker seeds depend on (seed, epoch) only, so a resumed run sees
    # the same batches as an uninterrupted one.
    generator = getattr(train_loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed * 1_000_003 + epoch)
    if opt.before_epoch is not None:
        opt.before_epoch(epoch)
    lr = opt.optimizer.param_groups[0]["lr"]
    train = train_one_epoch(model, train_loader, opt.optimizer, opt.scheduler, opt.scaler, opt.loss_fn, precision,
                            epoch, show_progress=dist.is_main, reduce=dist.reduce, mix=opt.mix, ema=opt.ema)
    val = evaluate(model if opt.ema is None else opt.ema.eval_model(), val_loader, precision, num_classes,
                   desc=f"epoch {epoch} val", show_progress=dist.is_main, reduce=dist.reduce, tta=tta)
    metrics = {"epoch": epoch, "train_loss": train.loss, "train_accuracy": train.accuracy, "val_loss": val.loss,
               "val_accuracy": val.accuracy, "lr": lr, "epoch_time_s": train.seconds,
               "train_images_per_s": train.images_per_s}
    state.epoch, state.last_metrics = epoch, metrics
    improved = val.accuracy > state.best_val_accuracy
    if improved:
        state.best_val_accuracy, state.best_epoch = val.accuracy, epoch
        state.epochs_without_improvement = 0
        writer.save("best.pt", state, full=False)
    else:
        state.epochs_without_improvement += 1
    log_epoch(metrics)
    writer.save("last.pt", state, full=True)
    if dist.barrier is not None:
        dist.barrier()
    if dist.is_main:
        tqdm.write(f"epoch {epoch}/{epochs}  train_loss {train.loss:.4f}  train_accuracy {train.accuracy:.4f}  "
                   f"val_loss {val.loss:.4f}  val_accuracy {val.accuracy:.4f}{' *' if improved else ''}  "
                   f"lr {lr:.2e}  {train.images_per_s:.0f} img/s  {train.seconds:.1f}s")
    if patience and state.epochs_without_improvement >= patience:
        if dist.is_main:
            tqdm.write(f"early stop: val_accuracy has not improved for {patience} epochs "
                       f"(best {state.best_val_accuracy:.4f} at epoch {state.best_epoch})")
        return True
    return False

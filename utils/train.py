"""One training loop for both scripts: fit() = train_one_epoch() + evaluate() per epoch, with
AMP, checkpoints, early stopping, Ctrl-C and NaN handling."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import atomic_torch_save, capture_rng_state, restore_rng_state

LOG_EVERY = 20  # steps between progress-bar refreshes; each refresh is one host-device sync


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"loss became NaN/inf at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


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


@dataclass
class EvalStats:
    loss: float
    accuracy: float
    images: int
    per_class_correct: list[int]
    per_class_total: list[int]
    predictions: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)

    def per_class_accuracy(self) -> list[float]:
        return [c / t if t else float("nan") for c, t in zip(self.per_class_correct, self.per_class_total)]


@dataclass
class Precision:
    """How tensors are laid out and computed on the training device."""
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        return images, labels.to(self.device, non_blocking=True)


@dataclass
class FitState:
    """What a checkpoint needs to continue a run exactly where it stopped."""
    epoch: int = 0  # completed epochs
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    last_metrics: dict = field(default_factory=dict)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, loss_fn, precision: Precision,
                    epoch: int, show_progress: bool = True,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EpochStats:
    model.train()
    device = precision.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    images = 0
    window: list[torch.Tensor] = []  # recent losses, checked for NaN/inf at each refresh
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=None if show_progress else True, dynamic_ncols=True)
    for step, batch in enumerate(bar, start=1):
        if batch is None:  # every file in the batch was unreadable
            continue
        inputs, targets = precision.to_device(*batch)
        with precision.autocast():
            logits = model(inputs)
            loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        batch_size = targets.shape[0]
        images += batch_size
        loss_sum += loss.detach() * batch_size
        correct += (logits.detach().argmax(1) == targets).sum()
        window.append(loss.detach())
        if step % LOG_EVERY == 0 or step == len(loader):
            _check_finite(window, epoch, step)
            window.clear()
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum.item() / images:.3f}", acc=f"{correct.item() / images:.3f}",
                            img_s=f"{images / elapsed:.0f}", refresh=False)
    _check_finite(window, epoch, len(loader))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if reduce is not None:  # every rank's share, so the numbers mean what one process would report
        counts = reduce(torch.stack([loss_sum.double(), correct.double(),
                                     torch.tensor(float(images), device=device, dtype=torch.float64)]))
        loss_sum, correct, images = counts[0], counts[1], int(counts[2])
    images_seen = max(images, 1)
    return EpochStats(float(loss_sum) / images_seen, float(correct) / images_seen, images, seconds)


def _check_finite(window: list[torch.Tensor], epoch: int, last_step: int) -> None:
    if not window:
        return
    finite = torch.isfinite(torch.stack(window))
    if not bool(finite.all()):
        first_bad = int((~finite).nonzero()[0, 0])
        raise NonFiniteLoss(epoch, last_step - len(window) + 1 + first_bad)


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: Precision, num_classes: int, desc: str = "eval",
             show_progress: bool = True, keep_predictions: bool = False,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EvalStats:
    """Plain cross-entropy (no label smoothing) and accuracy over the whole loader.

    reduce sums count tensors across processes under DDP, so every image counts exactly once.
    """
    model.eval()
    device = precision.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    class_correct = torch.zeros(num_classes, device=device, dtype=torch.long)
    class_total = torch.zeros(num_classes, device=device, dtype=torch.long)
    predictions, targets_all = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None if show_progress else True, dynamic_ncols=True):
        if batch is None:
            continue
        inputs, targets = precision.to_device(*batch)
        with precision.autocast():
            logits = model(inputs)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").double()
        predicted = logits.argmax(1)
        class_total += torch.bincount(targets, minlength=num_classes)
        class_correct += torch.bincount(targets[predicted == targets], minlength=num_classes)
        if keep_predictions:
            predictions.append(predicted.cpu())
            targets_all.append(targets.cpu())
    if reduce is not None:
        loss_sum, class_correct, class_total = reduce(loss_sum), reduce(class_correct), reduce(class_total)
    total = int(class_total.sum())
    correct = int(class_correct.sum())
    return EvalStats(
        loss=float(loss_sum) / max(total, 1),
        accuracy=correct / max(total, 1),
        images=total,
        per_class_correct=class_correct.tolist(),
        per_class_total=class_total.tolist(),
        predictions=torch.cat(predictions).tolist() if predictions else [],
        targets=torch.cat(targets_all).tolist() if targets_all else [],
    )


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (wandb agent early-stopping, a cluster's time limit) saves like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_loader,
    val_loader,
    *,
    epochs: int,
    precision: Precision,
    loss_fn: nn.Module,
    num_classes: int,
    run_dir: Path,
    checkpoint_meta: dict,
    log_epoch: Callable[[dict], None],
    patience: int = 0,
    seed: int = 0,
    state: FitState | None = None,
    scaler: torch.amp.GradScaler | None = None,
    before_epoch: Callable[[int], None] | None = None,
    is_main: bool = True,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    barrier: Callable[[], None] | None = None,
    unwrap: Callable[[nn.Module], nn.Module] = lambda m: m,
) -> FitState:
    """Train for epochs (from state.epoch on), validating after each, keeping best.pt/last.pt.

    checkpoint_meta (config, class names, script) goes into every checkpoint, so a checkpoint
    alone is enough to rebuild and evaluate the model.
    """
    state = state or FitState()
    if scaler is None:
        scaler = torch.amp.GradScaler(precision.device.type,
                                      enabled=precision.autocast_dtype == torch.float16)
    barrier = barrier or (lambda: None)

    def save(path: Path, full: bool, interrupted: bool = False) -> None:
        if not is_main:
            return
        payload = dict(checkpoint_meta, model=unwrap(model).state_dict(), epoch=state.epoch,
                       best_val_accuracy=state.best_val_accuracy, best_epoch=state.best_epoch,
                       metrics=state.last_metrics)
        if full:
            payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                           scaler=scaler.state_dict(), rng=capture_rng_state(),
                           epochs_without_improvement=state.epochs_without_improvement,
                           interrupted=interrupted)
        atomic_torch_save(payload, path)

    epoch = state.epoch + 1
    with sigterm_as_interrupt():
        try:
            for epoch in range(state.epoch + 1, epochs + 1):
                # The loader's shuffle and worker seeds depend on (seed, epoch) only, so a resumed
                # run sees the same batches as an uninterrupted one.
                generator = getattr(train_loader, "generator", None)
                if generator is not None:
                    generator.manual_seed(seed * 1_000_003 + epoch)
                sampler = getattr(train_loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                if before_epoch is not None:
                    before_epoch(epoch)
                lr = optimizer.param_groups[0]["lr"]
                train = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, loss_fn, precision,
                                        epoch, show_progress=is_main, reduce=reduce)
                val = evaluate(model, val_loader, precision, num_classes, desc=f"epoch {epoch} val",
                               show_progress=is_main, reduce=reduce)
                metrics = {
                    "epoch": epoch, "train_loss": train.loss, "train_accuracy": train.accuracy,
                    "val_loss": val.loss, "val_accuracy": val.accuracy,
                    "lr": lr, "epoch_time_s": train.seconds,
                    "train_images_per_s": train.images_per_s,
                }
                state.epoch = epoch
                state.last_metrics = metrics
                improved = val.accuracy > state.best_val_accuracy
                if improved:
                    state.best_val_accuracy, state.best_epoch = val.accuracy, epoch
                    state.epochs_without_improvement = 0
                    save(run_dir / "best.pt", full=False)
                else:
                    state.epochs_without_improvement += 1
                log_epoch(metrics)
                save(run_dir / "last.pt", full=True)
                barrier()
                if is_main:
                    tqdm.write(
                        f"epoch {epoch}/{epochs}  train_loss {train.loss:.4f}  train_accuracy {train.accuracy:.4f}  "
                        f"val_loss {val.loss:.4f}  val_accuracy {val.accuracy:.4f}{' *' if improved else ''}  "
                        f"lr {metrics['lr']:.2e}  {train.images_per_s:.0f} img/s  {train.seconds:.1f}s"
                    )
                if patience and state.epochs_without_improvement >= patience:
                    if is_main:
                        tqdm.write(f"early stop: val_accuracy has not improved for {patience} epochs "
                                   f"(best {state.best_val_accuracy:.4f} at epoch {state.best_epoch})")
                    break
        except KeyboardInterrupt:
            # Keep what was trained: the weights and optimizer as they are now. Resuming
            # restarts this epoch from them.
            save(run_dir / "last.pt", full=True, interrupted=True)
            raise TrainingInterrupted(run_dir / "last.pt", epoch) from None
    return state


def restore_training_state(checkpoint: dict, model: nn.Module, optimizer, scheduler,
                           scaler: torch.amp.GradScaler) -> FitState:
    """Load what fit()'s last.pt holds back into live objects."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint["rng"])
    return FitState(
        epoch=int(checkpoint["epoch"]),
        best_val_accuracy=float(checkpoint["best_val_accuracy"]),
        best_epoch=int(checkpoint["best_epoch"]),
        epochs_without_improvement=int(checkpoint.get("epochs_without_improvement", 0)),
        last_metrics=dict(checkpoint.get("metrics", {})),
    )


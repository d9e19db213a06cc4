"""Checkpoints that survive a kill mid-write and load with weights_only=True."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import random
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CheckpointError

if TYPE_CHECKING:
    from .distributed import DistInfo
    from .ema import WeightEMA
    from .optim import Optimisation

FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file beside path, fsync, then rename over path: a kill at any moment
    leaves either the old file or the new one, never half of one. Any failure to write the
    temporary file is an OSError: torch's zip writer reports a full disk as a RuntimeError
    ("[enforce fail at inline_container.cc] . unexpected pos ...")."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            except RuntimeError as error:
                raise write_failure(path.parent, error) from None
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_failure(folder: Path, error: RuntimeError) -> OSError:
    """What a failed write of a file in folder most likely was, as an OSError: no space left when
    the disk is (nearly) full, else an I/O error carrying torch's words."""
    try:
        full = shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, f"write failed: {' '.join(str(error).split())[:100]}")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by these scripts, refusing anything that would run code."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = " (it holds best.pt)" if (path / "best.pt").is_file() else ""
        raise CheckpointError(f"checkpoint '{path}' is a folder{inside}, not a file; pass the path of a best.pt or "
                              "last.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass the path of a best.pt or last.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported object"
        raise CheckpointError(
            f"checkpoint '{path}' was refused: it holds Python objects that could run code when loaded "
            f"({first[:120]}); only load checkpoints written by trainA.py/trainB.py"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        why = (str(error).strip().splitlines() or [f"{type(error).__name__}: the file is empty" if not path.stat().st_size
                                                   else type(error).__name__])[0]
        raise CheckpointError(f"checkpoint '{path}' is truncated or not a PyTorch file ({why[:120]})") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"checkpoint '{path}' was not written by trainA.py/trainB.py (no model/config entries)")
    return payload


def check_script(checkpoint: dict, script: str, path: str) -> None:
    if checkpoint.get("script") != script:
        raise CheckpointError(f"checkpoint '{path}' was written by {checkpoint.get('script')}.py; "
                         f"use it with that script, not {script}.py")


def capture_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def inference_weights(checkpoint: dict) -> dict:
    """The weights to evaluate or predict with: the moving average where the run kept one
    (a last.pt of an --ema_decay run), else the checkpoint's model (best.pt already holds the
    average)."""
    ema = checkpoint.get("ema")
    if ema:
        prefix = "module."
        return {key[len(prefix):]: value for key, value in ema["averaged"].items() if key.startswith(prefix)}
    return checkpoint["model"]


@dataclass
class FitState:
    """What a checkpoint needs to continue a run exactly where it stopped."""
    epoch: int = 0  # completed epochs
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    last_metrics: dict = field(default_factory=dict)

    def record(self, metrics: dict) -> bool:
        """Take in a finished epoch's metrics; True when its val_accuracy is the best so far."""
        self.epoch, self.last_metrics = metrics["epoch"], metrics
        if metrics["val_accuracy"] > self.best_val_accuracy:
            self.best_val_accuracy, self.best_epoch = metrics["val_accuracy"], metrics["epoch"]
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, say); what was written before is intact."""


@dataclass
class CheckpointWriter:
    """best.pt (weights: the average with EMA) and last.pt (everything a resume needs), written by
    the main process only, atomically. meta (config, class names, script) goes into both, so a
    checkpoint alone is enough to rebuild and evaluate the model."""
    run_dir: Path
    meta: dict
    model: nn.Module  # the whole, unwrapped model
    opt: Optimisation
    dist: DistInfo

    def save(self, name: str, state: FitState, full: bool, interrupted: bool = False) -> None:
        # Under DDP every rank's RNG state goes into last.pt (a collective: not on Ctrl-C, where
        # ranks may stop at different places; a resume then derives per-rank streams instead).
        rng_ranks = self.dist.gather(capture_rng_state()) if full and not interrupted else None
        if not self.dist.is_main:
            return
        ema = self.opt.ema
        weights = self.model.state_dict() if full or ema is None else ema.module.state_dict()
        payload = dict(self.meta, model=weights, epoch=state.epoch, best_val_accuracy=state.best_val_accuracy,
                       best_epoch=state.best_epoch, metrics=state.last_metrics)
        if full:
            payload.update(optimizer=self.opt.optimizer.state_dict(), scheduler=self.opt.scheduler.state_dict(),
                           scaler=self.opt.scaler.state_dict(), rng=capture_rng_state(),
                           epochs_without_improvement=state.epochs_without_improvement, interrupted=interrupted)
            if ema is not None:
                payload.update(ema=ema.state_dict())
            if rng_ranks is not None:
                payload.update(rng_ranks=rng_ranks)
        self._write(payload, name)

    def save_interrupted(self, state: FitState) -> None:
        """After Ctrl-C inside an epoch: last.pt keeps the state at that epoch's start (written when
        the epoch before it ended, or when the run started), now flagged interrupted, so a resume
        replays the epoch exactly as an uninterrupted run trains it; the weights as they are now go
        to interrupted.pt (--test_only and --predict load it like best.pt)."""
        if not self.dist.is_main:
            return
        last = self.run_dir / "last.pt"
        try:
            payload = torch.load(last, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError):
            payload = None
        if payload is None or payload.get("epoch") != state.epoch:  # none to keep: the state as it is
            self.save("last.pt", state, full=True, interrupted=True)
            return
        self._write(dict(payload, interrupted=True), "last.pt")
        self.save("interrupted.pt", state, full=False)

    def _write(self, payload: dict, name: str) -> None:
        try:
            atomic_torch_save(payload, self.run_dir / name)
        except OSError as error:  # a full disk or a vanished folder: the older checkpoints are intact
            raise CheckpointWriteError(f"could not write {name} in {self.run_dir} ({error.strerror or error}); the "
                                       f"checkpoints written before are kept; free space and resume from last.pt"
                                       ) from None


def restore_training_state(checkpoint: dict, model: nn.Module, optimizer, scheduler,
                           scaler: torch.amp.GradScaler, ema: WeightEMA | None = None,
                           rank: int = 0, world: int = 1) -> FitState:
    """Load what fit()'s last.pt holds back into live objects."""
    model.load_state_dict(checkpoint["model"])
    if ema is not None:
        if "ema" in checkpoint:
            ema.load_state_dict(checkpoint["ema"])
        else:  # a run started without --ema_decay: the average starts from the current weights
            ema.averaged.load_state_dict({**ema.averaged.state_dict(), **{f"module.{k}": v for k, v in checkpoint["model"].items()}})
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler.is_enabled() and checkpoint.get("scaler"):
        # a last.pt of an fp32/bf16 run has an empty scaler state: an fp16 resume starts a fresh scale
        scaler.load_state_dict(checkpoint["scaler"])
    ranks = checkpoint.get("rng_ranks")
    if ranks is not None and len(ranks) == world:
        restore_rng_state(ranks[rank])
    else:
        restore_rng_state(checkpoint["rng"])
        if rank:  # one saved stream: fold the rank in so ranks do not repeat each other's draws
            torch.manual_seed(int(torch.randint(2**62, (1,))) + rank)
    return FitState(
        epoch=int(checkpoint["epoch"]),
        best_val_accuracy=float(checkpoint["best_val_accuracy"]),
        best_epoch=int(checkpoint["best_epoch"]),
        epochs_without_improvement=int(checkpoint.get("epochs_without_improvement", 0)),
        last_metrics=dict(checkpoint.get("metrics", {})),
    )

"""Checkpoints that survive a kill mid-write and load with weights_only=True."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file beside path, fsync, then rename over path: a kill at any moment
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by these scripts, refusing anything that would run code."""
    path = Path(path).expanduser()
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
        raise CheckpointError(f"checkpoint '{path}' is truncated or not a PyTorch file ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"checkpoint '{path}' was not written by trainA.py/trainB.py (no model/config entries)")
    return payload


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

"""Frozen-backbone features kept on disk across runs, beside the decoded-image cache: a sweep over
freeze_all's head flags (lr, dropout, head, epochs) computes each split's features in its first run
only. An entry is keyed by what decides its numbers: the split's files (names, sizes, mtimes),
their framing, the views (an image alone, or with its mirror), the architecture, the backbone's
weights by content, and the precision it ran in. Written to a temporary file and renamed under a
file lock, as the decoded images are; parallel agents wait for the first one and read its result.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from torch import nn

from data.cache import add_files, default_cache_dir

from .checkpoint import atomic_torch_save

STORE_VERSION = 1
MAX_BYTES = 4 * 2**30  # oldest entries are removed past this (a birds50 split is ~10 MB)


def store_dir(cache_dir: str) -> Path:
    """Where the features live: in the decoded-image cache's folder (--cache_dir or its default)."""
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "features"


def backbone_digest(model: nn.Module, head: nn.Module) -> str:
    """The content of every weight and buffer of model outside head: two runs share features
    exactly when their frozen backbones are equal, whatever file or download they came from."""
    head_tensors = {t.data_ptr() for t in head.state_dict().values()}
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in head_tensors and tensor.numel():
            continue
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def split_key(samples, framing: str, views: int, backbone: str) -> str:
    """framing: the transform's sizes and normalisation, the arch and the precision, in words."""
    digest = hashlib.sha256(f"v{STORE_VERSION}|{framing}|views{views}|{backbone}\n".encode())
    add_files(digest, samples, missing_ok=True)  # the decoded-image cache's own fingerprint of the files
    return digest.hexdigest()[:32]


class FeatureStore:
    """get(key, compute): the stored (features, labels) for key, else compute() stored and returned.
    A folder that cannot be written is not an error: the features are computed and used, with one
    warning, and the next run computes them again."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.warned = False

    def get(self, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
            device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
        """((features, labels) on device, whether they were read from the store)."""
        if self.folder is None:
            return compute(), False
        path = self.folder / f"{key}.pt"
        stored = self._read(path, device)
        if stored is not None:
            return stored, True
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.folder / f"{key}.lock"))
            lock.acquire()
        except OSError as error:
            self._warn(error)
            return compute(), False
        try:
            stored = self._read(path, device)  # another agent may have computed it meanwhile
            if stored is not None:
                return stored, True
            features, labels = compute()
            self._write(path, features, labels)
            return (features, labels), False
        finally:
            lock.release()

    def _read(self, path: Path, device: torch.device):
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            features, labels = entry["features"], entry["labels"]
            if entry.get("version") != STORE_VERSION or len(features) != len(labels):
                raise ValueError("inconsistent entry")
        except Exception as error:  # a truncated or foreign file: computed again and replaced
            print(f"warning: stored features '{path}' are unreadable ({str(error)[:80]}); computing them again",
                  file=sys.stderr)
            return None
        os.utime(path)  # recently used: pruned last
        return features.to(device), labels.to(device)

    def _write(self, path: Path, features: torch.Tensor, labels: torch.Tensor) -> None:
        try:  # a temporary file renamed into place, as checkpoints are (a full disk is an OSError there)
            atomic_torch_save({"version": STORE_VERSION, "features": features.cpu(), "labels": labels.cpu()}, path)
        except OSError as error:
            self._warn(error)
            return
        self._prune()

    def _prune(self) -> None:
        """Oldest-used entries out until the folder holds at most MAX_BYTES."""
        try:
            entries = sorted(self.folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
            total = 0
            for entry in entries:
                total += entry.stat().st_size
                if total > MAX_BYTES:
                    entry.unlink(missing_ok=True)
        except OSError:
            pass

    def _warn(self, error: BaseException) -> None:
        if not self.warned:
            self.warned = True
            print(f"warning: cannot keep features in '{self.folder}' ({' '.join(str(error).split())[:100]}); "
                  "they are computed for this run only (set --cache_dir to a writable folder)", file=sys.stderr)

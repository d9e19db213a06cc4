"""Decode once: every image of a split decoded, oriented, converted to RGB, resized so the
shorter side is the working size and center-cropped to a square, stored as one uint8 array
(N, S, S, 3) on disk. Later runs and concurrent agents reuse it by memory-mapping it.

The key covers the folder, every file's name, size and mtime, and the decode settings, so a
changed data set gets a new cache instead of stale pixels. Building goes to a temporary file
renamed into place under a file lock: a second process waits and reuses the result.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torchvision.transforms import v2

from .decode import UNREADABLE, load_rgb
from .folder import Sample
from .progress import progress

CACHE_VERSION = 1


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under a batch scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "inat12k" / "decoded"


def crop_offset(length: int, size: int, final: int) -> int:
    """Start of the size-long crop that keeps the later final-long center crop exactly where a
    direct center crop of `length` would put it (torchvision rounds each offset)."""
    direct = int(round((length - final) / 2.0))
    inner = int(round((size - final) / 2.0))
    return min(max(direct - inner, 0), length - size)


def decode_square(path: str, load_size: int, size: int, final: int) -> np.ndarray:
    """(size, size, 3) uint8, made exactly as the streaming eval path makes its input: load_rgb
    to shorter side load_size, the eval transform's Resize to size (which also upsamples small
    images), then a square crop aligned with the final center crop."""
    image = v2.functional.to_image(load_rgb(path, load_size))
    image = v2.functional.resize(image, [size], antialias=True)
    height, width = image.shape[-2:]
    top, left = crop_offset(height, size, final), crop_offset(width, size, final)
    return image[:, top:top + size, left:left + size].permute(1, 2, 0).contiguous().numpy()


@dataclass
class DecodedSplit:
    """A split's decoded pixels (memory-mapped) and labels; `valid` marks readable files."""
    images: np.ndarray  # (N, S, S, 3) uint8, memory-mapped read-only
    labels: np.ndarray  # (N,) int64
    valid: np.ndarray  # (N,) bool
    paths: list[str]
    path: Path


def add_files(digest, samples: list[Sample], missing_ok: bool = False) -> None:
    """Every file's name, label, size and mtime into digest: a cache keyed by it is rebuilt when a
    file is added, removed, replaced or touched. A vanished file raises OSError, or with missing_ok
    counts as one."""
    for sample in samples:
        # fsencode: file names need not be valid UTF-8 (they arrive as surrogate escapes)
        digest.update(os.fsencode(os.path.abspath(sample.path)))
        try:
            st = os.stat(sample.path)
        except OSError:
            if not missing_ok:
                raise
            digest.update(f"|{sample.label}|missing\n".encode())
            continue
        digest.update(f"|{sample.label}|{st.st_size}|{st.st_mtime_ns}\n".encode())


def cache_key(samples: list[Sample], load_size: int, size: int, final: int) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{load_size}|{size}|{final}".encode())
    add_files(digest, samples)
    return digest.hexdigest()[:24]


class CacheUnavailable(OSError):
    """The cache folder cannot be used (not a folder, not writable, full); the caller streams instead."""


def build_or_load(samples: list[Sample], load_size: int, size: int, final: int, cache_dir: Path,
                  name: str = "split", workers: int | None = None) -> DecodedSplit:
    """The cached split for these files and settings, building it first if needed.

    A complete cache is read without taking the lock (so it works from a read-only folder);
    one that fails validation is rebuilt. Raises CacheUnavailable, naming the folder, when it
    cannot be built there.
    """
    key = cache_key(samples, load_size, size, final)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    split = _load_valid(array_path, meta_path, samples, size)
    if split is not None:
        return split
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_dir / f"{key}.lock")):
            split = _load_valid(array_path, meta_path, samples, size)  # another process may have built it
            if split is None:
                _remove_leftovers(cache_dir, key, array_path, meta_path)
                _build(samples, load_size, size, final, array_path, meta_path, name, workers)
                split = _load_valid(array_path, meta_path, samples, size)
    except CacheUnavailable:
        raise
    except OSError as error:
        raise CacheUnavailable(f"cannot write the decoded-image cache in '{cache_dir}' ({error.strerror or error})") from None
    if split is None:
        raise CacheUnavailable(f"the decoded-image cache built in '{cache_dir}' does not read back")
    return split


def _load_valid(array_path: Path, meta_path: Path, samples: list[Sample], size: int) -> DecodedSplit | None:
    """The split if both files exist and agree with each other and with samples; else None (a
    broken one is reported once, then rebuilt by the caller)."""
    if not (array_path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="r")
        count = len(samples)
        if (meta.get("count") != count or len(meta.get("valid", ())) != count
                or images.shape != (count, size, size, 3) or images.dtype != np.uint8):
            raise ValueError(f"holds {images.shape} for {count} images of {size}x{size}")
    except (OSError, ValueError, TypeError, AttributeError) as error:
        print(f"warning: decoded-image cache '{array_path}' is broken ({str(error)[:100]}); rebuilding it",
              file=sys.stderr)
        return None
    return DecodedSplit(
        images=images,
        labels=np.array([s.label for s in samples], dtype=np.int64),
        valid=np.array(meta["valid"], dtype=bool),
        paths=[s.path for s in samples],
        path=array_path,
    )


def _remove_leftovers(cache_dir: Path, key: str, *paths: Path) -> None:
    """Under the lock nobody else builds this key: any temporary file of it was left by a killed
    build, and any final file failed validation."""
    for path in [*paths, *cache_dir.glob(f".{key}.tmp-*")]:
        path.unlink(missing_ok=True)


def _reserve(path: Path, nbytes: int) -> None:
    """Claim the array's disk space up front: a full disk is then an error here, not a SIGBUS
    while writing through the memory map."""
    free = shutil.disk_usage(path.parent).free
    if free < nbytes:
        raise CacheUnavailable(f"'{path.parent}' has {free / 1e9:.1f} GB free, the decoded images need "
                               f"{nbytes / 1e9:.1f} GB")
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise CacheUnavailable(f"'{path.parent}' is full ({nbytes / 1e9:.1f} GB needed)") from None
        except AttributeError:  # no posix_fallocate on this platform
            pass


def _build(samples, load_size, size, final, array_path: Path, meta_path: Path, name: str, workers: int | None) -> None:
    tmp = array_path.with_name(f".{array_path.stem}.tmp-{os.getpid()}.npy")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(samples), size, size, 3))
        _reserve(tmp, os.path.getsize(tmp))
        valid = [True] * len(samples)

        def decode(index: int) -> tuple[int, str]:
            try:
                out[index] = decode_square(samples[index].path, load_size, size, final)
            except UNREADABLE as error:
                return index, str(error)
            return index, ""

        # Threads, not processes: Pillow and torch release the GIL while decoding and resizing,
        # and forking a process that already runs threads (torch, wandb) can deadlock.
        workers = workers or min(usable_cpus(), 32)
        with progress(desc=f"decoding {name} once ({size}x{size})", total=len(samples), unit="img") as bar, \
                ThreadPoolExecutor(workers) as pool:
            for index, error in pool.map(decode, range(len(samples))):
                _record(index, error, samples, valid, bar)
        out.flush()
        out = None  # unmap before the rename (needed on Windows)
        os.replace(tmp, array_path)
        meta_tmp = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}")
        meta_tmp.write_text(json.dumps({"version": CACHE_VERSION, "size": size, "final": final, "count": len(samples),
                                        "valid": valid}))
        os.replace(meta_tmp, meta_path)  # written last: its presence means the array is complete
    finally:
        tmp.unlink(missing_ok=True)


def _record(index: int, error: str, samples, valid: list[bool], bar) -> None:
    if error:
        valid[index] = False
        print(f"warning: skipping unreadable image '{samples[index].path}' ({error})", file=sys.stderr)
    bar.update(1)


def to_tensor_batch(split: DecodedSplit, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) uint8 and (B,) labels for the given indices (a copy out of the memmap)."""
    order = np.sort(indices.numpy())  # sorted reads are sequential on disk
    images = torch.from_numpy(np.ascontiguousarray(split.images[order])).permute(0, 3, 1, 2)
    return images, torch.from_numpy(split.labels[order])

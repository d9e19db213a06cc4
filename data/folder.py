"""Find the train and test folders, list their images, and split train into train/val."""

from __future__ import annotations

import os
import unicodedata
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".avif", ".heic", ".heif")
TEST_FOLDER_NAMES = ("val", "test")  # iNat calls its held-out test set val/
ZIP_ROOT_NAME = "inaturalist_12K"


@dataclass(frozen=True)
class DatasetFolders:
    train_dir: Path
    test_dir: Path


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


def resolve_folders(data_dir: str | os.PathLike) -> DatasetFolders:
    """Accept the zip's root (holding inaturalist_12K/) or a folder holding train/ and val/ or test/."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DatasetError(
            f"data_dir '{root}' does not exist; point --data_dir at the unzipped nature_12K folder "
            "(holding inaturalist_12K/) or at a folder with train/ and val/"
        )
    if not root.is_dir():
        raise DatasetError(f"data_dir '{root}' is not a folder; point --data_dir at the unzipped data set")
    if not (root / "train").is_dir() and (root / ZIP_ROOT_NAME / "train").is_dir():
        root = root / ZIP_ROOT_NAME
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(
            f"data_dir '{root}' has no train/ folder; point --data_dir at the folder holding "
            f"train/ and val/ (or {ZIP_ROOT_NAME}/)"
        )
    for name in TEST_FOLDER_NAMES:
        if (root / name).is_dir():
            return DatasetFolders(train_dir, root / name)
    raise DatasetError(
        f"data_dir '{root}' has train/ but no test folder; add val/ or test/ beside train/ "
        "with the same class subfolders"
    )


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _entry_is(entry: os.DirEntry, kind: str) -> bool:
    """entry.is_dir()/is_file() following links, False (with a warning naming it) for what cannot
    be resolved: a symlink loop, a link to itself, a folder we may not read. Pipes, sockets and
    devices are neither files nor folders, so they are never opened."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as error:
        print(f"warning: skipping '{entry.path}' ({error.strerror or error})", file=sys.stderr)
        return False


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise DatasetError(f"cannot list '{folder}' ({error.strerror or error}); check that it is a readable folder") from None


def list_classes(split_dir: Path) -> list[str]:
    """Class names are the sorted, non-hidden subfolders (symlinked folders count)."""
    return sorted(e.name for e in _scandir(split_dir) if not e.name.startswith(".") and _entry_is(e, "dir"))


def class_key(class_names: list[str]):
    """How a test folder's class subfolders are matched to train/'s names. A name written on
    macOS (NFD: "e" + a combining accent) and elsewhere (NFC: one "é") is one class; so is a
    name whose case a FAT/NTFS copy changed, unless train/ itself has names differing only in
    case."""
    def nfc(name: str) -> str:
        return unicodedata.normalize("NFC", name)

    folded = {nfc(name).casefold() for name in class_names}
    if len(folded) == len(set(class_names)):
        return lambda name: nfc(name).casefold()
    return nfc


def scan_split(split_dir: Path, class_names: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    """List (path, label) for every image file under split_dir/<class>/, in sorted order.

    With class_names given (the test folder), the folder's classes must match them exactly.
    """
    found = list_classes(split_dir)
    if class_names is None:
        class_names = found
        if not class_names:
            raise DatasetError(f"'{split_dir}' has no class subfolders; put each class's images in {split_dir}/<class>/")
    key = class_key(class_names)
    folder_of = {key(name): name for name in found}
    if sorted(folder_of) != sorted(key(name) for name in class_names) or len(folder_of) != len(found):
        wanted = {key(name) for name in class_names}
        missing = sorted(name for name in class_names if key(name) not in folder_of)
        extra = sorted(name for name in found if key(name) not in wanted)
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"extra {', '.join(extra)}")
        raise DatasetError(
            f"classes in '{split_dir}' do not match train/ ({'; '.join(parts)}); "
            "both folders need the same class subfolders"
        )
    samples: list[Sample] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / folder_of.get(key(name), name)
        files = sorted(e.path for e in _scandir(class_dir) if is_image_file(e.name) and _entry_is(e, "file"))
        if not files:
            raise DatasetError(
                f"class folder '{class_dir}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        samples.extend(Sample(path, label) for path in files)
    return class_names, samples


def stratified_split(
    samples: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Carve val_fraction of each class out for validation, with a seeded shuffle per class.

    Every class keeps at least one training image and, when val_fraction > 0, gets at least one
    validation image, so per-class accuracy is defined for all classes.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction={val_fraction} must be in [0, 1); try --val_fraction 0.2")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        num_val = int(round(len(items) * val_fraction))
        if val_fraction > 0:
            if len(items) < 2:
                folder = os.path.dirname(items[0].path)
                raise DatasetError(
                    f"class '{os.path.basename(folder)}' has only 1 image, too few to hold one out for "
                    f"validation; add images to '{folder}' or remove that folder"
                )
            num_val = min(max(num_val, 1), len(items) - 1)
        val.extend(items[i] for i in sorted(order[:num_val]))
        train.extend(items[i] for i in sorted(order[num_val:]))
    return train, val


def stratified_subset(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """A seeded share of each class (at least one image per class), in the original order."""
    if not 0.0 < fraction <= 1.0:
        raise DatasetError(f"train_fraction={fraction} must be in (0, 1]; try --train_fraction 0.25")
    if fraction == 1.0:
        return list(samples)
    rng = np.random.default_rng([seed, 1])  # a stream of its own, independent of the val split's
    by_class: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(position)
    keep: list[int] = []
    for label in sorted(by_class):
        positions = by_class[label]
        count = max(1, int(round(len(positions) * fraction)))
        keep.extend(positions[i] for i in rng.permutation(len(positions))[:count])
    return [samples[i] for i in sorted(keep)]

"""NatureData: the iNaturalist-12K folders (or any train/ + val|test/ layout) as a Dataset."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import weakref
from typing import Callable, Literal

import torch
from torch.utils.data import Dataset, default_collate

from .decode import UNREADABLE, load_rgb, working_size
from .errors import DatasetError
from .folder import Sample, resolve_folders, scan_split, stratified_split, stratified_subset

Split = Literal["train", "val", "test"]


class NatureData(Dataset):
    """One split of the data set: "train" and "val" are carved from train/ (stratified, seeded),
    "test" is the val/ (or test/) folder, used once at the end.

        >>> train = NatureData("nature_12K", "train", transform=build_train_transform(224))
        >>> image, label = train[0]          # None instead, if the file cannot be decoded

    An unreadable file is reported on stderr and its item is None; pass
    `collate_skipping_unreadable` to the DataLoader to drop such items from the batch.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: Split,
        transform: Callable | None = None,
        image_size: int | None = 224,
        val_fraction: float = 0.2,
        seed: int = 0,
        train_fraction: float = 1.0,
        decode_size: int | None = None,
        plain_transform: Callable | None = None,
    ):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        folders = resolve_folders(data_dir)
        self.classes, samples = scan_split(folders.train_dir)
        if split == "test":
            _, samples = scan_split(folders.test_dir, self.classes)
            self.root = folders.test_dir
        else:
            train, val = stratified_split(samples, val_fraction, seed)
            samples = stratified_subset(train, train_fraction, seed) if split == "train" else val
            self.root = folders.train_dir
        self.split = split
        self.reported_dir: str | None = None  # see report_once
        self.samples: list[Sample] = samples
        self.transform = transform
        # an unaugmented pass over these images (data.loaders.in_order) uses this one: the run's
        # data.transforms.plain_transform, where transform augments
        self.plain_transform = plain_transform or transform
        # decode_size (Sizes.decode): the shorter side files are decoded to; default working_size(image_size)
        self.decode_size = decode_size or (working_size(image_size) if image_size else None)

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> list:
        """[image count, digest of the files (names under the split's folder, sizes)]: kept in
        last.pt, so a --resume can tell that the images of a split are no longer the same."""
        digest = hashlib.sha1()
        for sample in sorted(self.samples, key=lambda s: s.path):
            digest.update(os.fsencode(os.path.relpath(sample.path, self.root)) + b"\0")
            with contextlib.suppress(OSError):
                digest.update(str(os.stat(sample.path).st_size).encode())
        return [len(self.samples), digest.hexdigest()[:16]]

    def load(self, index: int):
        """The decoded RGB PIL image, before transforms (raises OSError if unreadable)."""
        return load_rgb(self.samples[index].path, self.decode_size)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            image = self.load(index)
        except UNREADABLE as error:
            if first_report(self, sample.path):
                print(f"warning: skipping unreadable image '{sample.path}' ({error})", file=sys.stderr)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, sample.label


def report_once(dataset: NatureData) -> NatureData:
    """Name each unreadable file of dataset once, not on every pass: DataLoader worker processes
    are started again every epoch and share no memory, so the files already named are marked in a
    folder of empty files (removed when this process ends)."""
    if getattr(dataset, "reported_dir", None) is None:
        folder = tempfile.mkdtemp(prefix="inat12k-skipped-")
        weakref.finalize(dataset, shutil.rmtree, folder, True)
        dataset.reported_dir = folder
    return dataset


def first_report(dataset: NatureData, path: str) -> bool:
    """True the first time path is reported among the processes sharing dataset's folder."""
    folder = getattr(dataset, "reported_dir", None)
    if folder is None:
        return True
    marker = os.path.join(folder, hashlib.sha1(os.fsencode(path)).hexdigest())
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # the folder is gone or unwritable: say it again rather than never
        return True
    return True


def collate_skipping_unreadable(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """default_collate without the None items of unreadable files; None if nothing is left."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return default_collate(batch)


def refuse_if_unreadable(split: str, root, total: int, readable: int) -> None:
    """A split with files but not one readable image stops the run before anything is written:
    training on nothing, or dividing by zero images after it, helps nobody."""
    if total and not readable:
        raise DatasetError(
            f"every one of the {total} files of the {split} split in '{root}' is unreadable ({total} skipped): "
            "are they git-lfs pointers (run git lfs pull) or web pages saved as .jpg (download the data again)?")


def first_readable(dataset: NatureData) -> int | None:
    """Index of the first file of dataset that decodes (None if none does): one decode in the
    usual case, a pass of fast failures for a split of broken files."""
    for index in range(len(dataset)):
        try:
            dataset.load(index)
        except UNREADABLE:
            continue
        return index
    return None


def sample_images(dataset: NatureData, count: int, transform: Callable, seed: int) -> torch.Tensor:
    """Up to count images of dataset, drawn without replacement by seed (not the global RNG, so
    the training run's own random stream is untouched) and passed through transform, stacked.
    Unreadable files are left out here; the loaders report them."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    images = []
    for index in order:
        if len(images) == count:
            break
        try:
            images.append(transform(dataset.load(index)))
        except UNREADABLE:
            continue
    if not images:
        raise DatasetError(f"no readable image among the {len(dataset)} of the {dataset.split} split in "
                           f"'{dataset.root}'; check the files")
    return torch.stack(images)

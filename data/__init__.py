"""Data: folder scan, stratified split, decoding, transforms and the NatureData Dataset."""

from .dataset import NatureData, collate_skipping_unreadable, sample_images
from .decode import Sizes, eval_resize, load_rgb, sizes_for, working_size
from .download import DEFAULT_URL, ensure_dataset
from .errors import DatasetError
from .folder import IMAGE_EXTENSIONS, resolve_folders, scan_split, stratified_split, stratified_subset
from .transforms import (AUTO_AUGMENTS, IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, build_eval_transform, build_train_transform,
                         plain_transform, train_transform)

__all__ = [
    "NatureData",
    "collate_skipping_unreadable",
    "sample_images",
    "load_rgb",
    "working_size",
    "eval_resize",
    "Sizes",
    "sizes_for",
    "DEFAULT_URL",
    "ensure_dataset",
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "resolve_folders",
    "scan_split",
    "stratified_split",
    "stratified_subset",
    "AUTO_AUGMENTS",
    "AugmentSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_eval_transform",
    "build_train_transform",
    "plain_transform",
    "train_transform",
]

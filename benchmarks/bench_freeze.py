"""Epoch time of part B strategies, side by side in one process on the same images:

  full                      every parameter trains (forward + backward through the backbone)
  freeze_all, plain         only the head trains, but every epoch runs the frozen backbone
  freeze_all, feature cache backbone features computed once (first epoch), then head-only epochs

Weights are random (weights=None): time does not depend on their values, and no download is
needed.

    python benchmarks/make_fake_inat.py /tmp/fake_inat
    python benchmarks/bench_freeze.py /tmp/fake_inat --arch resnet50 --image_size 224 --max_images 128

The last line reads `freeze_all_speedup=<full epoch / freeze_all epoch after the first>`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import IMAGENET_MEAN, IMAGENET_STD, NatureData, working_size  # noqa: E402
from data.cache import build_or_load  # noqa: E402
from data.augment import BatchAugment  # noqa: E402
from data.loaders import CachedBatches  # noqa: E402
from models.backbone import FREEZE_ALL, build_finetune_model  # noqa: E402
from data.loaders import FeatureBatches  # noqa: E402
from utils.features import compute_features  # noqa: E402
from utils.runtime import autocast_dtype, resolve_device, use_channels_last  # noqa: E402
from utils.runtime import Precision  # noqa: E402
from utils.optim import Optimisation  # noqa: E402
from utils.train import train_one_epoch  # noqa: E402


def epoch(model, loader, precision: Precision) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    opt = Optimisation(optimizer, scheduler, nn.CrossEntropyLoss(), precision.scaler())
    return train_one_epoch(model, loader, opt, precision, 1, show_progress=False).seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_images", type=int, default=128)
    parser.add_argument("--head_epochs", type=int, default=3, help="head-only epochs timed after the first")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    precision = Precision(device, autocast_dtype(device, "auto"), use_channels_last(device, "auto"))
    data = NatureData(args.data_dir, "train", image_size=args.image_size, val_fraction=0.0)
    samples = data.samples[:: max(1, len(data.samples) // args.max_images)][: args.max_images]
    classes = len(data.classes)
    print(f"{args.arch}, {len(samples)} images, {args.image_size}px, batch {args.batch_size}, device {device} "
          f"({precision.autocast_dtype or 'fp32'}{', channels_last' if precision.channels_last else ''})", flush=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-freeze-"))
    try:
        size = working_size(args.image_size)
        split = build_or_load(samples, size, size, args.image_size, cache_dir, "train")
        augment = BatchAugment(args.image_size, True, IMAGENET_MEAN, IMAGENET_STD)
        no_augment = BatchAugment(args.image_size, False, IMAGENET_MEAN, IMAGENET_STD)

        def fresh(freeze):
            torch.manual_seed(0)
            model = build_finetune_model(args.arch, classes, "none").to(device)
            if precision.channels_last:
                model = model.to(memory_format=torch.channels_last)
            model.freeze_upto(freeze)
            return model

        def loader(aug):
            return CachedBatches(split, args.batch_size, True, aug, device, 0, on_device=device.type == "cuda")

        model = fresh(None)
        epoch(model, loader(augment), precision)  # warm-up (oneDNN/cuDNN kernel choice)
        full = epoch(model, loader(augment), precision)
        print(f"full fine-tune epoch:             {full:8.2f} s  {len(samples) / full:8.1f} img/s", flush=True)

        model = fresh(FREEZE_ALL)
        plain = epoch(model, loader(augment), precision)
        print(f"freeze_all epoch, plain:          {plain:8.2f} s  {len(samples) / plain:8.1f} img/s", flush=True)

        model = fresh(FREEZE_ALL)
        started = time.perf_counter()
        features, labels = compute_features(model.features, loader(no_augment), precision)
        batches = FeatureBatches(features, labels, args.batch_size, True, 0)
        first_head = epoch(model.head, batches, Precision(device))
        first = time.perf_counter() - started
        later = sum(epoch(model.head, batches, Precision(device)) for _ in range(args.head_epochs)) / args.head_epochs
        print(f"freeze_all + feature cache, first epoch (features + head): {first:8.2f} s")
        print(f"freeze_all + feature cache, later epochs (head only):      {later:8.4f} s  "
              f"{len(labels) / later:8.0f} img/s  (first head pass {first_head:.4f} s)")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"freeze_all plain vs full: {full / plain:.2f}x")
    print(f"freeze_all_speedup={full / later:.1f}")


if __name__ == "__main__":
    main()

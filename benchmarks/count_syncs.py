"""Count host-device synchronisations in one cached training epoch of trainA's default CNN on a
CUDA GPU (torch.cuda.set_sync_debug_mode("warn") turns each into a warning that is counted).

    python benchmarks/count_syncs.py /tmp/fake_inat [--image_size 64]

The goal is none inside the step: what remains are the progress refreshes every LOG_EVERY steps
(reading the running loss and accuracy, checking for NaN) and the end of the epoch.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainA  # noqa: E402
from data import IMAGENET_MEAN, IMAGENET_STD, NatureData, working_size  # noqa: E402
from data.cache import build_or_load  # noqa: E402
from data.augment import BatchAugment  # noqa: E402
from data.loaders import CachedBatches  # noqa: E402
from utils.runtime import autocast_dtype  # noqa: E402
from utils.runtime import Precision  # noqa: E402
from utils.optim import Optimisation  # noqa: E402
from utils.train import LOG_EVERY, train_one_epoch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cuda")
    precision = Precision(device, autocast_dtype(device, "auto"), True)
    train = NatureData(args.data_dir, "train", None, args.image_size, val_fraction=0.0)
    size = working_size(args.image_size)
    split = build_or_load(train.samples, size, size, args.image_size, Path(tempfile.mkdtemp()), "train")
    augment = BatchAugment(args.image_size, True, IMAGENET_MEAN, IMAGENET_STD, channels_last=True)
    for on_device in (True, False):
        loader = CachedBatches(split, args.batch_size, True, augment, device, on_device=on_device)
        model = trainA.build_model(trainA.ConfigA(image_size=args.image_size), len(train.classes)).to(device)
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cuda", enabled=precision.autocast_dtype == torch.float16)
        opt = Optimisation(optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=0.1), scaler)
        train_one_epoch(model, loader, opt, precision, 0, show_progress=False)  # warm-up
        torch.cuda.synchronize()
        places: collections.Counter = collections.Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(model, loader, opt, precision, 1, show_progress=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        for w in syncs:
            places[f"{Path(w.filename).name}:{w.lineno}"] += 1
        steps = len(loader)
        refreshes = math.ceil(steps / LOG_EVERY)
        key = "device" if on_device else "host"
        print(f"{'data on device' if on_device else 'host batches  '}: {len(syncs)} syncs in {steps} steps "
              f"({refreshes} progress refreshes); by place: {dict(places.most_common(8))}; "
              f"syncs_{key}={len(syncs)} steps_{key}={steps} refreshes_{key}={refreshes}")


if __name__ == "__main__":
    main()

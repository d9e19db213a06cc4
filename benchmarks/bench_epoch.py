"""One training epoch, four ways, side by side in one process on the same data and model:

  (a) plain: what the assignment write-ups do: ImageFolder + PIL decode every epoch, torchvision
      transforms (resize to a square, flip, to tensor, normalise), DataLoader, fp32 contiguous
  (b) ours, streaming (--cache off): NatureData (draft-mode decode), v2 transforms, DataLoader,
      our precision settings
  (c) ours, cached (the default): decoded once (not timed: the build is reported separately),
      batches augmented on the device; on a CPU, on the loader's background thread during the
      previous step, and (c') for comparison, augmented between steps on the training thread

Each variant runs --epochs epochs (default 2) and the last one is timed from its third batch on:
the steady state, without the first epoch's effects or DataLoader worker start-up. On a GPU,
give it enough images (make_fake_inat.py --train_per_class 200) that an epoch is not all start-up.
  (d) pure compute: the same number of steps on tensors already on the device

    python benchmarks/make_fake_inat.py /tmp/fake_inat
    python benchmarks/bench_epoch.py /tmp/fake_inat --image_size 224

The last line reads `speedup_vs_plain=<a/c> overhead_vs_compute=<c/d>`.

--model resnet50 or tf_efficientnet_lite0 times trainB's default step instead (--strategy full:
the whole network trains, BatchNorm frozen, trainB's augmentation; random weights, as time does
not depend on their values). For an AVX2-only CPU on a newer one, cap the instruction sets
(benchmarks/README.md):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_epoch.py ...
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

from data import IMAGENET_MEAN, IMAGENET_STD, NatureData, build_train_transform, working_size  # noqa: E402
from data.cache import build_or_load  # noqa: E402
from data.augment import BatchAugment  # noqa: E402
from data.transforms import AugmentSpec  # noqa: E402
from data.loaders import CachedBatches  # noqa: E402
from models import build_cnn  # noqa: E402
from data.loaders import make_loader  # noqa: E402
from utils.runtime import autocast_dtype, default_num_workers, resolve_device, use_channels_last  # noqa: E402
from utils.runtime import Precision, cpu_description  # noqa: E402
from utils.optim import Optimisation  # noqa: E402
from utils.train import train_one_epoch  # noqa: E402


def plain_loader(train_dir: Path, image_size: int, batch_size: int, workers: int):
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize((image_size, image_size)), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(str(train_dir), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)


class PremadeBatches:
    def __init__(self, steps: int, batch_size: int, image_size: int, precision: Precision, classes: int):
        memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
        self.x = torch.randn(batch_size, 3, image_size, image_size, device=precision.device).contiguous(
            memory_format=memory_format)
        self.y = torch.randint(0, classes, (batch_size,), device=precision.device)
        self.steps = steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return ((self.x, self.y) for _ in range(self.steps))


TRAIN_B_ARCHS = ("resnet50", "tf_efficientnet_lite0")


def script_config(args):
    """The config of the script whose step is timed: trainA's defaults, or trainB's for --model <arch>."""
    if args.model in TRAIN_B_ARCHS:
        import trainB

        return trainB.ConfigB(arch=args.model, image_size=args.image_size, weights="none")
    import trainA

    return trainA.ConfigA(image_size=args.image_size)


def build_model(args, classes: int) -> nn.Module:
    if args.model in TRAIN_B_ARCHS:
        import trainB

        return trainB.build_model(script_config(args), classes)
    if args.model == "assignment":  # the assignment write-ups' best: 64 filters, 5,5,3,3,3, LeakyReLU
        return build_cnn(classes, args.image_size, 64, "same", [5, 5, 3, 3, 3], "LeakyReLU", True, 0.2)
    import trainA

    return trainA.build_model(trainA.ConfigA(image_size=args.image_size), classes)


def timed_epoch(name: str, loader, precision: Precision, args, classes: int) -> float:
    torch.manual_seed(0)
    model = build_model(args, classes)
    model = model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    opt = Optimisation(optimizer, scheduler, nn.CrossEntropyLoss(), precision.scaler())
    warm = PremadeBatches(2, args.batch_size, args.image_size, precision, classes)  # oneDNN/cuDNN warm-up
    train_one_epoch(model, warm, opt, precision, 0, show_progress=False)
    for epoch in range(1, args.epochs):  # untimed: first-epoch effects (page cache, allocator, autotuning)
        train_one_epoch(model, loader, opt, precision, epoch, show_progress=False)
    clocked = SteadyClock(loader, skip=2, device=precision.device)
    train_one_epoch(model, clocked, opt, precision, args.epochs, show_progress=False)
    seconds, images = clocked.result()
    print(f"{name:<34} {seconds:8.2f} s  {images / seconds:8.1f} img/s  ({images} images after the first 2 batches)",
          flush=True)
    return seconds / max(images, 1)


class SteadyClock:
    """Wraps a loader: the clock starts when batch skip+1 is asked for, so DataLoader worker
    start-up and the first batches' latency are not in the figure (the steady state is)."""

    def __init__(self, loader, skip: int, device: torch.device):
        self.loader, self.skip, self.device = loader, skip, device
        self.started = self.ended = 0.0
        self.images = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index == self.skip:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.started = time.perf_counter()
            if index >= self.skip and batch is not None:
                self.images += len(batch[1])
            yield batch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ended = time.perf_counter()

    def result(self) -> tuple[float, int]:
        return self.ended - self.started, self.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--model", choices=("default", "assignment") + TRAIN_B_ARCHS, default="default",
                        help="trainA's default CNN, the assignment's best (64 filters, 5,5,3,3,3, LeakyReLU), "
                             "or trainB's default full step on one of its backbones")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num_workers", type=int, default=-1)
    parser.add_argument("--skip_plain", action="store_true", help="leave out (a), e.g. on a slow CPU")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per variant; the last one is timed (default: 2)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    ours = Precision(device, autocast_dtype(device, "auto"), use_channels_last(device, "auto"))
    plain = Precision(device)  # fp32, contiguous
    workers = default_num_workers(args.num_workers)
    train = NatureData(args.data_dir, "train", build_train_transform(args.image_size), args.image_size, val_fraction=0.0)
    classes = len(train.classes)
    print(f"{args.model} model, {len(train)} train images, {classes} classes, {args.image_size}px, batch {args.batch_size}, "
          f"device {device}, ours: {ours.autocast_dtype or 'fp32'}{' channels_last' if ours.channels_last else ''}, "
          f"{workers} workers, torch {torch.__version__}")
    print(f"CPU: {cpu_description()}")  # speed figures mean something only beside the CPU they came from

    cache_dir = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        size = working_size(args.image_size)
        started = time.perf_counter()
        split = build_or_load(train.samples, size, size, args.image_size, cache_dir, "train")
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        build_or_load(train.samples, size, size, args.image_size, cache_dir, "train")
        hit_s = time.perf_counter() - started
        print(f"cache build (once per data set): {build_s:.2f} s, cache hit: {hit_s:.3f} s")

        per_image = {}
        if not args.skip_plain:
            per_image["plain"] = timed_epoch("(a) plain pipeline, fp32", plain_loader(
                args.data_dir / "train", args.image_size, args.batch_size, workers), plain, args, classes)
        per_image["stream"] = timed_epoch("(b) ours, streaming", make_loader(
            train, args.batch_size, True, device, workers, 0), ours, args, classes)
        augment = BatchAugment(args.image_size, True, IMAGENET_MEAN, IMAGENET_STD,
                               AugmentSpec.from_config(script_config(args)), channels_last=ours.channels_last)
        on_device = device.type == "cuda"
        if device.type == "cpu":  # what the background thread's augmentation gains over augmenting between steps
            per_image["between"] = timed_epoch("(c') cached, augmented between steps", CachedBatches(
                split, args.batch_size, True, augment, device, 0, augment_ahead=False), ours, args, classes)
        per_image["cached"] = timed_epoch("(c) ours, cached + device aug", CachedBatches(
            split, args.batch_size, True, augment, device, 0, on_device=on_device), ours, args, classes)
        steps = len(train) // args.batch_size
        per_image["compute"] = timed_epoch("(d) pure compute, ours", PremadeBatches(
            steps, args.batch_size, args.image_size, ours, classes), ours, args, classes)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    print(f"streaming vs plain: {per_image['plain'] / per_image['stream']:.2f}x" if "plain" in per_image else "")
    if "between" in per_image:
        print(f"augmenting on the background thread vs between steps: {per_image['between'] / per_image['cached']:.2f}x")
    speedup = per_image["plain"] / per_image["cached"] if "plain" in per_image else float("nan")
    print(f"speedup_vs_plain={speedup:.2f} overhead_vs_compute={per_image['cached'] / per_image['compute']:.2f}")


if __name__ == "__main__":
    main()

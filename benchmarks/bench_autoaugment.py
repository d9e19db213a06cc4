"""Auto-augment of one batch, timed alone (outside the model step), side by side in one process:
torchvision's policy image by image (what the cached path did before) against data.autoaugment's
batched policy (what it does now).

    python benchmarks/bench_autoaugment.py --device cpu --batch 64 --size 128

Prints one line per policy: the median milliseconds per batch of each path (the two run in
turn, repeat by repeat) and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.autoaugment import BatchPolicy  # noqa: E402


def per_image(policy: v2.Transform, images: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([policy(image) for image in images])


def interleaved(functions, repeats: int, device: torch.device) -> list[float]:
    """Median milliseconds of each function, the functions run in turn within every repeat, so
    a noisy neighbour slows all of them alike instead of one block of repeats."""
    def once(function) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) * 1000

    for function in functions:  # warm-up
        function()
    times = [[once(function) for function in functions] for _ in range(repeats)]
    return [statistics.median(column) for column in zip(*times)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    images = (torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 255
              ).to(torch.uint8).to(device)
    for name, reference in (("trivialwide", v2.TrivialAugmentWide()), ("randaugment", v2.RandAugment())):
        batched = BatchPolicy(name)
        old, new = interleaved([lambda: per_image(reference, images, 0),
                                lambda: batched(images, torch.Generator().manual_seed(0))], args.repeats, device)
        print(f"{name}: {name}_per_image_ms={old:.1f} {name}_batched_ms={new:.1f} {name}_speedup={old / new:.1f} "
              f"(batch {args.batch}, {args.size} px, {device})")


if __name__ == "__main__":
    main()

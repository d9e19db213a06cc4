import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import trainA
from conftest import ROOT, TINY_ARGS, write_image
from data import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, NatureData, build_eval_transform, sizes_for, working_size
from data.cache import build_or_load, crop_offset
from data.augment import BatchAugment
from data.loaders import CachedBatches


def split_of(data_dir, cache_dir, image_size=32, split="test"):
    dataset = NatureData(data_dir, split, build_eval_transform(image_size), image_size, val_fraction=0.2)
    size = working_size(image_size)
    return dataset, build_or_load(dataset.samples, size, size, image_size, cache_dir, split, workers=1)


def test_cached_and_streaming_eval_give_the_same_tensors(tiny_data, tmp_path):
    # Add a small image (upsampled by both paths) and a big one (draft-mode decode in both).
    write_image(tiny_data / "val" / "fungi" / "small.jpg", (40, 180, 60), (20, 27), seed=7)
    write_image(tiny_data / "val" / "fungi" / "big.jpg", (40, 180, 60), (301, 177), seed=8)
    dataset, split = split_of(tiny_data, tmp_path / "cache")
    loader = CachedBatches(split, 64, False, BatchAugment(32, False, IMAGENET_MEAN, IMAGENET_STD), torch.device("cpu"))
    (cached, labels), = list(loader)
    streamed = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert torch.equal(labels, torch.tensor(dataset.targets))
    assert torch.allclose(cached, streamed, atol=1e-5), (cached - streamed).abs().max()


@pytest.mark.parametrize("crop_pct", [0.875, 0.94, 1.0])
def test_eval_crop_is_the_same_on_both_paths_and_the_train_split_keeps_its_margin(tiny_data, tmp_path, crop_pct):
    """--crop_pct: the cached val/test squares equal the streaming eval transform's output, and
    an augmented train split is still cached with the training margin (working_size); one that is
    not augmented is framed as val and test are."""
    from data import eval_resize
    from utils.inputs import cached_loaders
    from utils.run import ModelRecipe
    from types import SimpleNamespace

    assert eval_resize(224, 0.875) == 256 and eval_resize(128, 0.875) == working_size(128) == 147
    assert eval_resize(128, 1.0) == 128 and eval_resize(128, 0.94) == 137
    write_image(tiny_data / "test" / "fungi" / "wide.jpg", (40, 180, 60), (90, 45), seed=9)
    resize = eval_resize(32, crop_pct)
    sets = [NatureData(tiny_data, split, build_eval_transform(32, resize), 32, val_fraction=0.2)
            for split in ("train", "val", "test")]
    cfg = SimpleNamespace(cache_dir=str(tmp_path / "cache"), image_size=32, data_aug=True, batch_size=64, seed=0,
                          data_on_device="false", crop_scale=0.6, jitter=0.0, erasing=0.0, auto_augment="none")
    recipe = ModelRecipe(script="trainA", new_model=None, param_groups=None, train_transform=None, eval_transform=None,
                         sizes=sizes_for(32, crop_pct))
    run = SimpleNamespace(cfg=cfg, recipe=recipe, say=print, dist=SimpleNamespace(rank=0, world=1),
                          precision=SimpleNamespace(device=torch.device("cpu"), channels_last=False))
    train, _, test = cached_loaders(run, *sets)
    assert train.split.images.shape[1] == working_size(32) and test.split.images.shape[1] == resize
    plain_train, _, _ = cached_loaders(SimpleNamespace(**dict(vars(run), cfg=SimpleNamespace(**dict(vars(cfg), data_aug=False)))),
                                       *sets)
    assert plain_train.split.images.shape[1] == resize
    (cached, labels), = list(test)
    streamed = torch.stack([sets[2][i][0] for i in range(len(sets[2]))])
    assert torch.allclose(cached, streamed, atol=1e-5), (cached - streamed).abs().max()


@pytest.mark.parametrize("length,size,final", [(197, 147, 128), (147, 147, 128), (300, 37, 32), (38, 37, 32)])
def test_crop_offset_composes_to_the_direct_center_crop(length, size, final):
    outer = crop_offset(length, size, final)
    assert 0 <= outer <= length - size
    assert outer + int(round((size - final) / 2.0)) == int(round((length - final) / 2.0))


def test_cache_hit_miss_and_stale(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    _, first = split_of(tiny_data, cache)
    stamp = os.stat(first.path).st_mtime_ns
    _, again = split_of(tiny_data, cache)
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == stamp  # hit: not rebuilt
    changed = tiny_data / "val" / "amphibia" / "amphibia_000.jpg"
    write_image(changed, (255, 255, 255), (50, 50), seed=99)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    _, stale = split_of(tiny_data, cache)
    assert stale.path != first.path  # changed file -> new key -> rebuilt
    index = stale.paths.index(str(changed))
    assert stale.images[index].mean() > first.images[index].mean() + 50


def test_unreadable_files_are_marked_and_skipped(tiny_data, tmp_path, capsys):
    bad = tiny_data / "val" / "insecta" / "insecta_001.jpg"
    bad.write_bytes(b"truncated")
    dataset, split = split_of(tiny_data, tmp_path / "cache")
    assert split.valid.sum() == len(dataset) - 1 and not split.valid[split.paths.index(str(bad))]
    assert f"skipping unreadable image '{bad}'" in capsys.readouterr().err
    loader = CachedBatches(split, 5, False, BatchAugment(32, False, IMAGENET_MEAN, IMAGENET_STD), torch.device("cpu"))
    assert sum(len(y) for _, y in loader) == len(dataset) - 1


def test_two_processes_building_the_same_cache_give_one_valid_cache(tiny_data, tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from data import NatureData; "
            "from data.cache import build_or_load; d = NatureData(sys.argv[2], 'train', image_size=32); "
            "s = build_or_load(d.samples, 37, 37, 32, Path(sys.argv[3]), 'train', workers=2); print(s.path, s.valid.sum())")
    args = [sys.executable, "-c", code, str(ROOT), str(tiny_data), str(tmp_path / "cache")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    arrays = list((tmp_path / "cache").glob("*.npy"))
    assert len(arrays) == 1 and not list((tmp_path / "cache").glob(".*tmp*"))
    meta = json.loads(arrays[0].with_suffix(".json").read_text())
    assert meta["count"] == 24 and all(meta["valid"])
    assert np.load(arrays[0], mmap_mode="r").shape == (24, 37, 37, 3)


def test_device_augmentation_keeps_shape_dtype_and_range_and_varies_per_image():
    images = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    images[1] = images[0]
    augment = BatchAugment(32, True, IMAGENET_MEAN, IMAGENET_STD, AugmentSpec(erasing=0.5))
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    low = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    per_channel = out.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= low - 1e-5).all() and (per_channel.max(1).values <= high + 1e-5).all()
    assert not torch.equal(out[0], out[1])  # same input, different random draw
    again = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # a seed fixes it


def test_identity_crop_without_jitter_reproduces_the_input():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    augment = BatchAugment(32, True, (0, 0, 0), (1, 1, 1), AugmentSpec(crop_scale=1, ratio=(1, 1), jitter=0, erasing=0))
    out = augment(images, torch.Generator().manual_seed(1))
    expected = images.float() / 255
    flipped = expected.flip(-1)
    for i in range(4):
        assert torch.allclose(out[i], expected[i], atol=1e-5) or torch.allclose(out[i], flipped[i], atol=1e-5)


def test_cached_run_end_to_end_and_second_run_hits_the_cache(tiny_data, tmp_path, capsys):
    args = [a for a in TINY_ARGS]
    common = ["--data_dir", str(tiny_data), "-e", "1", "--cache", "auto", "--cache_dir", str(tmp_path / "cache"), *args]
    assert trainA.main([*common, "--output_dir", str(tmp_path / "r1")]) == 0
    built = {p.name: os.stat(p).st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")}
    assert len(built) == 3  # train, val, test
    assert trainA.main([*common, "--output_dir", str(tmp_path / "r2")]) == 0
    assert {p.name: os.stat(p).st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")} == built


def test_on_a_cpu_the_next_batch_is_augmented_off_the_training_thread(tiny_data, tmp_path):
    """The cached path on a CPU prepares each batch (gather, crop, flip, normalise) on its
    background thread, so it overlaps the step; the draws stay those of the main-thread order
    (test_gpu_ready's comparison with the device path checks the values)."""
    import threading

    _, split = split_of(tiny_data, tmp_path / "cache", split="train")
    threads = []

    class Recording(BatchAugment):
        def __call__(self, images, generator=None):
            threads.append(threading.current_thread())
            return super().__call__(images, generator)

    loader = CachedBatches(split, 4, True, Recording(32, True, IMAGENET_MEAN, IMAGENET_STD), torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == len(threads) > 1
    assert all(batch[0].shape[1:] == (3, 32, 32) for batch in batches)
    assert threading.main_thread() not in threads

"""Unkind inputs: broken photo metadata, unkind file systems, broken caches, resume
mistakes, trainB inputs, archives. Each case: one line, nothing lost, never a hang."""

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.cache
import trainA
import trainB
from conftest import TINY_ARGS, make_dataset, one_error_line, only_dir, write_image
from data import NatureData, load_rgb
from data.cache import CacheUnavailable, build_or_load
from data.decode import UNREADABLE
from data.augment import BatchAugment
from data.loaders import CachedBatches
from data.download import extract_zip
from data.errors import DatasetError
from utils.cli import run_cli




# ------------------------------------------------------------- 1. photo metadata

def jpeg_with_exif(seed: int = 0) -> bytes:
    """A real JPEG carrying an EXIF block with Orientation=6 and a few more tags, as phones write."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0110] = "Model X"  # Model
    exif[0x0131] = "camera app 1.0"  # Software
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=90)
    return buffer.getvalue()


def corrupted_metadata(seed: int, count: int):
    """JPEGs whose APP1 (EXIF) segment has random bytes changed, type fields swapped or the
    segment cut short: the metadata is broken, the pixels are fine."""
    base = jpeg_with_exif()
    start = base.index(b"Exif\0\0")
    length = struct.unpack(">H", base[start - 2:start])[0]
    rng = np.random.default_rng(seed)
    for _ in range(count):
        data = bytearray(base)
        kind = rng.integers(3)
        if kind == 0:  # flip a few random bytes inside the EXIF block
            for position in rng.integers(start + 6, start + length - 2, size=int(rng.integers(1, 6))):
                data[position] = int(rng.integers(256))
        elif kind == 1:  # a tag's stored type no longer matches its value (types are 2 bytes after the tag id)
            ifd = start + 6 + 8 + 2
            entry = ifd + 12 * int(rng.integers(0, 4))
            data[entry + 2:entry + 4] = struct.pack("<H", int(rng.integers(0, 20)))
        else:  # a count field made huge
            entry = start + 6 + 8 + 2 + 12 * int(rng.integers(0, 4))
            data[entry + 4:entry + 8] = struct.pack("<I", int(rng.integers(1, 2**32 - 1)))
        yield bytes(data)


def test_fuzzed_exif_never_escapes_as_anything_but_a_skippable_error(tmp_path):
    path = tmp_path / "x.jpg"
    decoded = 0
    for blob in corrupted_metadata(seed=0, count=1000):
        path.write_bytes(blob)
        try:
            image = load_rgb(str(path), 20)
        except UNREADABLE:
            continue
        assert image.mode == "RGB" and min(image.size) <= 24
        decoded += 1
    assert decoded > 900  # broken metadata costs the orientation, not the picture


def test_struct_error_from_exif_transpose_decodes_without_orientation(tmp_path, monkeypatch):
    path = tmp_path / "phone.jpg"
    path.write_bytes(jpeg_with_exif())

    def broken(image):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr("data.decode.ImageOps.exif_transpose", broken)
    assert load_rgb(str(path)).size == (32, 24)


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_runs_and_predict_survive_photos_with_broken_metadata(tmp_path, cache, capsys):
    root = make_dataset(tmp_path / "data", train_per_class=6, test_per_class=2)
    blobs = corrupted_metadata(seed=1, count=40)
    for split in ("train", "val"):
        for i, blob in zip(range(20), blobs):
            (root / split / "fungi" / f"phone_{i}.jpg").write_bytes(blob)
    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(root), "-e", "1", *TINY_ARGS, "--cache", cache,
                        "--output_dir", str(out)]) == 0
    run_dir = only_dir(out)
    assert (run_dir / "best.pt").exists() and (run_dir / "test_metrics.json").exists()
    assert trainA.main(["--predict", str(root / "val" / "fungi"), "--checkpoint", str(run_dir / "best.pt")]) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------- 2. file systems

def test_symlink_loops_and_special_files_in_class_folders_are_skipped(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", train_per_class=6, test_per_class=2)
    cls = root / "train" / "fungi"
    os.symlink(cls / "loop_b.jpg", cls / "loop_a.jpg")
    os.symlink(cls / "loop_a.jpg", cls / "loop_b.jpg")
    os.symlink(cls / "self.jpg", cls / "self.jpg") if False else os.symlink("self.jpg", cls / "self.jpg")
    os.mkfifo(cls / "pipe.jpg")
    os.symlink(root / "train" / "loopdir", root / "train" / "loopdir")
    train = NatureData(root, "train", val_fraction=0.2)
    names = {Path(s.path).name for s in train.samples}
    assert not names & {"loop_a.jpg", "loop_b.jpg", "self.jpg", "pipe.jpg"}
    assert train.classes == ["amphibia", "fungi", "insecta"]
    assert "loop_a.jpg" in capsys.readouterr().err  # named, not silently dropped


def test_special_files_are_refused_never_opened(tmp_path, capsys):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    code = run_cli(trainA.main, ["--predict", str(fifo), "--checkpoint", str(fifo)], prog="trainA.py")
    assert code == 2
    one_error_line(capsys, str(fifo))
    with pytest.raises(UNREADABLE):
        load_rgb(str(fifo))


# ------------------------------------------------------------- 3. the decoded-image cache

def split_samples(root):
    return NatureData(root, "train", val_fraction=0).samples


def test_unusable_cache_folder_falls_back_to_streaming_with_one_warning(tiny_data, tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", *TINY_ARGS, "--cache_dir", str(not_a_folder),
                        "--output_dir", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "decoding images every epoch instead" in line]
    assert len(warnings) == 1 and str(not_a_folder) in warnings[0] and "--cache_dir" in warnings[0]
    assert (only_dir(out) / "best.pt").exists()


def test_complete_cache_is_read_without_the_lock(tiny_data, tmp_path, monkeypatch):
    samples = split_samples(tiny_data)
    first = build_or_load(samples, 37, 37, 32, tmp_path / "cache")

    class NoLocking:
        def __init__(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied")  # what a read-only folder gives

    monkeypatch.setattr(data.cache, "FileLock", NoLocking)
    again = build_or_load(samples, 37, 37, 32, tmp_path / "cache")
    assert np.array_equal(first.images, again.images)


@pytest.mark.parametrize("damage", ["truncate_array", "truncate_meta", "fewer_rows", "garbage_meta"])
def test_a_broken_cache_is_detected_and_rebuilt(tiny_data, tmp_path, damage, capsys):
    samples = split_samples(tiny_data)
    cache = tmp_path / "cache"
    good = np.array(build_or_load(samples, 37, 37, 32, cache).images)
    (array,) = cache.glob("*.npy")
    meta = array.with_suffix(".json")
    if damage == "truncate_array":
        array.write_bytes(array.read_bytes()[:5000])
    elif damage == "truncate_meta":
        meta.write_text(meta.read_text()[:20])
    elif damage == "garbage_meta":
        meta.write_text(json.dumps({"count": "many"}))
    else:
        np.lib.format.open_memmap(array, mode="w+", dtype=np.uint8, shape=(len(samples) - 3, 37, 37, 3)).flush()
    (cache / f".{array.stem}.tmp-999999.npy").write_bytes(b"left by a killed build")
    rebuilt = build_or_load(samples, 37, 37, 32, cache)
    assert np.array_equal(np.array(rebuilt.images), good)
    assert "is broken" in capsys.readouterr().err
    assert not list(cache.glob(".*.tmp-*"))


def test_full_disk_is_reported_before_writing(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(data.cache.shutil, "disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(CacheUnavailable, match="GB free"):
        build_or_load(split_samples(tiny_data), 37, 37, 32, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".npy"]


def test_ctrl_c_while_building_the_cache_is_one_line_and_leaves_no_temp_file(tiny_data, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.cache, "decode_square", interrupted)
    code = run_cli(trainA.main, ["--data_dir", str(tiny_data), "-e", "1", *TINY_ARGS, "--cache_dir",
                                 str(tmp_path / "cache"), "--output_dir", str(tmp_path / "runs")], prog="trainA.py")
    assert code == 130
    one_error_line(capsys, "interrupted before training started")
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_an_error_in_the_batch_thread_reaches_the_consumer(tiny_data, tmp_path):
    split = build_or_load(split_samples(tiny_data), 37, 37, 32, tmp_path / "cache")

    class Exploding:
        shape, dtype = split.images.shape, split.images.dtype

        def __getitem__(self, index):
            raise OSError(5, "Input/output error")

    split.images = Exploding()
    loader = CachedBatches(split, 4, True, BatchAugment(32, True, (0, 0, 0), (1, 1, 1)), torch.device("cpu"))
    with pytest.raises(OSError, match="Input/output error"):
        list(loader)


# ------------------------------------------------------------- 4. resume mistakes

@pytest.fixture
def finished_run(tmp_path, tiny_data):
    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", *TINY_ARGS, "--output_dir", str(out)]) == 0
    return only_dir(out)


def snapshot(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}


def assert_resume_refused(run_dir: Path, capsys, *needles: str, extra: tuple = ("-e", "2", "--num_workers", "0"),
                          checkpoint: str = "last.pt") -> None:
    """--resume is refused with one line naming the problem, and the run folder is untouched."""
    before = snapshot(run_dir)
    assert run_cli(trainA.main, ["--resume", str(run_dir / checkpoint), *extra], prog="trainA.py") == 2
    one_error_line(capsys, *needles)
    assert snapshot(run_dir) == before


def test_resume_from_best_pt_is_one_line(finished_run, capsys):
    assert_resume_refused(finished_run, capsys, "best.pt", "last.pt", extra=(), checkpoint="best.pt")


@pytest.mark.parametrize("change", ["gained_a_class", "renamed_classes"])
def test_resume_on_other_classes_is_refused_before_touching_the_run(finished_run, tiny_data, capsys, change):
    if change == "gained_a_class":
        for split in ("train", "val"):
            for i in range(4):
                write_image(tiny_data / split / "mammalia" / f"m{i}.jpg", (220, 200, 40), seed=i)
    else:
        for split in ("train", "val"):
            (tiny_data / split / "fungi").rename(tiny_data / split / "plantae")
    assert_resume_refused(finished_run, capsys, "differ from those of the run being resumed")


def test_resume_path_with_tilde_is_expanded(finished_run, monkeypatch):
    monkeypatch.setenv("HOME", str(finished_run.parent))
    assert trainA.main(["--resume", f"~/{finished_run.name}/last.pt", "-e", "2", "--num_workers", "0"]) == 0
    assert torch.load(finished_run / "last.pt", weights_only=True)["epoch"] == 2


def test_a_run_folder_in_use_is_refused(finished_run, capsys):
    from filelock import FileLock

    with FileLock(str(finished_run / ".run.lock")):  # another process owns the run
        assert_resume_refused(finished_run, capsys, "is in use by another process")


def test_flags_that_a_resume_cannot_honour_are_refused(finished_run, capsys):
    assert_resume_refused(finished_run, capsys, "--lr cannot change", "--epochs", extra=("--lr", "0.5", "-e", "2"))


# ------------------------------------------------------------- 5. trainB inputs

def test_trainB_refuses_a_single_class(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", classes=("fungi",), train_per_class=6, test_per_class=2)
    code = run_cli(trainB.main, ["--data_dir", str(root), "-e", "1", *TINY_ARGS[:2], "--arch", "resnet18", "--strategy", "full",
                                 "--weights", "none", "--wandb_mode", "disabled", "--num_workers", "0",
                                 "--output_dir", str(tmp_path / "runs")], prog="trainB.py")
    assert code == 2
    one_error_line(capsys, "one class", "at least two")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("payload", [[1, 2, 3], {"model": "not tensors"}, torch.zeros(3)])
def test_trainB_weights_file_that_is_not_a_state_dict_is_one_line(tmp_path, capsys, payload):
    weights = tmp_path / "w.pth"
    torch.save(payload, weights)
    code = run_cli(trainB.main, ["--data_dir", str(make_dataset(tmp_path / "d")), "--arch", "resnet18",
                                 "--weights", str(weights), "-e", "1", "--strategy", "full", "--wandb_mode", "disabled",
                                 "--num_workers", "0", "-is", "32", "--output_dir", str(tmp_path / "runs")],
                   prog="trainB.py")
    assert code == 2
    one_error_line(capsys, str(weights))


# ------------------------------------------------------------- 6. archives

def test_many_small_members_that_together_are_a_bomb_are_refused(tmp_path):
    path = tmp_path / "many.zip"
    block = b"\0" * (2**20)  # each member exactly 1 MiB: under the per-member limit
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(80):
            archive.writestr(f"inaturalist_12K/train/a/{i}.jpg", block)
    with pytest.raises(DatasetError, match="in all"):
        extract_zip(path, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_test_images_copied_from_train_are_named_as_a_leak(tiny_data, tmp_path, capsys):
    """Identical files in train/ and the test folder: the run goes on, with one warning naming a
    pair and the count; a data set without copies says nothing."""
    import shutil

    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "clean"), *TINY_ARGS]) == 0
    assert "byte-for-byte" not in capsys.readouterr().err
    copied = sorted((tiny_data / "train" / "fungi").iterdir())[:2]
    for k, path in enumerate(copied):
        shutil.copy(path, tiny_data / "val" / "fungi" / f"copy_{k}.jpg")
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "leaky"), *TINY_ARGS]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 test image(s) are byte-for-byte copies of training images" in err and "copy_0.jpg" in err


def test_a_resume_on_train_images_that_changed_says_the_split_is_not_the_same(finished_run, tiny_data, capsys):
    """Files added to (or removed from, or replaced in) train/ between a run and its --resume
    change the stratified train/val split: the resume goes on, with one warning saying so."""
    assert trainA.main(["--resume", str(finished_run / "last.pt"), "-e", "2", "--num_workers", "0"]) == 0
    assert "not those of the run being resumed" not in capsys.readouterr().err  # unchanged: nothing said
    write_image(tiny_data / "train" / "fungi" / "new_photo.jpg", (40, 180, 60), seed=42)
    assert trainA.main(["--resume", str(finished_run / "last.pt"), "-e", "3", "--num_workers", "0"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "not those of the run being resumed" in line]
    assert len(warning) == 1 and "train: 24 then, 25 now" in warning[0] and "Traceback" not in err

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASS_COLOURS, make_dataset, write_image
from data import (
    DatasetError,
    NatureData,
    build_eval_transform,
    build_train_transform,
    collate_skipping_unreadable,
    load_rgb,
    resolve_folders,
    scan_split,
    stratified_split,
)
from data.folder import Sample


@pytest.mark.parametrize("nested,test_name", [(True, "val"), (False, "val"), (False, "test")])
def test_layouts_zip_root_and_plain_train_val_or_test(tmp_path, nested, test_name):
    root = make_dataset(tmp_path / "d", train_per_class=3, test_per_class=2, test_name=test_name, nested=nested)
    folders = resolve_folders(root)
    assert folders.train_dir.name == "train" and folders.test_dir.name == test_name
    test = NatureData(root, "test", image_size=None)
    assert test.classes == ["amphibia", "fungi", "insecta"] and len(test) == 6


def test_missing_dir_and_missing_test_folder_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_folders(tmp_path / "nope")
    (tmp_path / "only" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test folder; add val/ or test/"):
        resolve_folders(tmp_path / "only")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no train/ folder"):
        resolve_folders(tmp_path / "empty")


def test_class_mismatch_names_missing_and_extra(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=2, test_per_class=1)
    (root / "val" / "fungi").rename(root / "val" / "plantae")
    with pytest.raises(DatasetError, match=r"missing fungi; extra plantae"):
        NatureData(root, "test")


def test_only_image_files_count_and_hidden_or_stray_files_are_ignored(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=2, test_per_class=1)
    cls = root / "train" / "fungi"
    (cls / ".DS_Store").write_bytes(b"\0\0")
    (cls / "Thumbs.db").write_bytes(b"\0")
    (cls / "notes.txt").write_text("x")
    (cls / "._fungi_000.jpg").write_bytes(b"resource fork")
    (cls / "folder.jpg").mkdir()
    write_image(cls / "UPPER.JPG", CLASS_COLOURS["fungi"])
    write_image(cls / "p.PNG", CLASS_COLOURS["fungi"], fmt="PNG")
    (root / "train" / ".hidden_class").mkdir()
    classes, samples = scan_split(root / "train")
    assert classes == ["amphibia", "fungi", "insecta"]
    names = sorted(p.path.rsplit("/", 1)[1] for p in samples if p.label == 1)
    assert names == ["UPPER.JPG", "fungi_000.jpg", "fungi_001.jpg", "p.PNG"]


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=2, test_per_class=1)
    (root / "train" / "zzz_empty").mkdir()
    (root / "train" / "zzz_empty" / ".DS_Store").write_bytes(b"")
    with pytest.raises(DatasetError, match="zzz_empty' holds no images"):
        scan_split(root / "train")


def test_stratified_split_sizes_balance_seed_and_disjointness():
    samples = [Sample(f"{c}_{i}", c) for c in range(3) for i in range(10 * (c + 1))]  # 10, 20, 30
    train, val = stratified_split(samples, 0.2, seed=1)
    assert [sum(s.label == c for s in val) for c in range(3)] == [2, 4, 6]
    assert len(train) + len(val) == 60
    assert not {s.path for s in train} & {s.path for s in val}
    again, _ = stratified_split(samples, 0.2, seed=1)
    other, _ = stratified_split(samples, 0.2, seed=2)
    assert [s.path for s in again] == [s.path for s in train]
    assert [s.path for s in other] != [s.path for s in train]


def test_split_gives_every_class_a_val_image_and_refuses_single_image_classes():
    samples = [Sample("a0", 0), Sample("a1", 0), Sample("b0", 1), Sample("b1", 1), Sample("b2", 1)]
    train, val = stratified_split(samples, 0.1, seed=0)
    assert sorted(s.label for s in val) == [0, 1]
    with pytest.raises(DatasetError, match="too few to hold one out"):
        stratified_split([Sample("a", 0), Sample("b0", 1), Sample("b1", 1)], 0.2, seed=0)
    with pytest.raises(DatasetError, match="val_fraction"):
        stratified_split(samples, 1.0, seed=0)


def test_train_and_val_partition_the_train_folder(tiny_data):
    train = NatureData(tiny_data, "train", val_fraction=0.2, seed=3)
    val = NatureData(tiny_data, "val", val_fraction=0.2, seed=3)
    assert len(train) == 24 and len(val) == 6
    assert not {s.path for s in train.samples} & {s.path for s in val.samples}


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = write_image(tmp_path / f"x.{fmt.lower()}", (200, 40, 40), (30, 20), mode=mode, fmt=fmt)
    image = load_rgb(str(path))
    assert image.mode == "RGB" and image.size == (30, 20)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = (np.linspace(0, 65535, 20 * 30).reshape(20, 30)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_rgb(str(path)))
    assert pixels.shape == (20, 30, 3)
    assert pixels.min() == 0 and pixels.max() == 255  # full range kept, not clipped to white
    assert 100 < pixels.mean() < 155


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.save(tmp_path / "t.png")
    assert np.asarray(load_rgb(str(tmp_path / "t.png"))).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(str(tmp_path / "rot.jpg")).size == (20, 40)


def test_large_jpeg_uses_draft_mode_and_is_shrunk_to_working_size(tmp_path):
    write_image(tmp_path / "big.jpg", (10, 200, 10), (1600, 1200))
    image = load_rgb(str(tmp_path / "big.jpg"), shorter_side=147)
    assert min(image.size) == 147 and image.size == (196, 147)


def test_unreadable_images_are_skipped_with_a_warning_naming_them(tiny_data, capsys):
    bad = tiny_data / "train" / "fungi" / "fungi_000.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    empty = tiny_data / "train" / "fungi" / "fungi_001.jpg"
    empty.write_bytes(b"")
    text = tiny_data / "train" / "fungi" / "fungi_002.jpg"
    text.write_text("not an image")
    data = NatureData(tiny_data, "train", build_eval_transform(32), image_size=32, val_fraction=0.0)
    items = [data[i] for i in range(len(data))]
    assert sum(item is None for item in items) == 3
    err = capsys.readouterr().err
    for path in (bad, empty, text):
        assert f"skipping unreadable image '{path}'" in err
    batch = collate_skipping_unreadable(items[:12])
    assert batch[0].shape[0] == sum(item is not None for item in items[:12])
    assert collate_skipping_unreadable([None, None]) is None


@pytest.mark.parametrize("augment", [False, True])
def test_transforms_give_normalised_float_tensors_of_the_crop_size(tmp_path, augment):
    path = write_image(tmp_path / "a.jpg", (120, 120, 120), (70, 45))
    transform = build_train_transform(40, augment) if augment else build_eval_transform(40)
    out = transform(load_rgb(str(path), 46))
    assert out.shape == (3, 40, 40) and out.dtype == torch.float32
    assert -3 < out.mean() < 3

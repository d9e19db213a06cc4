"""The image files phones and the web give (issue 40, item 3): each is converted and trained on,
or skipped with a warning naming it and why; never a crash in a loader, never a hang."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, features

import trainA
from conftest import ROOT, TINY_ARGS, make_dataset, write_image
from data import load_rgb
from data.decode import UNREADABLE

# Made to look like an iPhone photo saved as .jpg: an ISO media 'ftyp' box with the heic brand.
HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)


def noise(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def write_odd_files(folder) -> tuple[list[str], list[str]]:
    """Every kind in folder; returns (names that must train, names that must be skipped)."""
    noise((60, 45)).save(folder / "progressive.jpg", progressive=True, quality=80)
    write_image(folder / "cmyk.jpg", (40, 180, 60), mode="CMYK", fmt="JPEG")
    Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)).save(folder / "sixteen_bit.png")
    noise((50, 40)).convert("P").save(folder / "palette_transparent.png", transparency=0)
    noise((50, 40)).save(folder / "web.webp")
    frames = [noise((40, 40), seed=s) for s in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    noise((50, 40)).save(folder / "scan.tif")
    noise((1, 1)).save(folder / "one_pixel.png")
    noise((900, 700)).save(folder / "panorama.jpg", quality=70)  # over the (lowered) bomb limit
    convertible = ["progressive.jpg", "cmyk.jpg", "sixteen_bit.png", "palette_transparent.png", "web.webp",
                   "animated.gif", "scan.tif", "one_pixel.png", "panorama.jpg"]
    if features.check("avif"):
        noise((50, 40)).save(folder / "avif_named.jpg", format="AVIF")
        convertible.append("avif_named.jpg")
    noise((900, 700)).save(folder / "huge.png")  # over the limit and no draft decode: refused
    (folder / "iphone.jpg").write_bytes(HEIC_HEAD)
    (folder / "iphone.heic").write_bytes(HEIC_HEAD)
    (folder / "fungi_003b_truncated.jpg").write_bytes((folder / "fungi_003.jpg").read_bytes()[:300])
    return convertible, ["huge.png", "iphone.jpg", "iphone.heic", "fungi_003b_truncated.jpg"]


@pytest.fixture
def small_bomb_limit(monkeypatch):
    """A decompression-bomb limit of 150k pixels: the 900 x 700 files are then 'twice over' it, as a
    20000 x 20000 photo is over Pillow's default, without writing 400 megapixels in a test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150_000)


def test_each_odd_file_is_converted_to_rgb_or_refused_with_its_reason(tmp_path, small_bomb_limit):
    convertible, refused = write_odd_files(make_dataset(tmp_path / "d", train_per_class=4) / "train" / "fungi")
    folder = tmp_path / "d" / "train" / "fungi"
    for name in convertible:
        image = load_rgb(str(folder / name), 36)
        assert image.mode == "RGB" and min(image.size) >= 1, name
    panorama = load_rgb(str(folder / "panorama.jpg"), 36)
    assert min(panorama.size) == 36 and panorama.size[0] > panorama.size[1]  # draft decode, then resize
    reasons = {}
    for name in refused:
        with pytest.raises(UNREADABLE) as caught:
            load_rgb(str(folder / name), 36)
        reasons[name] = str(caught.value)
    assert "HEIC" in reasons["iphone.jpg"] and "convert it to JPEG" in reasons["iphone.jpg"]
    assert "exceeds" in reasons["huge.png"]


@pytest.mark.parametrize("cache,workers", [("auto", "0"), ("off", "0"), ("off", "2")])
def test_a_folder_of_phone_and_web_formats_trains_and_names_each_skipped_file(tmp_path, capsys, small_bomb_limit,
                                                                              cache, workers):
    root = make_dataset(tmp_path / "d", train_per_class=4)
    convertible, refused = write_odd_files(root / "train" / "fungi")
    argv = ["--data_dir", str(root), "-e", "2", *TINY_ARGS, "--cache", cache, "--cache_dir", str(tmp_path / "c"),
            "--output_dir", str(tmp_path / "runs"), "--num_workers", workers]
    if workers == "0":
        assert trainA.main(argv) == 0
        err = capsys.readouterr().err
    else:  # loader worker processes print to the real stderr: a process of its own, with the same limit
        code = ("import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 150_000; import trainA; "
                "sys.exit(trainA.main(sys.argv[1:]))")
        result = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr[-3000:]
        err = result.stderr
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "skipping unreadable image" in line]
    for name in refused:  # once each, though streaming reads every file again each epoch, in new workers
        assert sum(f"{name}'" in line for line in warnings) == 1, (name, err[-2000:])
    for name in convertible:
        assert f"{name}'" not in err, name

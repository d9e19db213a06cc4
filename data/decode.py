"""Decode any image file to an RGB PIL image, small enough for the working size."""

from __future__ import annotations

import math
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

# JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT, which is several
# times faster than a full decode followed by a resize when the target is much smaller.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class UnreadableImage(OSError):
    """Anything else that went wrong while decoding one file (e.g. a struct.error from broken
    metadata): that file's problem, reported and skipped like any unreadable file."""


# What decoding one file may raise: broken or non-image files (OSError and its
# UnidentifiedImageError, ValueError, SyntaxError), images over twice MAX_IMAGE_PIXELS, and
# UnreadableImage for any other failure inside Pillow.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def working_size(image_size: int) -> int:
    """Shorter side images are decoded to: a margin above the crop, as in resize 256 / crop 224."""
    return int(math.ceil(image_size * 8 / 7))


def eval_resize(image_size: int, crop_pct: float) -> int:
    """Shorter side for evaluation so that the center crop of image_size keeps crop_pct of it
    (timm's crop_pct): 0.875 gives working_size (224 -> 256), 1 the whole shorter side."""
    return max(image_size, int(math.ceil(image_size / crop_pct - 1e-9)))


@dataclass(frozen=True)
class Sizes:
    """Every pixel size of a run, worked out in sizes_for() alone and read by the dataset, the
    decoded-image cache, the transforms, --test_only and --predict."""
    image: int  # the square the network sees (--image_size)
    eval_resize: int  # val, test, --predict: the shorter side is resized to this, then center-cropped to image
    train_resize: int  # train images are decoded (and cached) at this shorter side; random crops take from it

    @property
    def decode(self) -> int:
        """The smallest shorter side a file is decoded to (JPEG draft mode): enough for both."""
        return max(self.eval_resize, self.train_resize)


def sizes_for(image_size: int, crop_pct: float = 0.875) -> Sizes:
    """The sizes of a run at image_size whose eval center crop keeps crop_pct of the shorter side
    (trainA's --crop_pct, the crop share of trainB's weights)."""
    return Sizes(image_size, eval_resize(image_size, crop_pct), working_size(image_size))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        values = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(values, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colour; put them on white like a viewer would.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str, shorter_side: int | None = None) -> Image.Image:
    """Open path, apply its EXIF orientation, convert to RGB, and shrink so the shorter side is
    shorter_side (never enlarged here: the transforms upsample small images if needed).

    Raises one of UNREADABLE for files that are not readable images. Broken orientation
    metadata (EXIF/XMP, common in phone photos) is ignored: the pixels are used as stored.
    """
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UnreadableImage("not a regular file (a pipe, socket or device)")
    try:
        return _load_rgb(path, shorter_side)
    except Image.UnidentifiedImageError:
        if (why := why_unidentified(path)) is not None:
            raise UnreadableImage(why) from None
        raise
    except UNREADABLE:
        raise
    except Exception as error:  # noqa: BLE001 - one bad file must never stop a run
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None


def _oriented(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed metadata: keep the stored orientation
        return image


def _load_rgb(path: str, shorter_side: int | None) -> Image.Image:
    with warnings.catch_warnings():
        # Huge photos are legitimate here; draft mode keeps their decode cheap.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" and the like, per file
        with _open(path, shorter_side) as image:
            _draft(image, shorter_side)
            image.load()
            image = _oriented(image)
            image = _to_rgb(image)
    if shorter_side is not None and min(image.size) > shorter_side:
        width, height = image.size
        scale = shorter_side / min(width, height)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return image


def _draft(image: Image.Image, shorter_side: int | None) -> None:
    """Let a JPEG decode straight at a reduced scale (1/2, 1/4, 1/8) still above shorter_side."""
    if shorter_side is not None and image.format == "JPEG":
        scale = shorter_side / min(image.size)
        if scale < 0.5:
            image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))


def _open(path: str, shorter_side: int | None) -> Image.Image:
    """Image.open, except that a JPEG over Pillow's decompression-bomb limit (a 20000 x 20000
    panorama) is still read when its draft decode stays under the limit; anything else that large
    is refused (DecompressionBombError: the file is skipped with a warning)."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        if shorter_side is None or _signature(path)[:3] != b"\xff\xd8\xff":
            raise
    image = JpegImagePlugin.JpegImageFile(path)
    _draft(image, shorter_side)
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise Image.DecompressionBombError(f"{width} x {height} pixels even at 1/8 scale exceeds Pillow's "
                                           f"limit of {Image.MAX_IMAGE_PIXELS} (Image.MAX_IMAGE_PIXELS)")
    return image


def _signature(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


# ISO base media brands of the HEIF family (iPhone photos) and of AVIF.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def why_unidentified(path: str) -> str | None:
    """A fix to name for a file Pillow cannot identify, when its first bytes say what it is."""
    try:
        head = _signature(path)
    except OSError:
        return None
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "a HEIC/HEIF photo, which Pillow cannot read: convert it to JPEG (e.g. heif-convert, or export from Photos)"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "an AVIF image this Pillow cannot read: pip install -U pillow (11.3+ reads AVIF), or convert it to JPEG"
    return None

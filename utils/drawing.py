"""What every picture shares: colours, the font, captions cut to their space, and how many classes
a picture or printed table shows at most."""

from __future__ import annotations

from PIL import ImageDraw, ImageFont

GREEN, RED, WHITE, BLACK, GRAY = (34, 139, 34), (220, 20, 20), (255, 255, 255), (0, 0, 0), (120, 120, 120)
# Pictures and printed tables show at most this many classes, so their size is bounded whatever
# the data set (at 1,000 classes a full confusion matrix would be 44,000 px on a side).
MAX_CLASSES_SHOWN = 30


def font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, text_font, keep: str = "") -> str:
    """text, cut in the middle with an ellipsis so that text + keep fits width pixels: both ends of
    a long species name stay (Black_foot...Albatross); keep, say a confidence, is never cut."""
    if draw.textlength(text + keep, font=text_font) <= width:
        return text + keep
    head, tail = text[:len(text) // 2], text[len(text) // 2:]
    while (head or tail) and draw.textlength(head + "\u2026" + tail + keep, font=text_font) > width:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return head + "\u2026" + tail + keep

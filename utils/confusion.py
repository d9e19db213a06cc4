"""The confusion matrix: counts, the most confused pairs, and its picture (whole up to 60 classes,
beyond that the weakest classes and an "other" column), drawn with PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .drawing import BLACK, GRAY, MAX_CLASSES_SHOWN, WHITE, fit_text, font


def confusion_counts(targets: list[int], predictions: list[int], num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets), np.asarray(predictions)), 1)
    return matrix


def worst_classes(matrix: np.ndarray, limit: int = MAX_CLASSES_SHOWN) -> list[int]:
    """Every class when there are at most limit; else the limit classes of lowest accuracy (the
    ones worth looking at), in their original order."""
    if len(matrix) <= limit:
        return list(range(len(matrix)))
    accuracy = np.diag(matrix) / matrix.sum(1).clip(min=1)
    return sorted(np.argsort(accuracy, kind="stable")[:limit].tolist())


FULL_MATRIX_UP_TO = 60  # classes: up to here the whole matrix, its cells shrunk to keep the picture < 2,000 px


def most_confused(matrix: np.ndarray, class_names: list[str], limit: int = 10) -> list[list]:
    """The limit largest off-diagonal counts as [true class, predicted class, count], largest first."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None, kind="stable")[::-1][:limit]
    return [[class_names[i], class_names[j], int(off[i, j])] for i, j in zip(*np.unravel_index(order, off.shape))
            if off[i, j] > 0]


def shown_in_matrix(matrix: np.ndarray) -> tuple[list[int], np.ndarray | None]:
    """The classes the confusion matrix picture shows, and (beyond FULL_MATRIX_UP_TO classes) each
    shown row's count of mistakes into the classes left out (None when every class is shown)."""
    if len(matrix) <= FULL_MATRIX_UP_TO:
        return list(range(len(matrix))), None
    shown = worst_classes(matrix)
    return shown, matrix[shown].sum(1) - matrix[np.ix_(shown, shown)].sum(1)


def confusion_matrix_picture(matrix: np.ndarray, class_names: list[str], path: Path, cell: int = 44) -> Image.Image:
    """Rows: true class, columns: predicted; shade = share of the row; right column: per-class
    accuracy. The whole matrix up to FULL_MATRIX_UP_TO classes (cells shrink, zeros left blank
    past 30); beyond, the MAX_CLASSES_SHOWN classes of lowest accuracy and an "other" column that
    counts their mistakes into the classes left out, as the picture's last line says (a row then
    still sums to its images). Names are cut in the middle to their space."""
    total = len(class_names)
    shown, other = shown_in_matrix(matrix)
    full = other is None
    row_totals = matrix.sum(1).clip(min=1)[shown]
    matrix, class_names = matrix[np.ix_(shown, shown)], [class_names[i] for i in shown]
    n = len(class_names)
    cell = max(22, min(cell, 1500 // max(n, 1)))
    columns = n + (0 if full else 1)
    draw_probe, small = ImageDraw.Draw(Image.new("RGB", (1, 1))), font(11)
    label_width = min(170, max(90, 8 + int(max(draw_probe.textlength(c, font=small) for c in class_names))))
    top = label_width
    width, height = label_width + (columns + 1) * cell + 10, top + n * cell + 30
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        for j in range(columns):
            count = matrix[i, j] if j < n else other[i]
            share = count / row_totals[i]
            shade = (int(255 - 200 * share), int(255 - 120 * share), 255) if i == j else \
                (255, int(255 - 180 * share), int(255 - 180 * share))
            x, y = label_width + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=shade, outline=GRAY)
            if count or n <= MAX_CLASSES_SHOWN:
                draw.text((x + cell // 2, y + cell // 2), str(count), fill=BLACK, font=small, anchor="mm")
        x = label_width + columns * cell + 4
        draw.text((x, top + i * cell + cell // 2), f"{matrix[i, i] / row_totals[i]:.0%}", fill=BLACK, font=small,
                  anchor="lm")
        draw.text((label_width - 4, top + i * cell + cell // 2), fit_text(draw, class_names[i], label_width - 8, small),
                  fill=BLACK, font=small, anchor="rm")
    for j, name in enumerate(class_names + ([] if full else ["other"])):  # column labels, written vertically
        label = Image.new("RGB", (label_width - 4, cell), WHITE)
        label_draw = ImageDraw.Draw(label)
        label_draw.text((2, cell // 2), fit_text(label_draw, name, label_width - 8, small), fill=BLACK, font=small,
                        anchor="lm")
        canvas.paste(label.rotate(90, expand=True), (label_width + j * cell, 2))
    draw.text((label_width + columns * cell + 2, top - 14), "acc", fill=BLACK, font=small)
    left_out = "" if full else (f"the {n} of {total} classes of lowest accuracy; 'other': their mistakes into the "
                                f"{total - n} left out; ")
    draw.text((4, height - 20), f"{left_out}rows: true class, columns: predicted", fill=GRAY, font=small)
    canvas.save(path)
    return canvas

"""The HPA 2021 single-cell submission: a CSV `ID,ImageWidth,ImageHeight,PredictionString`, read and written.

A PredictionString is space-separated `label confidence mask` triples, one per (cell, class): `label` an id of the
hpa2021 class set (0..18, 18 = Negative), `confidence` a number in [0, 1], `mask` the cell as a competition mask
string (`cells/rle.py`), decoding to ImageHeight x ImageWidth. A cell predicted with several classes repeats its
mask. An empty PredictionString is an image without predictions. Ground truth is the same format with confidence 1.

Every bad row is one `DataError` line naming the file, the row (its line number, the header being line 1) and the
image; a mask string is checked once per image however many triples repeat it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpa_lightning.cells.rle import rle_of
from hpa_lightning.classes import class_set
from hpa_lightning.errors import DataError
from hpa_lightning.files import write_text_atomic

COLUMNS: tuple[str, ...] = ("ID", "ImageWidth", "ImageHeight", "PredictionString")
CELL_CLASSES = "hpa2021"


@dataclass(frozen=True)
class CellPrediction:
    """One triple of a PredictionString: a class id, its confidence, the cell's mask string."""

    label: int
    confidence: float
    mask: str


@dataclass(frozen=True)
class ImageCells:
    """One row: an image's size and its triples, in the order of the file."""

    id: str
    width: int
    height: int
    cells: tuple[CellPrediction, ...]


def format_prediction_string(cells: Iterable[CellPrediction]) -> str:
    """`label confidence mask ...`; the confidence with repr's shortest exact digits, so it reads back unchanged."""
    return " ".join(f"{cell.label} {cell.confidence!r} {cell.mask}" for cell in cells)


def parse_prediction_string(text: str, height: int, width: int, num_classes: int) -> tuple[CellPrediction, ...]:
    """The triples of a PredictionString for an image of `height` x `width`; `DataError` (without the location, which
    the caller adds) for a token count that is not a multiple of 3, a label outside 0..num_classes-1, a confidence
    that is not a number in [0, 1], or a mask that does not decode to height x width."""
    tokens = text.split()
    if len(tokens) % 3:
        raise DataError(f"PredictionString has {len(tokens)} tokens, not a multiple of 3 (label confidence mask)")
    checked: set[str] = set()
    cells = []
    for start in range(0, len(tokens), 3):
        label, confidence, mask = tokens[start:start + 3]
        where = f"triple {start // 3 + 1}"
        if not (label.isascii() and label.isdigit() and int(label) < num_classes):
            raise DataError(f"{where}: label {label!r} is not a class id 0..{num_classes - 1} of {CELL_CLASSES}")
        try:
            score = float(confidence)
        except ValueError:
            score = math.nan
        if not 0.0 <= score <= 1.0:  # NaN fails too
            raise DataError(f"{where}: confidence {confidence!r} is not a number in [0, 1]")
        if mask not in checked:
            try:
                rle_of(mask, height, width)
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            checked.add(mask)
        cells.append(CellPrediction(int(label), score, mask))
    return tuple(cells)


def _size(row: dict[str, str], key: str, where: str) -> int:
    raw = (row.get(key) or "").strip()
    if not (raw.isascii() and raw.isdigit() and int(raw) > 0):
        raise DataError(f"{where}: {key} {raw!r} is not a positive whole number of pixels")
    return int(raw)


def read_submission(path: str | Path, *, truth: bool = False) -> dict[str, ImageCells]:
    """Every row of a submission CSV by ID, in file order; `truth=True` also requires every confidence to be 1.
    `DataError` naming the file and row for a missing column, a repeated or empty ID, a bad size or triple."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not readable as a UTF-8 CSV ({err.__class__.__name__})") from None
    reader = csv.DictReader(text.lstrip("\ufeff").splitlines())
    missing = [column for column in COLUMNS if column not in (reader.fieldnames or ())]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    num_classes = len(class_set(CELL_CLASSES))
    images: dict[str, ImageCells] = {}
    rows: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        image_id = (row.get("ID") or "").strip()
        where = f"{path} row {line}" + (f" (ID {image_id})" if image_id else "")
        if not image_id:
            raise DataError(f"{where}: empty ID")
        if image_id in images:
            raise DataError(f"{where}: ID {image_id} repeats row {rows[image_id]}")
        width, height = _size(row, "ImageWidth", where), _size(row, "ImageHeight", where)
        try:
            cells = parse_prediction_string(row.get("PredictionString") or "", height, width, num_classes)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        if truth and any(cell.confidence != 1.0 for cell in cells):
            raise DataError(f"{where}: ground truth has confidence 1 in every triple")
        images[image_id] = ImageCells(image_id, width, height, cells)
        rows[image_id] = line
    return images


def submission_text(images: Sequence[ImageCells]) -> str:
    """The CSV of `images`; csv quoting keeps an ID with a comma one field, as the reader reads it."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows((image.id, image.width, image.height, format_prediction_string(image.cells)) for image in images)
    return text.getvalue()


def write_submission(path: str | Path, images: Sequence[ImageCells]) -> None:
    """The CSV of `images`, written whole (a temporary sibling renamed when complete)."""
    write_text_atomic(Path(path), submission_text(images))

"""Per-cell class probabilities of an image, turned into its submission row and its `cells.csv` rows.

Every way of scoring cells (class activation mass, a cell model on crops, their blend: `inference/cell_scoring.py`;
the test split of a `data=hpa2021_cells` run) ends here, so all of them write the same files.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpa_lightning.cells.crops import CellBox
from hpa_lightning.cells.rle import encode_mask
from hpa_lightning.cells.submission import CellPrediction, ImageCells
from hpa_lightning.files import write_text_atomic

CELLS_CSV_COLUMNS: tuple[str, ...] = ("ID", "cell_id", "y0", "x0", "y1", "x1", "area")
NEGATIVE = "Negative"


@dataclass(frozen=True)
class ScoredCells:
    """One image's cells (label image and boxes) and their class probabilities, (cells, classes) in box order."""

    image_id: str
    labels: np.ndarray
    boxes: tuple[CellBox, ...]
    probabilities: np.ndarray

    def __post_init__(self) -> None:
        if self.probabilities.shape[0] != len(self.boxes):
            raise ValueError(f"{self.image_id}: {len(self.boxes)} cells but {self.probabilities.shape[0]} rows of "
                             f"probabilities")


def with_negative(scores: np.ndarray, class_names: list[str]) -> np.ndarray:
    """A cell's Negative probability raised to 1 minus its highest other probability (classes without Negative: as
    they are). Image-level labels call an image Negative only when all its cells are, so a model trained on them
    ranks the negative cells of a positive image low; every cell score (not the image-label baseline) goes through
    this, in prediction and in a cell model's test split alike."""
    if NEGATIVE not in class_names:
        return scores
    k = class_names.index(NEGATIVE)
    others = np.delete(scores, k, axis=1)
    out = scores.copy()
    out[:, k] = np.maximum(scores[:, k], 1.0 - others.max(axis=1, initial=0.0))
    return out


def submission_row(scored: ScoredCells, min_confidence: float = 0.0) -> ImageCells:
    """The image's submission row: for every cell, one triple per class whose probability is >= `min_confidence`
    (Negative included), its mask the cell's pixels at the image's own size. Each cell's mask is encoded once."""
    height, width = scored.labels.shape
    triples: list[CellPrediction] = []
    for box, probs in zip(scored.boxes, scored.probabilities, strict=True):
        keep = np.flatnonzero(probs >= min_confidence)
        if keep.size == 0:
            continue
        mask = encode_mask(scored.labels == box.cell_id)
        triples.extend(CellPrediction(int(k), float(np.clip(probs[k], 0.0, 1.0)), mask) for k in keep)
    return ImageCells(scored.image_id, width, height, tuple(triples))


def cells_table(images: Sequence[ScoredCells], class_names: Sequence[str]) -> str:
    """`cells.csv`: one row per cell: ID, cell id, bounding box (rows y0:y1, columns x0:x1), area, one probability
    column per class name."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow((*CELLS_CSV_COLUMNS, *class_names))
    for scored in images:
        for box, probs in zip(scored.boxes, scored.probabilities, strict=True):
            writer.writerow((scored.image_id, box.cell_id, box.y0, box.x0, box.y1, box.x1, box.area,
                             *(f"{float(p):.6g}" for p in probs)))
    return text.getvalue()


def write_cells_csv(path: Path, images: Sequence[ScoredCells], class_names: Sequence[str]) -> None:
    write_text_atomic(Path(path), cells_table(images, class_names))

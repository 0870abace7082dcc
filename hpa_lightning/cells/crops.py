"""One cell of an image as a model input: its bounding box, the pixels outside the cell zeroed, padded to a square
around the cell's centre, resized to the model's side. Training (`data=hpa2021_cells`) and prediction
(`cell_score=crop`) both crop here, so a cell model sees at prediction what it saw in training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

# The crop rule's name: stores of cell crops are keyed by it (data/cell_store.py), so changing what crop_cell does
# (the box, the zeroing, the padding, the resize filter) must change this name, and old stores are packed anew.
CROP_RULE = "box-outside0-padsquare-bilinear-rg3"


@dataclass(frozen=True)
class CellBox:
    """A cell's id in its label image and its bounding box (rows y0:y1, columns x0:x1), its area in pixels."""

    cell_id: int
    y0: int
    x0: int
    y1: int
    x1: int
    area: int


def cell_boxes(labels: np.ndarray) -> list[CellBox]:
    """Every cell of an int (H, W) label image, by ascending id."""
    labels = np.asarray(labels)
    boxes = []
    areas = np.bincount(labels.ravel()) if labels.size else np.zeros(1, dtype=np.int64)
    for index, found in enumerate(ndimage.find_objects(labels)):
        if found is None:
            continue
        rows, cols = found
        boxes.append(CellBox(index + 1, rows.start, cols.start, rows.stop, cols.stop, int(areas[index + 1])))
    return boxes


def _resize(plane: np.ndarray, size: int) -> np.ndarray:
    if plane.shape == (size, size):
        return plane
    # reducing_gap: a large cell shrunk to the model's side averages like an area filter, at bilinear cost
    img = Image.fromarray(plane).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def crop_cell(image: np.ndarray, labels: np.ndarray, box: CellBox, size: int) -> np.ndarray:
    """The uint8 (C, size, size) crop of one cell of a uint8 (C, H, W) image whose label image is `labels`."""
    if image.shape[1:] != labels.shape:
        raise ValueError(f"image {image.shape[1:]} and mask {labels.shape} differ in size")
    window = image[:, box.y0:box.y1, box.x0:box.x1] * (labels[box.y0:box.y1, box.x0:box.x1] == box.cell_id)
    height, width = window.shape[1:]
    side = max(height, width)
    square = np.zeros((image.shape[0], side, side), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[:, top:top + height, left:left + width] = window
    return np.stack([_resize(plane, size) for plane in square])

"""The HPA 2021 cell-level metric: mean over classes of the average precision of cell masks at IoU >= 0.6.

OpenImages instance-segmentation style (tensorflow/models object_detection: `utils/object_detection_evaluation.py`,
`utils/per_image_evaluation.py`, `utils/metrics.py`), without its group-of and image-level-label parts (HPA truth
has neither; every class is evaluated in every image):

- Per class, the detections (PredictionString triples of that label) over the whole set are ranked by confidence,
  highest first; equal confidences keep the prediction file's order (rows, then triples within a row), a stable
  sort, where the reference's `np.argsort` leaves ties in no documented order.
- In that order, a detection is a true positive if some truth instance of its class in the same image that no earlier
  detection claimed has mask IoU >= `iou` with it: it claims the one with the highest IoU (the first in the truth
  file among equals). Otherwise it is a false positive. With non-overlapping truth cells and `iou` > 0.5 a detection
  can reach the threshold with one truth cell at most, so this and the reference's rule (the truth of highest IoU,
  claimed or not) agree.
- AP as the reference computes it: precision and recall after each ranked detection (recall over the class's truth
  instances), precision made monotone from the right, AP = sum over the points where recall changes of the recall
  step times the precision there. A class with truth and no detections scores 0; a class without truth has no AP and
  is left out of the mean.

Masks stay RLE: the IoU of every (predicted mask, truth mask) pair of an image comes from `pycocotools.mask.iou` on
the distinct masks (a cell predicted with several classes repeats its mask string), checked to cover the image when
the files were read; nothing is decoded to pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as coco_mask

from hpa_lightning.cells.rle import mask_counts
from hpa_lightning.cells.submission import ImageCells
from hpa_lightning.errors import DataError

DEFAULT_IOU = 0.6


@dataclass
class ClassTally:
    """One class over the whole set: its truth instances and its detections' (confidence, true positive) in rank
    order once `ranked` is called."""

    truth: int = 0
    detections: list[tuple[float, int, bool]] = field(default_factory=list)  # (confidence, file order, tp)

    def ranked(self) -> tuple[np.ndarray, np.ndarray]:
        order = sorted(self.detections, key=lambda item: (-item[0], item[1]))
        return (np.array([item[0] for item in order], dtype=float),
                np.array([item[2] for item in order], dtype=bool))


def average_precision(tp_ranked: np.ndarray, num_truth: int) -> float:
    """The AP of detections already ranked best first (True = true positive) against `num_truth` instances,
    as the reference's `compute_precision_recall` + `compute_average_precision`."""
    if num_truth <= 0:
        raise ValueError("average precision needs at least one truth instance")
    hits = np.cumsum(tp_ranked, dtype=float)
    precision = hits / np.arange(1, len(tp_ranked) + 1)
    recall = hits / num_truth
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone: the best precision at this recall or beyond
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def pairwise_iou(pred_masks: Sequence[str], truth_masks: Sequence[str], height: int, width: int) -> np.ndarray:
    """IoU of every (predicted, truth) pair of an image's mask strings, shape (len(pred), len(truth))."""
    if not pred_masks or not truth_masks:
        return np.zeros((len(pred_masks), len(truth_masks)))
    rles = [{"size": [height, width], "counts": mask_counts(text, height * width)}
            for text in (*pred_masks, *truth_masks)]
    ious = coco_mask.iou(rles[:len(pred_masks)], rles[len(pred_masks):], [0] * len(truth_masks))
    return np.asarray(ious, dtype=float).reshape(len(pred_masks), len(truth_masks))


def _match_image(pred: ImageCells, truth: ImageCells, iou: float, tallies: list[ClassTally], first: int) -> None:
    """Add one image's truth counts and scored detections to `tallies`; `first` is the file order of its first
    triple."""
    pred_masks = list(dict.fromkeys(cell.mask for cell in pred.cells))
    truth_masks = list(dict.fromkeys(cell.mask for cell in truth.cells))
    ious = pairwise_iou(pred_masks, truth_masks, truth.height, truth.width)
    pred_row = {mask: row for row, mask in enumerate(pred_masks)}
    truth_column = {mask: column for column, mask in enumerate(truth_masks)}
    truth_by_class: dict[int, list[int]] = {}
    for cell in truth.cells:
        truth_by_class.setdefault(cell.label, []).append(truth_column[cell.mask])
        tallies[cell.label].truth += 1
    columns = {label: np.array(found) for label, found in truth_by_class.items()}
    claimed = {label: np.zeros(len(found), dtype=bool) for label, found in truth_by_class.items()}
    ranked = sorted(range(len(pred.cells)), key=lambda k: -pred.cells[k].confidence)  # stable: file order in ties
    for k in ranked:
        cell = pred.cells[k]
        hit = False
        if cell.label in columns:
            overlaps = np.where(claimed[cell.label], -1.0, ious[pred_row[cell.mask], columns[cell.label]])
            best = int(np.argmax(overlaps))  # the first in truth order among equals
            hit = bool(overlaps[best] >= iou)
            claimed[cell.label][best] |= hit
        tallies[cell.label].detections.append((cell.confidence, first + k, hit))


def check_same_images(pred: Mapping[str, ImageCells], truth: Mapping[str, ImageCells], pred_name: str = "pred",
                      truth_name: str = "truth") -> None:
    """`DataError` naming the first ID in one set and not the other, or one whose image size differs."""
    for image_id in pred:
        if image_id not in truth:
            raise DataError(f"{pred_name}: ID {image_id} is not in {truth_name}")
    for image_id, image in truth.items():
        if image_id not in pred:
            raise DataError(f"{truth_name}: ID {image_id} is not in {pred_name}")
        other = pred[image_id]
        if (other.width, other.height) != (image.width, image.height):
            raise DataError(f"{pred_name}: ID {image_id} is {other.width}x{other.height} (ImageWidth x ImageHeight), "
                            f"{image.width}x{image.height} in {truth_name}")


def cell_map(pred: Mapping[str, ImageCells], truth: Mapping[str, ImageCells], num_classes: int,
             iou: float = DEFAULT_IOU) -> dict[str, object]:
    """The metric over a prediction and a truth set of the same images (`check_same_images` first).

    Returns {"map": mean AP over the classes with truth (None if none has), "ap": per class id its AP or None,
    "truth": truth instances per class, "detections": per class, "true_positives": per class}."""
    check_same_images(pred, truth)
    tallies = [ClassTally() for _ in range(num_classes)]
    first = 0
    for image_id, image in pred.items():
        _match_image(image, truth[image_id], iou, tallies, first)
        first += len(image.cells)
    ap: list[float | None] = []
    true_positives = []
    for tally in tallies:
        _, tp = tally.ranked()
        ap.append(average_precision(tp, tally.truth) if tally.truth else None)
        true_positives.append(int(tp.sum()))
    scored = [value for value in ap if value is not None]
    return {"map": float(np.mean(scored)) if scored else None, "ap": ap, "truth": [t.truth for t in tallies],
            "detections": [len(t.detections) for t in tallies], "true_positives": true_positives}


def cell_metrics(pred: Mapping[str, ImageCells], truth: Mapping[str, ImageCells], iou: float = DEFAULT_IOU,
                 pred_name: str = "pred", truth_name: str = "truth") -> dict[str, object]:
    """`cell_metrics.json` (written by `evaluate_cells` and by a `data=hpa2021_cells` run): the mAP, `iou`, the class
    set, per class its name, AP (None without truth), truth instances, detections and true positives, the counts of
    images, cells (distinct masks) and triples, and the two files' names. `check_same_images` first."""
    from hpa_lightning.cells.submission import CELL_CLASSES
    from hpa_lightning.classes import class_set

    check_same_images(pred, truth, pred_name, truth_name)
    names = class_set(CELL_CLASSES).names
    scores = cell_map(pred, truth, num_classes=len(names), iou=iou)
    return {
        "map": scores["map"],
        "iou": iou,
        "classes": CELL_CLASSES,
        "per_class": [{"id": label, "name": name, "ap": scores["ap"][label], "truth": scores["truth"][label],
                       "detections": scores["detections"][label], "true_positives": scores["true_positives"][label]}
                      for label, name in enumerate(names)],
        "counts": {"images": len(truth),
                   "truth_cells": sum(len({cell.mask for cell in image.cells}) for image in truth.values()),
                   "truth_instances": sum(len(image.cells) for image in truth.values()),
                   "predicted_cells": sum(len({cell.mask for cell in image.cells}) for image in pred.values()),
                   "detections": sum(len(image.cells) for image in pred.values())},
        "pred": pred_name,
        "truth": truth_name,
    }

"""The cell-level mAP on hand-built cases, and against a brute-force implementation written here on 50 random sets.

The brute force shares nothing with hpa_lightning.cells.average_precision: plain loops, IoU by counting pixels of
decoded masks, the matching and the AP written again from the reference (tensorflow/models object_detection
`utils/metrics.py` compute_precision_recall / compute_average_precision, per_image_evaluation's matching).
"""

from __future__ import annotations

import numpy as np
import pytest

from hpa_lightning.cells.average_precision import average_precision, cell_map, pairwise_iou
from hpa_lightning.cells.rle import decode_mask, encode_mask
from hpa_lightning.cells.submission import CellPrediction, ImageCells
from hpa_lightning.errors import DataError

CLASSES = 19


def image(image_id: str, shape: tuple[int, int], cells: list[tuple[int, float, np.ndarray]]) -> ImageCells:
    return ImageCells(image_id, shape[1], shape[0], tuple(CellPrediction(label, confidence, encode_mask(mask))
                                                          for label, confidence, mask in cells))


def flat_mask(shape: tuple[int, int], start: int, stop: int) -> np.ndarray:
    mask = np.zeros(shape[0] * shape[1], bool)
    mask[start:stop] = True
    return mask.reshape(shape)


SHAPE = (10, 20)
CELL = flat_mask(SHAPE, 0, 100)
OTHER = flat_mask(SHAPE, 150, 200)


def test_a_perfect_prediction_scores_1() -> None:
    truth = {"a": image("a", SHAPE, [(0, 1.0, CELL), (3, 1.0, CELL), (3, 1.0, OTHER)])}
    pred = {"a": image("a", SHAPE, [(3, 0.4, OTHER), (0, 0.9, CELL), (3, 0.2, CELL)])}
    result = cell_map(pred, truth, CLASSES)
    assert result["map"] == 1.0 and result["ap"][0] == result["ap"][3] == 1.0
    assert result["truth"][3] == 2 and result["true_positives"][3] == 2


@pytest.mark.parametrize(("stop", "expected_iou", "ap"), [(59, 0.59, 0.0), (61, 0.61, 1.0), (60, 0.6, 1.0)])
def test_iou_below_the_threshold_is_a_miss_and_at_or_above_a_hit(stop: int, expected_iou: float, ap: float) -> None:
    pred_mask = flat_mask(SHAPE, 0, stop)  # inside the 100-pixel truth cell: IoU = stop / 100
    assert pairwise_iou([encode_mask(pred_mask)], [encode_mask(CELL)], *SHAPE)[0, 0] == expected_iou
    result = cell_map({"a": image("a", SHAPE, [(5, 0.8, pred_mask)])}, {"a": image("a", SHAPE, [(5, 1.0, CELL)])},
                      CLASSES)
    assert result["ap"][5] == ap and result["map"] == ap


def test_a_higher_scored_false_positive_before_the_only_true_positive_gives_half() -> None:
    pred = {"a": image("a", SHAPE, [(2, 0.3, CELL), (2, 0.9, OTHER)])}
    result = cell_map(pred, {"a": image("a", SHAPE, [(2, 1.0, CELL)])}, CLASSES)
    assert result["ap"][2] == 0.5 and result["map"] == 0.5


def test_classes_without_truth_are_left_out_and_classes_without_detections_score_0() -> None:
    truth = {"a": image("a", SHAPE, [(0, 1.0, CELL)]), "b": image("b", SHAPE, [(1, 1.0, OTHER)])}
    pred = {"a": image("a", SHAPE, [(0, 0.9, CELL), (7, 0.9, OTHER)]), "b": image("b", SHAPE, [])}
    result = cell_map(pred, truth, CLASSES)
    assert result["ap"][7] is None and result["detections"][7] == 1  # detections, no truth: no AP
    assert result["ap"][1] == 0.0 and result["map"] == 0.5  # (1 + 0) / 2


def test_each_truth_cell_is_claimed_once_and_a_duplicate_is_a_false_positive() -> None:
    pred = {"a": image("a", SHAPE, [(4, 0.9, CELL), (4, 0.8, CELL)])}
    result = cell_map(pred, {"a": image("a", SHAPE, [(4, 1.0, CELL)])}, CLASSES)
    assert result["ap"][4] == 1.0 and result["true_positives"][4] == 1  # the FP comes after recall reached 1


def test_images_must_match() -> None:
    with pytest.raises(DataError, match="ID b is not in truth"):
        cell_map({"a": image("a", SHAPE, []), "b": image("b", SHAPE, [])}, {"a": image("a", SHAPE, [])}, CLASSES)


def test_average_precision_as_the_reference_computes_it() -> None:
    # ranks: TP FP TP FP, 3 truth: precision 1, .5, 2/3, .5; recall 1/3, 1/3, 2/3, 2/3; monotone: 1, 2/3, 2/3, .5
    assert average_precision(np.array([True, False, True, False]), 3) == pytest.approx(1 / 3 + (1 / 3) * (2 / 3))
    assert average_precision(np.array([], dtype=bool), 2) == 0.0


# ---- the brute force --------------------------------------------------------------------------------------------

def brute_iou(a: list[list[bool]], b: list[list[bool]]) -> float:
    inter = union = 0
    for row_a, row_b in zip(a, b, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            inter += x and y
            union += x or y
    return inter / union if union else 0.0


def brute_ap(flags: list[bool], num_truth: int) -> float:
    precision, recall, hits = [], [], 0
    for rank, flag in enumerate(flags, start=1):
        hits += flag
        precision.append(hits / rank)
        recall.append(hits / num_truth)
    recall = [0.0] + recall + [1.0]
    precision = [0.0] + precision + [0.0]
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    return sum((recall[i] - recall[i - 1]) * precision[i] for i in range(1, len(recall)) if recall[i] != recall[i - 1])


def brute_map(pred: dict[str, ImageCells], truth: dict[str, ImageCells], iou: float) -> tuple[float, list]:
    masks = {}
    for images in (pred, truth):
        for item in images.values():
            for cell in item.cells:
                masks[cell.mask] = decode_mask(cell.mask, item.height, item.width).tolist()
    aps = []
    for label in range(CLASSES):
        truth_cells = {image_id: [c.mask for c in item.cells if c.label == label] for image_id, item in truth.items()}
        num_truth = sum(len(found) for found in truth_cells.values())
        detections = []  # (confidence, file position, image, mask)
        position = 0
        for image_id, item in pred.items():
            for cell in item.cells:
                if cell.label == label:
                    detections.append((cell.confidence, position, image_id, cell.mask))
                position += 1
        detections.sort(key=lambda d: (-d[0], d[1]))
        claimed = {image_id: [False] * len(found) for image_id, found in truth_cells.items()}
        flags = []
        for _, _, image_id, mask in detections:
            best, best_iou = None, -1.0
            for index, truth_mask in enumerate(truth_cells[image_id]):
                overlap = brute_iou(masks[mask], masks[truth_mask])
                if not claimed[image_id][index] and overlap >= iou and overlap > best_iou:
                    best, best_iou = index, overlap
            if best is not None:
                claimed[image_id][best] = True
            flags.append(best is not None)
        aps.append(brute_ap(flags, num_truth) if num_truth else None)
    scored = [ap for ap in aps if ap is not None]
    return (sum(scored) / len(scored) if scored else None), aps


def random_set(rng: np.random.Generator) -> tuple[dict[str, ImageCells], dict[str, ImageCells]]:
    """1-3 images of random cells (disjoint, or overlapping in some sets), each with 1-3 of 4 classes; predictions
    are the cells grown or shrunk, shifted, missed, duplicated, or random, with confidences that tie often."""
    labels = rng.choice(CLASSES, size=4, replace=False).tolist()
    overlapping = rng.random() < 0.3
    pred, truth = {}, {}
    for n in range(int(rng.integers(1, 4))):
        shape = (int(rng.integers(6, 13)), int(rng.integers(6, 13)))
        cells = []
        taken = np.zeros(shape, bool)
        for _ in range(int(rng.integers(1, 6))):
            y, x = int(rng.integers(0, shape[0] - 1)), int(rng.integers(0, shape[1] - 1))
            mask = np.zeros(shape, bool)
            mask[y:y + int(rng.integers(1, 6)), x:x + int(rng.integers(1, 6))] = True
            if not overlapping:
                mask &= ~taken
            if mask.any():
                taken |= mask
                cells.append(mask)
        truth_cells = [(label, 1.0, mask) for mask in cells
                       for label in rng.choice(labels, size=int(rng.integers(1, 4)), replace=False).tolist()]
        pred_cells = []
        for mask in cells + [rng.random(shape) < 0.2 for _ in range(2)]:
            for _ in range(int(rng.integers(0, 3))):
                guess = mask.copy()
                change = rng.integers(0, 4)
                if change == 1:
                    guess ^= rng.random(shape) < 0.1
                elif change == 2:
                    guess = np.roll(guess, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 2)))
                elif change == 3:
                    guess[:, int(rng.integers(0, shape[1]))] = True
                pred_cells.append((int(rng.choice(labels)), float(rng.choice([0.1, 0.25, 0.5, 0.9, 1.0])), guess))
        order = rng.permutation(len(pred_cells))
        truth[f"img{n}"] = image(f"img{n}", shape, truth_cells)
        pred[f"img{n}"] = image(f"img{n}", shape, [pred_cells[k] for k in order])
    return pred, truth


@pytest.mark.parametrize("seed", range(50))
def test_agrees_with_the_brute_force(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    pred, truth = random_set(rng)
    iou = [0.6, 0.6, 0.5, 0.3][seed % 4]
    expected_map, expected_aps = brute_map(pred, truth, iou)
    result = cell_map(pred, truth, CLASSES, iou=iou)
    for got, want in zip(result["ap"], expected_aps, strict=True):
        assert (got is None) == (want is None) and (got is None or abs(got - want) < 1e-9), (result["ap"], expected_aps)
    assert (result["map"] is None) == (expected_map is None)
    if expected_map is not None:
        assert abs(result["map"] - expected_map) < 1e-9

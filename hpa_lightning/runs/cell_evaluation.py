"""A cell model's test split as HPA 2021 cells (`data=hpa2021_cells`), written into its run folder.

- `test_cells.csv`: one row per test cell (image id, cell id, box, area, the model's probability per class), through
  `cells.scores.write_cells_csv` like every other way of scoring cells.
- With `data.cell_truth`: `test_cell_submission.csv`, each test image's submission row (`cells.scores.submission_row`:
  every cell, one triple per class, its mask read from `data.cells` at the image's own size), and `cell_metrics.json`,
  that file scored against the truth file's rows of the test images (truth images outside the test split are left
  out) by the code of `python -m hpa_lightning.evaluate_cells` (`cells.average_precision.cell_metrics`), so running
  that command on the two gives the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hpa_lightning.cells.average_precision import DEFAULT_IOU, cell_metrics
from hpa_lightning.cells.crops import CellBox
from hpa_lightning.cells.masks import load_cell_mask
from hpa_lightning.cells.scores import ScoredCells, submission_row, with_negative, write_cells_csv
from hpa_lightning.cells.submission import read_submission, write_submission
from hpa_lightning.data.cell_store import CellDataModule
from hpa_lightning.errors import DataError
from hpa_lightning.files import write_json_atomic
from hpa_lightning.runs import layout

NO_LABELS = np.zeros((0, 0), dtype=np.int32)  # test_cells.csv needs the boxes only: no image's mask is kept in memory


def group_test_cells(cells: pd.DataFrame, probs: np.ndarray) -> list[tuple[ScoredCells, tuple[int, int]]]:
    """The test cells grouped by image (in order of first appearance, cells by id) with (height, width) of each image;
    `cells` is `CellDataModule.cells_of` of the rows whose probabilities `probs` holds."""
    images = []
    for image_id, group in cells.groupby("image_id", sort=False):
        group = group.sort_values("cell_id", kind="stable")
        boxes = tuple(CellBox(int(r.cell_id), int(r.y0), int(r.x0), int(r.y1), int(r.x1), int(r.area))
                      for r in group.itertuples())
        size = (int(group["image_height"].iloc[0]), int(group["image_width"].iloc[0]))
        images.append((ScoredCells(str(image_id), NO_LABELS, boxes, probs[group.index.to_numpy()]), size))
    return images


def write_test_cells(run_dir: Path, datamodule: CellDataModule, test: dict[str, np.ndarray],
                     iou: float = DEFAULT_IOU, min_confidence: float = 0.0) -> dict:
    """Write the files above for the test stage's outputs `test` (`rows`, `probs`); returns results.json's `cells`
    entry, with `cell_map` and `cell_ap_per_class` when the truth file scored them."""
    # the cell scores `predict cell_score=crop` gives (Negative raised where no class is found)
    scores = with_negative(np.asarray(test["probs"], dtype=np.float64), list(datamodule.class_names))
    images = group_test_cells(datamodule.cells_of(test["rows"]), scores)
    write_cells_csv(run_dir / layout.TEST_CELLS, [scored for scored, _ in images], datamodule.class_names)
    truth_name = str(datamodule.cell_truth) if datamodule.cell_truth else None
    entry: dict = {"masks": str(datamodule.cells), "truth": truth_name, **datamodule.cells_summary(),
                   "test_images": len(images),
                   "test_cells": sum(len(scored.boxes) for scored, _ in images),
                   "files": [layout.TEST_CELLS]}
    if datamodule.cell_truth is None:
        return entry
    rows = []
    for scored, (height, width) in images:
        labels = load_cell_mask(datamodule.cells, scored.image_id, height, width)
        rows.append(submission_row(ScoredCells(scored.image_id, labels, scored.boxes, scored.probabilities),
                                   min_confidence))
    submission = run_dir / layout.TEST_CELL_SUBMISSION
    write_submission(submission, rows)
    truth = read_submission(datamodule.cell_truth, truth=True)
    missing = [row.id for row in rows if row.id not in truth]
    if missing:
        raise DataError(f"{datamodule.cell_truth}: no row for test image {missing[0]} ({len(missing)} of {len(rows)})")
    record = cell_metrics(read_submission(submission), {row.id: truth[row.id] for row in rows}, iou,
                          str(submission), str(datamodule.cell_truth))
    write_json_atomic(run_dir / layout.CELL_METRICS, record)
    per_class = record["per_class"]
    return {**entry, "iou": iou, "min_confidence": min_confidence, "cell_map": record["map"],
            "cell_ap_per_class": [c["ap"] for c in per_class],  # type: ignore[union-attr]
            "files": [layout.TEST_CELLS, layout.TEST_CELL_SUBMISSION, layout.CELL_METRICS]}

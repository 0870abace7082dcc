"""The names of the files in a run folder: one place for each (conf/callbacks/default.yaml names the checkpoints).

    <run>/results.json          written last: its presence marks a finished run
    <run>/attempts.json         every attempt at the run (first start, resumes, requeues)
    <run>/status.json, FAILED   the job's status markers (hpa_lightning.rerun_failed)
    <run>/thresholds.json       per-class decision thresholds tuned on val
    <run>/test_predictions.csv  test probabilities, truth and decisions
    <run>/config.yaml           the resolved configuration; split.csv the split it used
    <run>/metrics.csv, lr_trace.csv, lr_find.json
    <run>/checkpoints/best.ckpt, last.ckpt
    <run>/test_cells.csv, test_cell_submission.csv, cell_metrics.json   a cell model's test cells (data=hpa2021_cells)
"""

from __future__ import annotations

from pathlib import Path

RESULTS = "results.json"
ATTEMPTS = "attempts.json"
STATUS = "status.json"
FAILED = "FAILED"
THRESHOLDS = "thresholds.json"
TEST_PREDICTIONS = "test_predictions.csv"
VAL_PREDICTIONS = "val_predictions.csv"  # what thresholds were tuned on; fold ensembles tune on these
CONFIG = "config.yaml"
SPLIT = "split.csv"
METRICS = "metrics.csv"
LR_TRACE = "lr_trace.csv"
LR_FIND = "lr_find.json"
TEST_CELLS = "test_cells.csv"  # per cell of the test split: image, cell id, box, area, class probabilities
TEST_CELL_SUBMISSION = "test_cell_submission.csv"  # the same cells as HPA 2021 submission rows (with data.cell_truth)
CELL_METRICS = "cell_metrics.json"  # their cell-level mAP against data.cell_truth, evaluate_cells' schema
CHECKPOINTS = "checkpoints"
BEST_CHECKPOINT = "best.ckpt"
LAST_CHECKPOINT = "last.ckpt"


def checkpoint(run_dir: str | Path, name: str = LAST_CHECKPOINT) -> Path:
    return Path(run_dir) / CHECKPOINTS / name

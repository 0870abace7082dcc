"""Paired bootstrap of the poster's comparisons over one `make reproduce` run's test predictions.

    .venv/bin/python docs/results/compare.py outputs/reproduce/<time>     # prints a markdown table

For each comparison (A vs B), the test images are resampled with replacement 2000 times (seed 0) and both runs'
macro F1 (threshold 0.5, and with each run's tuned thresholds from its thresholds.json) and macro ROC AUC are
computed on the same resample; the table gives the difference A - B on the full test split and its 95 % percentile
interval. A finding "holds" here when the interval excludes 0 in the poster's direction.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from hpa_lightning.metrics import macro_f1, roc_auc_valid_classes

COMPARISONS = [
    ("focal gamma 0.2 vs BCE, no SGDR", "poster/*_focal_g02", "poster/*_bce"),
    ("BCE: SGDR vs constant LR", "poster/*_bce_sgdr", "poster/*_bce"),
    ("focal 0.2: SGDR vs constant LR", "poster/*_focal_g02_sgdr", "poster/*_focal_g02"),
    ("with SGDR: focal 0.2 vs BCE", "poster/*_focal_g02_sgdr", "poster/*_bce_sgdr"),
    ("baselines: logistic regression vs random forest", "baselines/logreg", "baselines/random_forest"),
    ("deep (focal 0.2, constant LR) vs logistic regression", "poster/*_focal_g02", "baselines/logreg"),
    ("deep (focal 0.2, constant LR) vs random forest", "poster/*_focal_g02", "baselines/random_forest"),
]


def load(work: Path, pattern: str) -> tuple[pd.DataFrame, np.ndarray]:
    [run] = [p for p in work.glob(pattern) if (p / "results.json").is_file()]
    frame = pd.read_csv(run / "test_predictions.csv", dtype={"Id": str}).sort_values("Id").reset_index(drop=True)
    table = json.loads((run / "thresholds.json").read_text())["thresholds"]
    return frame, np.array(list(table.values()))


def scores(frame: pd.DataFrame, thresholds: np.ndarray, rows: np.ndarray) -> tuple[float, float, float]:
    probs = frame[[f"prob_{c}" for c in range(28)]].to_numpy()[rows]
    truth = frame[[f"true_{c}" for c in range(28)]].to_numpy()[rows]
    # the project's metrics, held to sklearn's f1_score / roc_auc_score by tests/test_metrics.py, and much faster
    f1 = macro_f1(truth, (probs >= 0.5).astype(np.uint8))
    tuned = macro_f1(truth, (probs >= thresholds).astype(np.uint8))
    return f1, tuned, roc_auc_valid_classes(truth, probs)[0]


def main(work: Path) -> None:
    rng = np.random.default_rng(0)
    print("| comparison (A vs B) | F1 @0.5 A - B [95 % interval] | F1 tuned A - B | ROC AUC A - B |")
    print("|---|---|---|---|")
    for title, a_pattern, b_pattern in COMPARISONS:
        (a, ta), (b, tb) = load(work, a_pattern), load(work, b_pattern)
        assert a["Id"].tolist() == b["Id"].tolist(), "runs of different test splits"
        full = np.arange(len(a))
        point = np.subtract(scores(a, ta, full), scores(b, tb, full))
        draws = []
        for _ in range(2000):
            rows = rng.integers(0, len(a), len(a))
            draws.append(np.subtract(scores(a, ta, rows), scores(b, tb, rows)))
        low, high = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
        cells = [f"{p:+.4f} [{lo:+.4f}, {hi:+.4f}]" for p, lo, hi in zip(point, low, high, strict=True)]
        print(f"| {title} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

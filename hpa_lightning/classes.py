"""The 28 HPA 2018 location classes: the single source of class names and Kaggle train counts."""

from __future__ import annotations

import csv
from importlib import resources

CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
KAGGLE_TRAIN_SAMPLES = 31072


def _load() -> tuple[tuple[str, ...], tuple[int, ...]]:
    text = resources.files("hpa_lightning").joinpath("resources/hpa_classes.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    if [int(r["id"]) for r in rows] != list(range(len(rows))):
        raise RuntimeError("hpa_classes.csv: ids must be 0..N-1 in order")
    return tuple(r["name"] for r in rows), tuple(int(r["kaggle_2018_train_count"]) for r in rows)


CLASS_NAMES, KAGGLE_TRAIN_COUNTS = _load()
NUM_CLASSES = len(CLASS_NAMES)

"""Ensembles of finished runs: their probabilities averaged (optionally weighted), with decision thresholds chosen on
their validation predictions, concatenated out of fold when the runs are the K folds of one split.

The members are run folders, or every finished run under a folder of runs (a sweep, e.g. `+sweep=folds`). All must
have predicted the same test Ids (one test split). Their validation predictions (`val_predictions.csv`) either
partition the samples (folds: each sample once, out of fold) or are the same samples (e.g. seeds or architectures on
one split: averaged like the test predictions); the thresholds are chosen on those with the strategy of the first
member's configuration (`label_ratio` matches the label ratios of the validation samples, which out of fold are all
of train+val).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from hpa_lightning import metrics
from hpa_lightning.errors import DataError
from hpa_lightning.runs import layout
from hpa_lightning.runs.find import find_jobs
from hpa_lightning.runs.outputs import check_thresholds, split_summary


def member_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders named directly, or every finished run under a folder of runs, in natural order."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / layout.RESULTS).is_file():
            runs.append(path)
        elif path.is_dir():
            found = [job.dir for job in find_jobs(path) if job.status == "completed"]
            if not found:
                raise DataError(f"{path}: no finished run (no results.json) in this folder")
            runs.extend(found)
        else:
            raise DataError(f"{path}: not a run folder or a folder of runs")
    if len({run.resolve() for run in runs}) != len(runs):
        raise DataError(f"{', '.join(map(str, paths))}: a run is named twice")
    return runs


def member_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    """Weights normalised to sum 1 (equal when None); one line naming `weights` when they do not fit."""
    if weights is None or len(weights) == 0:
        return np.full(count, 1.0 / count)
    values = np.asarray(weights, dtype=np.float64)
    if values.shape != (count,) or not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise DataError(f"weights={','.join(map(str, weights))}: expected {count} numbers >= 0 (one per member), "
                        f"not all 0")
    return values / values.sum()


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(Ids, probabilities, targets) of a run's val_predictions.csv or test_predictions.csv."""
    if not path.is_file():
        raise DataError(f"{path}: not found (runs write val_predictions.csv since folds and ensembles came in; "
                        f"re-run this one to ensemble it)")
    frame = pd.read_csv(path, dtype={"Id": str})
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy(np.float64)
    targets = frame[[c for c in frame.columns if c.startswith("true_")]].to_numpy(np.uint8)
    return frame["Id"].tolist(), probs, targets


def _aligned(path: Path, ids: list[str], read: tuple[list[str], np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    member_ids, probs, targets = read
    if sorted(member_ids) != sorted(ids):
        raise DataError(f"{path}: predicts other Ids than the first member (another split?); cannot ensemble")
    order = pd.Index(member_ids).get_indexer(ids)
    return probs[order], targets[order]


def ensemble_evaluation(run_dirs: Sequence[Path], weights: Sequence[float] | None = None) -> dict:
    """Thresholds, validation and test summaries of the weighted mean of the members' probabilities."""
    runs = [Path(r) for r in run_dirs]
    w = member_weights(weights, len(runs))
    test_ids, first_probs, test_targets = read_predictions(runs[0] / layout.TEST_PREDICTIONS)
    test_probs = w[0] * first_probs
    for weight, run in zip(w[1:], runs[1:], strict=True):
        path = run / layout.TEST_PREDICTIONS
        test_probs = test_probs + weight * _aligned(path, test_ids, read_predictions(path))[0]
    vals = [read_predictions(run / layout.VAL_PREDICTIONS) for run in runs]
    id_sets = [set(ids) for ids, _, _ in vals]
    if len(runs) > 1 and all(s == id_sets[0] for s in id_sets):
        validation = "shared"
        val_ids, val_probs, val_targets = vals[0][0], w[0] * vals[0][1], vals[0][2]
        for weight, run, read in zip(w[1:], runs[1:], vals[1:], strict=True):
            val_probs = val_probs + weight * _aligned(run / layout.VAL_PREDICTIONS, val_ids, read)[0]
    elif sum(len(s) for s in id_sets) == len(set().union(*id_sets)):
        validation = "out_of_fold" if len(runs) > 1 else "single"
        val_probs = np.concatenate([probs for _, probs, _ in vals])
        val_targets = np.concatenate([targets for _, _, targets in vals])
    else:
        raise DataError(f"{', '.join(map(str, runs))}: their validation samples neither coincide nor partition "
                        f"(neither one split nor the folds of one); cannot choose thresholds")
    config = OmegaConf.load(runs[0] / layout.CONFIG)
    settings, min_pos = check_thresholds(config), int(config.get("report_min_positives", 20))
    thresholds = metrics.choose_thresholds(settings["strategy"], val_targets, val_probs, default=settings["default"],
                                           min_positives=settings["min_positives"],
                                           train_ratios=val_targets.mean(axis=0))
    ensure_one = settings["ensure_one"]
    return {"members": [str(run) for run in runs], "weights": w.tolist(), "validation": validation,
            "thresholds_strategy": settings["strategy"], "thresholds": thresholds, "ensure_one": ensure_one,
            "val": split_summary({"targets": val_targets, "probs": val_probs}, thresholds, ensure_one, min_pos),
            "test": split_summary({"targets": test_targets, "probs": test_probs}, thresholds, ensure_one, min_pos),
            "test_ids": test_ids, "test_probs": test_probs}

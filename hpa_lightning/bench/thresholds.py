"""Section 6: the exact per-class threshold search (`tune_thresholds`) vs the usual one, sklearn's
precision-recall curve per class with its F1 maximised, on validation-sized data (3107 x 28, Kaggle HPA 2018's)."""

from __future__ import annotations

import numpy as np
import torch

from hpa_lightning.bench.common import time_call
from hpa_lightning.metrics import global_threshold, label_ratio_thresholds, tune_thresholds


def validation_like(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with class rates from 2 % to 60 % and scores that rank positives higher, 3 decimals (ties, as
    probabilities saved to CSV have)."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < rng.uniform(0.02, 0.6, classes)).astype(np.int64)
    probs = np.round(np.clip(0.35 * targets + rng.normal(0.3, 0.2, (n, classes)), 0.0, 1.0), 3)
    return targets, probs


def sklearn_best_f1(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per class, the F1-optimal threshold from ``precision_recall_curve`` (the usual recipe), one call per class."""
    from sklearn.metrics import precision_recall_curve

    thresholds = np.full(targets.shape[1], 0.5)
    for c in range(targets.shape[1]):
        if targets[:, c].any():
            precision, recall, cuts = precision_recall_curve(targets[:, c], probs[:, c])
            f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                           where=precision + recall > 0)[:-1]
            thresholds[c] = cuts[np.argmax(f1)]
    return thresholds


def _f1(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    decided = probs >= thresholds
    tp = (decided & (targets > 0)).sum(axis=0)
    return 2 * tp / np.maximum(decided.sum(axis=0) + targets.sum(axis=0), 1)


def bench_thresholds(n: int, classes: int, iters: int, seed: int) -> dict:
    """Both searches timed on the same data (median of `iters` calls); their per-class F1 must agree (the exact one
    can only be equal or better: sklearn's curve cuts at observed scores, which are among its candidates)."""
    targets, probs = validation_like(n, classes, seed)
    cpu = torch.device("cpu")
    exact_s = time_call(lambda: tune_thresholds(targets, probs), cpu, iters)
    sklearn_s = time_call(lambda: sklearn_best_f1(targets, probs), cpu, iters)
    global_s = time_call(lambda: global_threshold(targets, probs), cpu, iters)
    ratio_s = time_call(lambda: label_ratio_thresholds(probs, targets.mean(axis=0)), cpu, iters)
    gap = _f1(targets, probs, tune_thresholds(targets, probs)) - _f1(targets, probs, sklearn_best_f1(targets, probs))
    return {"ratio": exact_s / sklearn_s, "exact_ms": exact_s * 1e3, "sklearn_ms": sklearn_s * 1e3,
            "global_ms": global_s * 1e3, "label_ratio_ms": ratio_s * 1e3, "samples": n, "classes": classes,
            "iters": iters, "min_f1_gain": float(gap.min())}

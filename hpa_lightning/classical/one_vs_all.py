"""28 one-vs-all classifiers (one per class), fitted and applied."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

log = logging.getLogger(__name__)


@dataclass
class OneVsAllResult:
    probs: list[np.ndarray]  # one (N_k, C) float64 array per evaluated set
    without_positives: list[int] = field(default_factory=list)  # classes predicted 0 everywhere
    all_positive: list[int] = field(default_factory=list)  # classes predicted 1 everywhere
    not_converged: list[int] = field(default_factory=list)  # classes whose fit warned ConvergenceWarning
    fit_s: float = 0.0
    predict_s: float = 0.0


def fit_predict_one_vs_all(estimator: Any, x_train: np.ndarray, y_train: np.ndarray,
                           evaluate: Sequence[np.ndarray]) -> OneVsAllResult:
    """Fit a clone of `estimator` per column of `y_train` (0/1, ``(N, C)``) and return P(class) for each `evaluate` set.

    Each model is used and dropped before the next is fitted, so memory holds one model at a time (28 full
    random forests on a large train set would not fit). A class that is constant on train needs no model: its
    probability is that constant (0 without positives, 1 when every train sample is positive).
    """
    y_train = np.asarray(y_train)
    if y_train.ndim != 2 or len(y_train) != len(x_train):
        raise ValueError(f"y_train must be (N, C) with N={len(x_train)}, got {y_train.shape}")
    n_classes = y_train.shape[1]
    result = OneVsAllResult(probs=[np.zeros((len(x), n_classes), dtype=np.float64) for x in evaluate])
    for c in range(n_classes):
        target = (y_train[:, c] > 0).astype(np.int64)
        positives = int(target.sum())
        if positives in (0, len(target)):
            (result.without_positives if positives == 0 else result.all_positive).append(c)
            for probs in result.probs:
                probs[:, c] = float(positives > 0)
            continue
        model = clone(estimator)
        class_started = started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x_train, target)
        result.fit_s += time.perf_counter() - started
        for w in caught:  # keep the other warnings visible; the convergence ones are summarised per class
            if issubclass(w.category, ConvergenceWarning):
                if c not in result.not_converged:
                    result.not_converged.append(c)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        started = time.perf_counter()
        column = list(model.classes_).index(1)
        for probs, x in zip(result.probs, evaluate, strict=True):
            probs[:, c] = model.predict_proba(x)[:, column]
        result.predict_s += time.perf_counter() - started
        log.info("class %2d: %5d train positives, fit + predict %.2fs", c, positives,
                 time.perf_counter() - class_started)
    return result

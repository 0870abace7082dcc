"""Multi-label evaluation metrics: macro F1, ROC AUC over defined classes, per-class thresholds.

Inputs are ``(N, C)`` arrays (numpy, or torch tensors, which are moved to CPU): ``targets`` 0/1 (bool, int or float),
``probs`` finite scores (usually sigmoid probabilities), ``preds`` 0/1 decisions. Outputs are Python floats or numpy
arrays; `summarize` returns only JSON-serialisable Python types.

The scores are torchmetrics': per-class F1 is ``multilabel_f1_score(average="none", zero_division=0)`` and per-class
ROC AUC ``multilabel_auroc(average="none")`` (exact, ``thresholds=None``), both in `_f1_per_class` /
`_roc_auc_per_class`, the one place they are computed: `per_class_f1`, `macro_f1`, `roc_auc_valid_classes` and
`summarize` call them, and the LightningModule's epoch metrics (hpa_lightning.models.epoch_metrics, a torchmetrics
`Metric` gathering the epoch over DDP ranks) are `summarize` of the gathered outputs, as is results.json. The
project's definitions on top of torchmetrics:

- decisions are ``probs >= threshold`` (`decide`, with the optional ``ensure_one`` fallback); torchmetrics receives
  these 0/1 decisions as integers, so its own ``probs > threshold`` on floating-point input never applies;
- macro F1 is the plain mean of the per-class F1 over all classes (a class without positives or predictions scores
  0), as sklearn's ``f1_score(average="macro", zero_division=0)``;
- ROC AUC is scored only on the classes with both positives and negatives (``multilabel_auroc`` would give the others
  0 and average them in); their per-class entry is NaN (None in `summarize`) and the macro value is the mean over the
  defined classes, NaN (None) when there is none.

torchmetrics counts and divides in float32 whatever the input dtype, so the values are within about 1e-7 of sklearn's
float64 ones (tests/test_metrics.py keeps sklearn as the oracle). Scores outside [0, 1] are read by torchmetrics as
logits and passed through a sigmoid first, which leaves AUC unchanged (monotone) except where it saturates.

The threshold choices stay numpy: torchmetrics has no per-class F1-optimal cut, no single macro-F1-optimal threshold
and no thresholds matching label ratios. Their exact search scores every candidate cut of every class at once with a
vectorised F1 from cumulative integer counts in float64 (`_f1_from_counts`, and the running macro F1 of
`global_threshold`), so that equal ratios tie exactly; calling torchmetrics once per candidate cut would be O(N) times
slower and float32 ties would not be exact.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["THRESHOLD_STRATEGIES", "choose_thresholds", "decide", "global_threshold", "label_ratio_thresholds",
           "macro_f1", "per_class_f1", "roc_auc_valid_classes", "summarize", "threshold_record",
           "tune_thresholds"]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary_2d(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, C) array, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0/1 values")
        a = a.astype(bool)
    return a


def _scores_2d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(_to_numpy(x), dtype=np.float64)  # float32 scores are compared and cut in float64
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, C) array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite")
    return a


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


def _f1_from_counts(tp: np.ndarray, n_pred: np.ndarray, n_pos: int) -> np.ndarray:
    # Threshold search only (the reported F1 is torchmetrics', `_f1_per_class`): F1 of many candidate cuts at once,
    # 2TP / (2TP + FP + FN) = 2TP / (#predicted + #positive); n_pos >= 1 (a class without positives is not searched).
    # Counts are exact integers and division is correctly rounded, so equal ratios give equal floats (exact ties).
    return 2.0 * tp / (n_pred + n_pos)


def _f1_per_class(y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """torchmetrics' per-class F1 (``zero_division=0``) of checked 0/1 targets ``y`` and decisions ``d``, float64 (C,).

    The decisions go in as integers: torchmetrics thresholds (with ``>``) only floating-point predictions, so the
    project's ``>=`` decisions are scored as made.
    """
    import torch
    from torchmetrics.functional.classification import multilabel_f1_score

    n, c = y.shape
    if n == 0 or c == 0:  # torchmetrics cannot reshape empty inputs; no sample: F1 0/0 -> 0, as zero_division=0
        return np.zeros(c)
    f1 = multilabel_f1_score(torch.from_numpy(d.astype(np.int64)), torch.from_numpy(y.astype(np.int64)),
                             num_labels=c, average="none", zero_division=0, validate_args=False)
    return f1.reshape(c).double().numpy()


def _roc_auc_per_class(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """torchmetrics' exact per-class ROC AUC of checked 0/1 targets ``y`` and scores ``s``, float64 (C,), NaN for the
    classes without both positive and negative samples (they are not passed to torchmetrics, which would score 0)."""
    import torch
    from torchmetrics.functional.classification import multilabel_auroc

    n_pos = y.sum(axis=0)
    valid = (n_pos > 0) & (n_pos < y.shape[0])
    per_class = np.full(y.shape[1], np.nan)
    if valid.any():
        k = int(valid.sum())
        auc = multilabel_auroc(torch.from_numpy(s[:, valid]), torch.from_numpy(y[:, valid].astype(np.int64)),
                               num_labels=k, average="none", thresholds=None, validate_args=False)
        per_class[valid] = auc.reshape(k).double().numpy()
    return per_class


def _average_precision_per_class(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """torchmetrics' per-class average precision (the area under the step precision-recall curve, sklearn's
    ``average_precision_score``), float64 (C,), NaN for classes without positives (AP is undefined there)."""
    import torch
    from torchmetrics.functional.classification import multilabel_average_precision

    valid = y.sum(axis=0) > 0
    per_class = np.full(y.shape[1], np.nan)
    if valid.any():
        k = int(valid.sum())
        ap = multilabel_average_precision(torch.from_numpy(s[:, valid]),
                                          torch.from_numpy(y[:, valid].astype(np.int64)), num_labels=k,
                                          average="none", thresholds=None, validate_args=False)
        per_class[valid] = ap.reshape(k).double().numpy()
    return per_class


def _macro_over_defined(per_class_auc: np.ndarray) -> float:
    defined = per_class_auc[~np.isnan(per_class_auc)]
    return float(defined.mean()) if defined.size else math.nan


def per_class_f1(targets: Any, preds: Any) -> np.ndarray:
    """Per-class F1 of 0/1 decisions, shape ``(C,)``; a class with no positives and no predictions scores 0."""
    y = _binary_2d(targets, "targets")
    d = _binary_2d(preds, "preds")
    _check_same_shape(y, d, "targets and preds")
    return _f1_per_class(y, d)


def macro_f1(targets: Any, preds: Any) -> float:
    """Unweighted mean of `per_class_f1` over all classes (sklearn ``f1_score(average="macro", zero_division=0)``)."""
    return float(per_class_f1(targets, preds).mean())


def roc_auc_valid_classes(targets: Any, probs: Any) -> tuple[float, np.ndarray]:
    """ROC AUC per class and its macro mean over the classes where it is defined.

    A class's AUC is defined only when it has both positive and negative samples; other entries of the per-class
    array are NaN and excluded from the mean (sklearn would raise). The macro value is NaN when no class is valid.
    Each defined class is torchmetrics' exact (trapezoidal, tie-aware) ROC AUC, as sklearn's ``roc_auc_score``.

    Returns:
        ``(macro_auc, per_class_auc)`` with ``per_class_auc`` of shape ``(C,)``.
    """
    y = _binary_2d(targets, "targets")
    s = _scores_2d(probs, "probs")
    _check_same_shape(y, s, "targets and probs")
    per_class = _roc_auc_per_class(y, s)
    return _macro_over_defined(per_class), per_class


def _pick_best(f1: np.ndarray, thresholds: np.ndarray) -> float:
    # Among thresholds with the maximal F1 (exact float ties), take the one closest to 0.5, then the larger one.
    best = np.flatnonzero(f1 == f1.max())
    cand = thresholds[best]
    order = np.lexsort((-cand, np.abs(cand - 0.5)))
    return float(cand[order[0]])


def _cuts(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For scores in decreasing order, the candidate cuts: the index at which each run of equal scores ends (the cut
    includes everything up to it) and the cut's threshold. That is the midpoint between the run's score and the next
    lower one, a margin on both sides; the run's score itself where rounding puts the midpoint on the lower score
    (adjacent floats) and for the last cut, which includes every sample."""
    ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    upper, lower = sorted_scores[ends[:-1]], sorted_scores[ends[:-1] + 1]
    mid = upper / 2 + lower / 2
    return ends, np.r_[np.where(mid > lower, mid, upper), sorted_scores[-1]]


def _exact_class_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    order = np.argsort(-scores)  # any order of equal scores: only the ends of their runs are cuts
    ends, thresholds = _cuts(scores[order])
    return _pick_best(_f1_from_counts(np.cumsum(positive[order])[ends], ends + 1, positive.sum()), thresholds)


def _grid_class_threshold(scores: np.ndarray, positive: np.ndarray, grid: np.ndarray) -> float:
    # Counts of scores >= t for every grid t by binary search (searchsorted's side="left": a score equal to t counts).
    n_pred = scores.size - np.searchsorted(np.sort(scores), grid)
    tp = positive.sum() - np.searchsorted(np.sort(scores[positive]), grid)
    return _pick_best(_f1_from_counts(tp, n_pred, positive.sum()), grid)


def tune_thresholds(targets: Any, probs: Any, default: float = 0.5, grid: np.ndarray | None = None,
                    min_positives: int = 1) -> np.ndarray:
    """Per-class decision thresholds maximising each class's F1 on these (validation) samples.

    With ``grid=None`` the search is exact: every cut between consecutive distinct scores of a class is a
    candidate, and its threshold is the midpoint between the lowest included score and the next lower (excluded)
    score (the lowest score itself for the cut that includes every sample). ``probs >= threshold`` therefore
    reproduces exactly the decisions, and F1, that were counted. With a ``grid``, only its values are tried as
    thresholds (``probs >= t``). Among thresholds with equal best F1 the one closest to 0.5 wins (then the larger),
    which keeps thresholds away from extreme values when the data does not prefer them. A class with fewer than
    ``min_positives`` positive samples (at least 1) keeps ``default``: with none its F1 is 0 at every threshold, and
    with a handful the best cut is noise (two low-scored positives make "predict every sample" the F1 optimum).

    Cost: one sort per class, O(N log N); 3107 x 28 takes a few milliseconds.

    Returns:
        float64 array of shape ``(C,)``.
    """
    y = _binary_2d(targets, "targets")
    s = _scores_2d(probs, "probs")
    _check_same_shape(y, s, "targets and probs")
    if grid is not None:
        grid = np.unique(np.ravel(grid))
        if grid.size == 0 or not np.isfinite(grid).all():
            raise ValueError("grid must be a non-empty array of finite thresholds")
    thresholds = np.full(y.shape[1], float(default))
    for c in range(y.shape[1]):
        positive = y[:, c]
        if positive.sum() < max(1, min_positives):
            continue
        if grid is None:
            thresholds[c] = _exact_class_threshold(s[:, c], positive)
        else:
            thresholds[c] = _grid_class_threshold(s[:, c], positive, grid)
    return thresholds


def global_threshold(targets: Any, probs: Any) -> float:
    """The one threshold for every class that maximises macro F1 on these (validation) samples, searched exactly.

    Lowering a single threshold past each distinct score moves samples of one or more classes to predicted positive;
    macro F1 is updated class by class as it goes (O(NC log NC)), and the threshold returned is the midpoint between
    the lowest included score and the next lower one, so ``probs >= t`` reproduces the decisions counted. Ties in
    macro F1 go to the threshold closest to 0.5. Classes without positives count with F1 0, as in ``macro_f1``.
    """
    y = _binary_2d(targets, "targets")
    s = _scores_2d(probs, "probs")
    _check_same_shape(y, s, "targets and probs")
    n, c = s.shape
    if n == 0 or c == 0:
        return 0.5
    # Each class's samples best first: its F1 when its top r+1 are predicted, and the change each sample makes to it.
    order = np.argsort(-s, axis=0)  # equal scores in any order: cuts fall only at the ends of their runs
    tp = np.cumsum(np.take_along_axis(y, order, axis=0), axis=0)
    f1 = 2.0 * tp / (np.arange(1, n + 1)[:, None] + y.sum(axis=0))
    change = np.diff(f1, axis=0, prepend=0.0).ravel()
    # Passing every sample of every class in decreasing score order, macro F1 is the running sum of changes / C: the
    # samples of a class passed by a cut are a top of its order, and their changes add up to that top's F1.
    scores = np.take_along_axis(s, order, axis=0).ravel()
    by_score = np.argsort(-scores)
    ends, thresholds = _cuts(scores[by_score])
    macro = np.cumsum(change[by_score])[ends] / c
    # The first candidate, just above the highest score, predicts nothing (macro F1 0).
    return _pick_best(np.r_[0.0, macro], np.r_[np.nextafter(scores.max(), np.inf), thresholds])


def label_ratio_thresholds(probs: Any, ratios: Any) -> np.ndarray:
    """Per-class thresholds under which each class is predicted for ``round(ratio * N)`` of these N samples (nearest,
    halves to even): the predicted label ratios match ``ratios`` (the train split's, as the 1st and 3rd of Kaggle HPA
    2018 set theirs). A class with a ratio above 0 is predicted for at least one sample, also where ``ratio * N``
    rounds to 0 (the rarest HPA classes, 11 of 31072 training images, on a few hundred samples): a class never
    predicted scores F1 0 whatever its scores. A ratio of 0 predicts no sample.

    The threshold lies midway between the last included and the first excluded score, so new samples are cut where
    these were. Samples tied at the cut are all included or all excluded, whichever count is nearer the target
    (excluded on equal distance), but never all excluded when the target is one sample or more.
    """
    s = _scores_2d(probs, "probs")
    r = np.asarray(_to_numpy(ratios), dtype=np.float64).ravel()
    if r.shape[0] != s.shape[1] or not np.isfinite(r).all() or (r < 0).any() or (r > 1).any():
        raise ValueError(f"ratios must be {s.shape[1]} values in [0, 1]")
    counts = [max(int(round(ratio * s.shape[0])), int(ratio > 0)) for ratio in r]
    return np.array([_cut_at(np.sort(s[:, c])[::-1], k) for c, k in enumerate(counts)])


def _cut_at(ranked: np.ndarray, k: int) -> float:
    """The threshold predicting the top ``k`` of the scores ``ranked`` in decreasing order (see the tie rule above)."""
    n = ranked.size
    if n == 0:
        return 1.0
    if k <= 0:
        return float(np.nextafter(ranked[0], np.inf))
    if k < n and ranked[k - 1] == ranked[k]:  # a tie straddles the cut: it goes whole to the nearer side
        tied = np.flatnonzero(ranked == ranked[k])
        first, last = int(tied[0]), int(tied[-1])
        k = first if first > 0 and k - first <= last + 1 - k else last + 1
    if k >= n:
        return float(ranked[-1])
    included, excluded = ranked[k - 1], ranked[k]
    mid = included / 2 + excluded / 2
    return float(mid if mid > excluded else included)  # adjacent floats: the midpoint may round onto `excluded`


THRESHOLD_STRATEGIES = ("per_class_f1", "label_ratio", "global")


def choose_thresholds(strategy: str, targets: Any, probs: Any, *, default: float = 0.5, min_positives: int = 1,
                      train_ratios: Any = None) -> np.ndarray:
    """Decision thresholds (C,) from validation targets/probabilities by `strategy` (THRESHOLD_STRATEGIES):
    per-class F1 (`tune_thresholds`), predicted label ratios matched to `train_ratios`, or one global threshold."""
    if strategy == "per_class_f1":
        return tune_thresholds(targets, probs, default=default, min_positives=min_positives)
    if strategy == "label_ratio":
        return label_ratio_thresholds(probs, train_ratios)
    if strategy == "global":
        threshold = global_threshold(targets, probs)  # checks both
        return np.full(np.shape(_to_numpy(probs))[1], threshold)
    raise ValueError(f"thresholds.strategy={strategy!r}: expected one of {', '.join(THRESHOLD_STRATEGIES)}")

def threshold_record(thresholds: np.ndarray, targets: Any, class_names: list[str], default: float,
                     min_positives: int, ensure_one: bool, strategy: str = "per_class_f1") -> dict[str, Any]:
    """The content of thresholds.json: per-class thresholds, how they were tuned, and which classes kept the default
    (with their number of validation positives; only `per_class_f1` keeps defaults)."""
    positives = _binary_2d(targets, "targets").sum(axis=0).tolist()
    values = np.asarray(thresholds, dtype=np.float64).ravel().tolist()
    if not len(class_names) == len(values) == len(positives):
        raise ValueError(f"{len(class_names)} class names for {len(values)} thresholds and {len(positives)} classes "
                         "of targets")
    keeps = [strategy == "per_class_f1" and n < max(1, min_positives) for n in positives]  # kept `default`
    return {"thresholds": {name: values[i] for i, name in enumerate(class_names)},
            "strategy": strategy, "tuned_on": "val", "tta": 1, "default": float(default),
            "min_positives": int(min_positives), "ensure_one": bool(ensure_one),
            "tuned_classes": [name for i, name in enumerate(class_names) if not keeps[i]],
            "default_classes": {name: positives[i] for i, name in enumerate(class_names) if keeps[i]}}


def decide(probs: Any, thresholds: np.ndarray | float, ensure_one: bool = False) -> np.ndarray:
    """0/1 decisions ``probs >= thresholds`` as uint8 ``(N, C)``; ``thresholds`` is a scalar or per-class ``(C,)``.

    With ``ensure_one`` a sample with no class at or above its threshold is assigned its highest-probability class
    (every HPA image has at least one location; the Kaggle 2018 solutions used the same fallback).
    """
    s = _scores_2d(probs, "probs")
    t = _to_numpy(thresholds)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != s.shape[1]):
        raise ValueError(f"thresholds must be a scalar or have shape ({s.shape[1]},), got {t.shape}")
    out = (s >= t).astype(np.uint8)
    if ensure_one and s.shape[1] > 0:
        empty = np.flatnonzero(out.sum(axis=1) == 0)
        out[empty, s[empty].argmax(axis=1)] = 1
    return out


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def summarize(targets: Any, probs: Any, thresholds: np.ndarray | float | None = None,
              ensure_one: bool = False) -> dict[str, Any]:
    """Evaluation summary with plain Python values only (``json.dumps`` works; undefined values are ``None``).

    Keys: ``macro_f1`` / ``per_class_f1`` at threshold 0.5, ``roc_auc`` (macro over ``n_auc_classes`` defined
    classes) / ``per_class_roc_auc``, ``mean_average_precision`` (macro over the ``n_ap_classes`` classes with
    positives: the HPA 2021 image-level measure) / ``per_class_average_precision``, ``n_samples``; with
    ``thresholds`` also ``macro_f1_tuned`` /
    ``per_class_f1_tuned`` and the ``thresholds`` used. ``ensure_one`` applies to the tuned decisions only: the 0.5
    figures stay plain ``sklearn.metrics.f1_score(y, p >= 0.5, average="macro", zero_division=0)`` (as torchmetrics
    computes it, in float32: see the module docstring).
    """
    y = _binary_2d(targets, "targets")
    s = _scores_2d(probs, "probs")
    _check_same_shape(y, s, "targets and probs")
    f1 = _f1_per_class(y, decide(s, 0.5))
    per_class_auc = _roc_auc_per_class(y, s)
    auc = _macro_over_defined(per_class_auc)
    per_class_ap = _average_precision_per_class(y, s)
    mean_ap = _macro_over_defined(per_class_ap)  # the same mean over the classes where it is defined
    out: dict[str, Any] = {
        "n_samples": int(y.shape[0]),
        "macro_f1": float(f1.mean()),
        "per_class_f1": _json_floats(f1),
        "roc_auc": None if math.isnan(auc) else auc,
        "per_class_roc_auc": _json_floats(per_class_auc),
        "n_auc_classes": int(np.isfinite(per_class_auc).sum()),
        "mean_average_precision": None if math.isnan(mean_ap) else mean_ap,
        "per_class_average_precision": _json_floats(per_class_ap),
        "n_ap_classes": int(np.isfinite(per_class_ap).sum()),
    }
    if thresholds is not None:
        t = np.broadcast_to(_to_numpy(thresholds), (y.shape[1],))
        f1_tuned = _f1_per_class(y, decide(s, t, ensure_one=ensure_one))
        out["macro_f1_tuned"] = float(f1_tuned.mean())
        out["per_class_f1_tuned"] = _json_floats(f1_tuned)
        out["thresholds"] = [float(v) for v in t]
    return out


def format_score(value: float | None) -> str:
    """A score for a summary line; None (no class qualified) reads as n/a."""
    return "n/a" if value is None else f"{value:.4f}"

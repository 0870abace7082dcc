# Mutation testing (`make mutation`, tests/mutation.py): the mutants of hpa_lightning/metrics.py these tests do not
# kill, judged equivalent (no test could tell them apart from the code):
# - `3.0 * tp` for `2.0 * tp` in _f1_from_counts and global_threshold, and `* c` for `/ c` in the running macro F1:
#   those F1 values only rank the candidate cuts, and scaling every one of them keeps the best and its ties (equal
#   ratios of integers still round alike).
# - In the torchmetrics calls (_f1_per_class, _roc_auc_per_class, _average_precision_per_class): `average=None`
#   (read as "none"), `validate_args=None` (falsy, as False), `thresholds` or `zero_division` left out (their
#   defaults, None = exact and 0, are the values passed), `num_labels=None` (without validation the count comes from
#   the input's shape), and `.astype(None)` on the 0/1 decisions and targets (float 0/1 count as int 0/1 do). The
#   explicit arguments stay: they state the definitions the module docstring gives.

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torchmetrics.functional.classification import multilabel_auroc, multilabel_f1_score

from hpa_lightning.classes import NUM_CLASSES
from hpa_lightning.metrics import (
    choose_thresholds,
    decide,
    global_threshold,
    label_ratio_thresholds,
    macro_f1,
    per_class_f1,
    roc_auc_valid_classes,
    summarize,
    threshold_record,
    tune_thresholds,
)

SHAPES = [(50, 5), (200, NUM_CLASSES), (7, 3), (1000, NUM_CLASSES)]
# F1 and ROC AUC are torchmetrics', which counts and divides in float32 whatever the input dtype: against sklearn's
# float64 they differ by up to ~1e-7 (one float32 ulp near 1 is 6e-8). The threshold search stays float64 numpy and
# keeps 1e-12.
FLOAT32_TOL = 1e-6


def _data(seed: int, n: int, c: int, quantize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Random multi-label data with the awkward columns: no positives, all positives, very rare positives."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.02, 0.6, size=c)
    y = (rng.random((n, c)) < rates).astype(np.int64)
    y[:, 0] = 0
    if c > 1:
        y[:, 1] = 1
    if c > 2:
        y[:, 2] = 0
        y[rng.integers(n), 2] = 1
    # Scores correlated with the labels so F1/AUC are not trivially ~0.5.
    probs = np.clip(0.35 * y + rng.normal(0.3, 0.2, size=(n, c)), 0.0, 1.0)
    if quantize:  # many tied scores
        probs = np.round(probs, 1)
    return y, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_f1_matches_sklearn(seed: int, shape: tuple[int, int]) -> None:
    y, probs = _data(seed, *shape)
    rng = np.random.default_rng(seed + 100)
    for preds in (probs >= 0.5, rng.random(shape) < 0.3, np.zeros(shape, dtype=np.int64), np.ones(shape)):
        expected_per = f1_score(y, preds, average=None, zero_division=0)
        np.testing.assert_allclose(per_class_f1(y, preds), expected_per, rtol=0, atol=FLOAT32_TOL)
        expected = f1_score(y, preds, average="macro", zero_division=0)
        assert math.isclose(macro_f1(y.astype(np.float32), preds), expected, abs_tol=FLOAT32_TOL)
        assert isinstance(macro_f1(y, preds), float)


def test_f1_all_zero_predictions_and_targets() -> None:
    z = np.zeros((4, 3))
    assert macro_f1(z, z) == 0.0
    np.testing.assert_array_equal(per_class_f1(z, z), [0.0, 0.0, 0.0])


def test_f1_accepts_torch_tensors() -> None:
    y, probs = _data(3, 30, 4)
    preds = probs >= 0.5
    assert macro_f1(torch.from_numpy(y), torch.from_numpy(preds)) == macro_f1(y, preds)


def test_f1_rejects_non_binary() -> None:
    with pytest.raises(ValueError, match="0/1"):
        macro_f1(np.array([[0, 2]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="same shape"):
        macro_f1(np.zeros((2, 3)), np.zeros((2, 4)))


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_roc_auc_matches_sklearn_on_valid_columns(seed: int, shape: tuple[int, int], quantize: bool) -> None:
    y, probs = _data(seed, *shape, quantize=quantize)
    macro, per_class = roc_auc_valid_classes(y, probs)
    valid = (y.sum(0) > 0) & (y.sum(0) < y.shape[0])
    assert per_class.shape == (shape[1],)
    assert np.isnan(per_class[~valid]).all() and np.isfinite(per_class[valid]).all()
    assert not valid[0] and (shape[1] < 2 or not valid[1])  # the no-positive / all-positive columns
    expected = roc_auc_score(y[:, valid], probs[:, valid], average="macro")
    assert math.isclose(macro, expected, abs_tol=FLOAT32_TOL)
    expected_per = roc_auc_score(y[:, valid], probs[:, valid], average=None)
    np.testing.assert_allclose(per_class[valid], expected_per, rtol=0, atol=FLOAT32_TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_scores_are_torchmetrics_own(seed: int) -> None:
    """Bit for bit torchmetrics.functional's float32 values (a float64 implementation would differ in the last digits):
    per-class F1 of the `>=` decisions, and exact AUROC on the classes with both labels only."""
    y, probs = _data(seed, 300, NUM_CLASSES, quantize=seed == 1)
    t = np.linspace(0.3, 0.6, NUM_CLASSES)
    out = summarize(y, probs, thresholds=t)
    yt, pt = torch.from_numpy(y), torch.from_numpy(probs)
    for key, decisions in (("per_class_f1", probs >= 0.5), ("per_class_f1_tuned", probs >= t)):
        expected = multilabel_f1_score(torch.from_numpy(decisions).long(), yt, num_labels=NUM_CLASSES, average="none",
                                       zero_division=0)
        assert expected.dtype == torch.float32
        assert out[key] == expected.double().tolist()
        assert out[key.replace("per_class", "macro")] == float(np.mean(out[key]))
    np.testing.assert_array_equal(per_class_f1(y, probs >= 0.5), np.asarray(out["per_class_f1"]))
    valid = (y.sum(0) > 0) & (y.sum(0) < len(y))
    auc = multilabel_auroc(pt[:, valid], yt[:, valid], num_labels=int(valid.sum()), average="none")
    per_class = np.asarray([np.nan if v is None else v for v in out["per_class_roc_auc"]])
    assert per_class[valid].tolist() == auc.double().tolist() and np.isnan(per_class[~valid]).all()
    assert out["roc_auc"] == float(auc.double().mean())
    np.testing.assert_array_equal(roc_auc_valid_classes(y, probs)[1], per_class)


def test_a_score_equal_to_its_threshold_counts_as_positive() -> None:
    """`>=`, not torchmetrics' own `>`: ties at 0.5 and at the tuned thresholds are predicted positive."""
    rng = np.random.default_rng(7)
    t = np.array([0.5, 0.3, 0.7, 0.25])
    y = (rng.random((60, 4)) < 0.4).astype(np.int64)
    probs = np.where(rng.random((60, 4)) < 0.5, rng.choice([0.1, 0.25, 0.3, 0.5, 0.7, 0.9], (60, 4)), t)
    probs[y.astype(bool) & (rng.random((60, 4)) < 0.6)] = 0.5  # many positives sit exactly at 0.5 (and at t[0])
    assert ((probs == t) & (y == 1)).sum(axis=0).min() > 0 and (probs == 0.5).any(axis=0).all()
    out = summarize(y, probs, thresholds=t)
    for key, threshold in (("per_class_f1", 0.5), ("per_class_f1_tuned", t)):
        expected = f1_score(y, probs >= threshold, average=None, zero_division=0)
        np.testing.assert_allclose(out[key], expected, rtol=0, atol=FLOAT32_TOL)
        strict = f1_score(y, probs > threshold, average=None, zero_division=0)
        assert np.abs(expected - strict).max() > 0.05  # the case is not vacuous: `>` would score differently
    assert out["macro_f1_tuned"] == pytest.approx(
        f1_score(y, probs >= t, average="macro", zero_division=0), abs=FLOAT32_TOL)
    assert out["macro_f1"] == pytest.approx(f1_score(y, probs >= 0.5, average="macro", zero_division=0),
                                            abs=FLOAT32_TOL)


def test_summarize_with_one_class_and_no_samples() -> None:
    y, probs = _data(4, 40, 1)
    out = summarize(y, probs, thresholds=0.4)
    assert len(out["per_class_f1"]) == len(out["per_class_f1_tuned"]) == len(out["per_class_roc_auc"]) == 1
    assert out["per_class_f1"][0] == pytest.approx(f1_score(y[:, 0], probs[:, 0] >= 0.5), abs=FLOAT32_TOL)
    assert out["per_class_roc_auc"] == [None]  # column 0 has no positives
    empty = summarize(np.zeros((0, 3)), np.zeros((0, 3)))
    assert empty["n_samples"] == 0 and empty["per_class_f1"] == [0.0, 0.0, 0.0] and empty["roc_auc"] is None


def test_roc_auc_nan_when_no_valid_class() -> None:
    y = np.zeros((5, 3))
    y[:, 1] = 1
    macro, per_class = roc_auc_valid_classes(y, np.random.default_rng(0).random((5, 3)))
    assert math.isnan(macro) and np.isnan(per_class).all()


def _brute_force_f1(y: np.ndarray, scores: np.ndarray, t: float) -> float:
    return f1_score(y, scores >= t, zero_division=0)


def _grid_f1(y: np.ndarray, scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """F1 of ``scores >= t`` for every t in grid, by explicit decision matrices (sklearn per call is too slow)."""
    d = scores[:, None] >= grid[None, :]
    tp = (d & (y[:, None] > 0)).sum(0)
    return 2 * tp / (d.sum(0) + y.sum())


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(50, 5), (200, 8), (7, 3), (500, NUM_CLASSES)])
def test_tune_thresholds_is_optimal(seed: int, shape: tuple[int, int], quantize: bool) -> None:
    y, probs = _data(seed, *shape, quantize=quantize)
    t = tune_thresholds(y, probs, default=0.37)
    assert t.shape == (shape[1],)
    fine_grid = np.linspace(0.0, 1.0, 2001)
    for c in range(shape[1]):
        if y[:, c].sum() == 0:
            assert t[c] == 0.37
            continue
        tuned = _brute_force_f1(y[:, c], probs[:, c], t[c])
        assert tuned > 0
        # Better than or equal to every grid threshold and every candidate cut at an observed score.
        candidates = np.concatenate([fine_grid, np.unique(probs[:, c])])
        brute = _grid_f1(y[:, c], probs[:, c], candidates)
        assert tuned >= brute.max() - 1e-12
        # The brute force itself agrees with sklearn (spot check).
        for k in (0, len(candidates) // 2, brute.argmax()):
            assert brute[k] == pytest.approx(_brute_force_f1(y[:, c], probs[:, c], candidates[k]), abs=1e-12)


def test_tune_thresholds_uses_midpoints_and_prefers_half_on_ties() -> None:
    # Perfectly separable: any threshold in (0.2, 0.8] gives F1 = 1; midpoint of the gap is 0.5.
    y = np.array([[0], [0], [1], [1]])
    probs = np.array([[0.1], [0.2], [0.8], [0.9]])
    np.testing.assert_allclose(tune_thresholds(y, probs), [0.5])
    # Separable with a gap away from 0.5: the midpoint of (0.6, 0.7).
    np.testing.assert_allclose(tune_thresholds(y, probs * 0 + [[0.55], [0.6], [0.7], [0.95]]), [0.65])
    # Two cuts with equal best F1 (2/3): {0.9} alone (threshold 0.85) and the top four (threshold 0.2, midpoint of
    # 0.3 and 0.1); 0.2 is nearer 0.5 and wins.
    y2 = np.array([[1], [0], [0], [1], [0]])
    p2 = np.array([[0.9], [0.8], [0.7], [0.3], [0.1]])
    assert f1_score(y2, p2 >= 0.85) == pytest.approx(2 / 3) == f1_score(y2, p2 >= 0.2)
    np.testing.assert_allclose(tune_thresholds(y2, p2), [0.2])
    # Same ranking with the top gap straddling 0.5: the tie now resolves to the higher cut, midpoint of (0.55, 0.6).
    p3 = np.array([[0.6], [0.55], [0.4], [0.3], [0.1]])
    np.testing.assert_allclose(tune_thresholds(y2, p3), [0.575])


def test_tune_thresholds_with_grid() -> None:
    y, probs = _data(5, 300, 6)
    grid = np.linspace(0.05, 0.95, 19)
    t = tune_thresholds(y, probs, grid=grid)
    for c in range(1, 6):  # column 0 has no positives
        assert np.any(np.isclose(t[c], grid))
        best = max(_brute_force_f1(y[:, c], probs[:, c], g) for g in grid)
        assert _brute_force_f1(y[:, c], probs[:, c], t[c]) == pytest.approx(best, abs=1e-12)
    assert t[0] == 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_decide(seed: int) -> None:
    y, probs = _data(seed, 100, 6)
    thresholds = np.linspace(0.3, 0.8, 6)
    d = decide(probs, thresholds)
    assert d.dtype == np.uint8
    np.testing.assert_array_equal(d, (probs >= thresholds).astype(np.uint8))
    np.testing.assert_array_equal(decide(probs, 0.5), (probs >= 0.5).astype(np.uint8))

    high = decide(probs, 0.95, ensure_one=True)
    plain = decide(probs, 0.95)
    assert (high.sum(axis=1) >= 1).all()
    empty = plain.sum(axis=1) == 0
    assert empty.any()
    # Empty rows get exactly their argmax class; other rows are untouched.
    np.testing.assert_array_equal(high[empty].sum(axis=1), 1)
    np.testing.assert_array_equal(high[empty].argmax(axis=1), probs[empty].argmax(axis=1))
    np.testing.assert_array_equal(high[~empty], plain[~empty])


def test_decide_threshold_shape() -> None:
    with pytest.raises(ValueError, match="thresholds"):
        decide(np.zeros((2, 3)), np.zeros(4))


def test_summarize_is_json_serialisable() -> None:
    y, probs = _data(0, 120, NUM_CLASSES)
    t = tune_thresholds(y, probs)
    out = summarize(y, probs, thresholds=t, ensure_one=True)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == out
    assert out["n_auc_classes"] == NUM_CLASSES - 2  # column 0 has no positives, column 1 is all positive
    assert out["per_class_roc_auc"][0] is None and out["per_class_roc_auc"][1] is None
    assert len(out["per_class_f1"]) == len(out["per_class_f1_tuned"]) == NUM_CLASSES
    assert out["macro_f1"] == pytest.approx(macro_f1(y, decide(probs, 0.5)))  # 0.5 figure stays plain
    assert out["macro_f1_tuned"] == pytest.approx(macro_f1(y, decide(probs, t, ensure_one=True)))
    assert out["macro_f1_tuned"] >= out["macro_f1"] - 0.05
    assert out["roc_auc"] == pytest.approx(roc_auc_valid_classes(y, probs)[0])

    bare = summarize(y, probs)
    assert "macro_f1_tuned" not in bare
    json.dumps(bare, allow_nan=False)
    none_valid = summarize(np.zeros((3, 2)), np.full((3, 2), 0.2))
    assert none_valid["roc_auc"] is None and none_valid["n_auc_classes"] == 0
    json.dumps(none_valid, allow_nan=False)


def test_rare_classes_keep_the_default_threshold_and_are_reported() -> None:
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.3, 1.0, (300, 2))
    targets = np.zeros((300, 2), dtype=np.uint8)
    targets[probs[:, 0] > 0.8, 0] = 1  # a common, well-separated class
    low = np.argsort(probs[:, 1])[:2]
    targets[low, 1] = 1  # a rare class whose two val positives scored lowest
    unguarded = tune_thresholds(targets, probs, min_positives=1)
    assert (probs[:, 1] >= unguarded[1]).all()  # the F1 optimum on two samples: predict every sample
    guarded = tune_thresholds(targets, probs, default=0.5, min_positives=5)
    assert guarded[1] == 0.5 and guarded[0] == unguarded[0]
    record = threshold_record(guarded, targets, ["common", "rare"], 0.5, 5, True)
    assert record["tuned_classes"] == ["common"] and record["default_classes"] == {"rare": 2}
    assert record["thresholds"] == {"common": guarded[0], "rare": 0.5} and record["tta"] == 1


# ---------------------------------------------------------------------------------- threshold strategies


def _sklearn_macro_f1_at(targets: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    return f1_score(targets, (probs >= threshold).astype(int), average="macro", zero_division=0)


@pytest.mark.parametrize("seed", range(8))
def test_global_threshold_is_the_macro_f1_optimum_of_every_possible_cut(seed: int) -> None:
    """Brute force with sklearn over every cut (each distinct score, and above the highest)."""
    rng = np.random.default_rng(seed)
    n, c = (30, 5) if seed % 2 else (17, 3)
    probs = rng.random((n, c))
    if seed % 4 < 2:
        probs = np.round(probs, 1)  # ties inside and across classes
    targets = (rng.random((n, c)) < 0.3).astype(int)
    targets[:, seed % c] = 0  # a class without positives counts as F1 0, as sklearn's zero_division=0
    cuts = np.r_[np.unique(probs), np.nextafter(probs.max(), 2.0)]
    best = max(_sklearn_macro_f1_at(targets, probs, t) for t in cuts)
    t = global_threshold(targets, probs)
    assert _sklearn_macro_f1_at(targets, probs, t) == pytest.approx(best, abs=1e-12)
    thresholds = choose_thresholds("global", targets, probs)
    assert thresholds.shape == (c,) and np.all(thresholds == t)


@pytest.mark.parametrize("seed", range(6))
def test_label_ratio_thresholds_predict_the_train_ratio_of_each_class(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 200, 6
    probs = rng.random((n, c))
    ratios = np.r_[0.0, 1.0, rng.random(c - 2) * 0.5]
    thresholds = label_ratio_thresholds(probs, ratios)
    predicted = (probs >= thresholds).sum(axis=0)
    assert predicted.tolist() == [int(round(r * n)) for r in ratios]
    tied = np.repeat([[0.9], [0.5], [0.1]], [3, 4, 3], axis=0)  # 10 samples, 4 tied at the would-be cut
    count = int((tied >= label_ratio_thresholds(tied, [0.5])).sum())
    assert count in (3, 7) and abs(count - 5) == 2  # the tie goes whole to the nearer side
    with pytest.raises(ValueError, match="ratios"):
        label_ratio_thresholds(probs, [0.5] * (c - 1))


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="thresholds.strategy='best'"):
        choose_thresholds("best", np.zeros((3, 2)), np.zeros((3, 2)))


# ---------------------------------------------------------------------------------- exact values on edge cases


def mid(included: float, excluded: float) -> float:
    """The midpoint as the threshold searches compute it (halves first: no overflow), to compare floats exactly."""
    return included / 2 + excluded / 2


def test_decide_counts_a_score_equal_to_its_threshold_and_ensure_one_takes_the_top_class() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.49, 0.29, 0.1], [0.1, 0.35, 0.2]])
    t = np.array([0.5, 0.3, 0.25])
    assert decide(probs, t).dtype == np.uint8
    np.testing.assert_array_equal(decide(probs, t), [[1, 1, 0], [0, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(decide(probs, t, ensure_one=True), [[1, 1, 0], [1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(decide(torch.tensor(probs), 0.35), [[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(decide([[0.1], [0.7]], 0.5, ensure_one=True), [[1], [1]])  # one class
    assert decide(np.zeros((2, 0)), 0.5, ensure_one=True).shape == (2, 0)
    for bad in (np.zeros(4), np.zeros((1, 3))):
        with pytest.raises(ValueError) as raised:
            decide(probs, bad)
        assert str(raised.value) == f"thresholds must be a scalar or have shape (3,), got {bad.shape}"


@pytest.mark.parametrize(("call", "message"), [
    (lambda: macro_f1(np.zeros(3), np.zeros(3)), "targets must be a 2-D (N, C) array, got shape (3,)"),
    (lambda: per_class_f1(np.zeros((2, 2)), np.full((2, 2), 0.5)), "preds must contain only 0/1 values"),
    (lambda: per_class_f1(np.zeros((2, 2)), np.zeros((2, 3))),
     "targets and preds must have the same shape, got (2, 2) and (2, 3)"),
    (lambda: roc_auc_valid_classes(np.zeros((2, 2)), np.zeros(2)), "probs must be a 2-D (N, C) array, got shape (2,)"),
    (lambda: summarize(np.zeros((2, 2)), [[0.1, np.nan], [0.2, 0.3]]), "probs must be finite"),
    (lambda: tune_thresholds(np.zeros((2, 2)), np.zeros((3, 2))),
     "targets and probs must have the same shape, got (2, 2) and (3, 2)"),
    (lambda: tune_thresholds(np.ones((2, 1)), np.zeros((2, 1)), grid=[]),
     "grid must be a non-empty array of finite thresholds"),
    (lambda: tune_thresholds(np.ones((2, 1)), np.zeros((2, 1)), grid=[0.5, np.inf]),
     "grid must be a non-empty array of finite thresholds"),
    (lambda: global_threshold(np.zeros((2, 2)), np.zeros((2, 3))),
     "targets and probs must have the same shape, got (2, 2) and (2, 3)"),
    (lambda: label_ratio_thresholds(np.zeros((2, 2)), [0.5, 1.01]), "ratios must be 2 values in [0, 1]"),
    (lambda: label_ratio_thresholds(np.zeros((2, 2)), [-0.01, 0.5]), "ratios must be 2 values in [0, 1]"),
    (lambda: label_ratio_thresholds(np.zeros((2, 2)), [np.nan, 0.5]), "ratios must be 2 values in [0, 1]"),
    (lambda: label_ratio_thresholds(np.zeros((2, 2)), [0.5]), "ratios must be 2 values in [0, 1]"),
    (lambda: choose_thresholds("label_ratio", np.zeros((2, 2)), np.zeros((2, 2))), "ratios must be 2 values in [0, 1]"),
    (lambda: choose_thresholds("best", np.zeros((3, 2)), np.zeros((3, 2))),
     "thresholds.strategy='best': expected one of per_class_f1, label_ratio, global"),
])
def test_bad_inputs_are_refused_with_one_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        call()
    assert str(raised.value) == message


def test_tuned_thresholds_cut_new_samples_where_validation_ones_were_cut() -> None:
    """Exact thresholds, then decisions on samples never seen: scores just either side of each validation cut."""
    low = 0.4
    high = np.nextafter(low, 1.0)  # adjacent floats: their midpoint rounds onto `low`, so the cut is `high` itself
    assert high / 2 + low / 2 == low
    y = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 1, 0]])
    probs = np.array([[0.9, 0.9, high], [0.7, 0.6, low], [0.4, 0.3, 0.1], [0.2, 0.2, 0.05]])
    # class 0: F1 1 for any cut in (0.4, 0.7], the midpoint; class 1 (all positive): every sample, the lowest score
    t = tune_thresholds(y, probs)
    assert t.tolist() == [mid(0.7, 0.4), 0.2, high]
    new = np.array([[0.551, 0.2, high], [0.549, np.nextafter(0.2, 0.0), low]])
    np.testing.assert_array_equal(decide(new, t), [[1, 1, 1], [0, 0, 0]])
    # Equal best F1 (2/3) at the top sample (cut 0.75) and the top four (cut 0.25), both 0.25 from 0.5: the larger
    y2, p2 = np.array([[1], [0], [0], [1], [0]]), np.array([[0.875], [0.625], [0.5], [0.375], [0.125]])
    assert f1_score(y2, p2 >= 0.75) == f1_score(y2, p2 >= 0.25) == pytest.approx(2 / 3)
    assert tune_thresholds(y2, p2).tolist() == [0.75]
    # A grid counts a score equal to a grid value as predicted, as `decide` does
    assert tune_thresholds([[1], [0]], [[0.6], [0.4]], grid=[[0.4, 0.6]]).tolist() == [0.6]
    assert tune_thresholds([[1], [0], [1]], [[0.6], [0.4], [0.5]], grid=np.array([0.6, 0.5, 0.4, 0.5])).tolist() == [
        0.5]


def test_min_positives_keeps_the_default_below_it_and_tunes_at_it() -> None:
    y = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])  # 3, 1 and 0 positives
    probs = np.array([[0.9, 0.8, 0.3], [0.8, 0.1, 0.2], [0.7, 0.3, 0.6], [0.1, 0.2, 0.4]])
    assert tune_thresholds(y, probs, default=0.37, min_positives=3).tolist() == [mid(0.7, 0.1), 0.37, 0.37]
    assert tune_thresholds(y, probs, default=0.37, min_positives=4).tolist() == [0.37, 0.37, 0.37]
    assert tune_thresholds(y, probs, min_positives=4).tolist() == [0.5, 0.5, 0.5]  # default default: 0.5
    tuned = [mid(0.7, 0.1), mid(0.8, 0.3), 0.37]
    assert tune_thresholds(y, probs, default=0.37, min_positives=0).tolist() == tuned  # at least 1
    assert tune_thresholds(y, probs).tolist() == [*tuned[:2], 0.5]  # default min_positives: 1


def test_label_ratio_thresholds_exact_cuts_rounding_and_new_samples() -> None:
    probs = np.array([[0.9, 0.9, 0.9], [0.8, 0.8, 0.8], [0.6, 0.6, 0.6], [0.1, 0.1, 0.1]])
    # 0.5 x 4 = 2: midway between 0.8 and 0.6; 1.0: every sample, the lowest score; 0: above the highest score
    t = label_ratio_thresholds(probs, torch.tensor([0.5, 1.0, 0.0]))
    assert t.tolist() == [mid(0.8, 0.6), 0.1, np.nextafter(0.9, 2.0)]
    np.testing.assert_array_equal(decide([[0.701, 0.1, 0.9], [0.699, 0.0999, 0.9]], t), [[1, 1, 0], [0, 0, 0]])
    # round(ratio x N), halves to even: 0.625 x 4 = 2.5 -> 2, 0.875 x 4 = 3.5 -> 4
    assert (probs >= label_ratio_thresholds(probs, [0.625, 0.875, 0.375])).sum(axis=0).tolist() == [2, 4, 2]
    low, high = 0.4, np.nextafter(0.4, 1.0)  # adjacent floats at the cut: the included score is the threshold
    assert label_ratio_thresholds([[high], [low]], [0.5]).tolist() == [high]
    assert label_ratio_thresholds(np.zeros((0, 2)), [0.5, 0.0]).tolist() == [1.0, 1.0]  # no samples


def test_a_class_whose_ratio_rounds_to_zero_samples_is_still_predicted_once() -> None:
    """The rarest HPA classes (11 of 31072 training images): ratio x N < 0.5 on a few hundred samples. Before, such
    a class was never predicted (F1 0 whatever its scores); a ratio of exactly 0 still predicts nothing."""
    probs = np.linspace(0.01, 0.99, 100)[:, None].repeat(3, axis=1)
    predicted = (probs >= label_ratio_thresholds(probs, [11 / 31072, 0.004, 0.0])).sum(axis=0)
    assert predicted.tolist() == [1, 1, 0]
    assert probs[probs[:, 0] >= label_ratio_thresholds(probs, [0.004, 0.0, 0.0])[0], 0].tolist() == [0.99]


@pytest.mark.parametrize(("ratio", "count"), [
    (0.5, 3),  # target 5 of 10, four samples tied at 0.5 (indices 3-6): 3 or 7, equally far: excluded
    (0.4, 3),  # target 4: 3 is nearer than 7
    (0.6, 7),  # target 6: 7 is nearer than 3
    (0.3, 3),  # target 3, 7: no tie straddles the cut
    (0.7, 7),
    (0.2, 3),  # target 2 inside the top three, tied at 0.9 (0 or 3 samples): 3 is nearer
    (0.1, 3),  # target 1: 0 is nearer, but a class with a target is never left without a prediction
])
def test_a_tie_at_the_cut_goes_whole_to_the_nearer_side(ratio: float, count: int) -> None:
    tied = np.repeat([[0.9], [0.5], [0.1]], [3, 4, 3], axis=0)
    assert int((tied >= label_ratio_thresholds(tied, [ratio])).sum()) == count


def test_a_tie_one_sample_nearer_to_inclusion_is_included() -> None:
    tied = np.repeat([[0.9], [0.5], [0.1]], [3, 3, 4], axis=0)  # target 5: 6 (1 away) rather than 3 (2 away)
    assert int((tied >= label_ratio_thresholds(tied, [0.5])).sum()) == 6


def test_ratios_are_read_at_their_exact_value() -> None:
    """0.025 in float32 is 0.0250000004: x 100 = 2.50000004 samples, which rounds to 3 (in float32 arithmetic the
    product would round to 2.5 first, and then to 2)."""
    ratio = torch.tensor([0.025], dtype=torch.float32)
    probs = np.linspace(0.0, 1.0, 100)[:, None]
    assert int((probs >= label_ratio_thresholds(probs, ratio)).sum()) == 3


def test_a_tie_just_below_the_top_sample_is_excluded_when_that_is_nearer() -> None:
    tied = np.array([[0.9], [0.5], [0.5], [0.5], [0.1]])  # target 2 of 5: 1 (tie excluded) is nearer than 4
    assert label_ratio_thresholds(tied, [0.4]).tolist() == [mid(0.9, 0.5)]
    assert label_ratio_thresholds([[0.3]], [1.0]).tolist() == [0.3]  # one sample
    assert label_ratio_thresholds([[0.3]], [0.2]).tolist() == [0.3]  # 0.2 rounds to 0 samples: at least one


def test_a_one_sample_target_in_a_tie_at_the_top_is_not_dropped() -> None:
    """Ratio x N = 1 with the two best scores tied: 0 and 2 are equally far from 1; 0 would leave the class
    unpredicted, so both are predicted (before: none)."""
    probs = np.r_[[0.9, 0.9], np.linspace(0.1, 0.5, 98)][:, None]
    assert int((probs >= label_ratio_thresholds(probs, [0.01])).sum()) == 2


def test_global_threshold_exact_cut_with_every_class_populated() -> None:
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    probs = np.array([[0.8, 0.2], [0.6, 0.7], [0.3, 0.05], [0.1, 0.4]])
    # Sorted: 0.8+ 0.7+ 0.6+ 0.4+ | 0.3- 0.2- 0.1- 0.05-: macro F1 1 only between 0.4 and 0.3
    t = global_threshold(y, probs)
    assert t == mid(0.4, 0.3)
    assert _sklearn_macro_f1_at(y, probs, t) == 1.0
    np.testing.assert_array_equal(decide([[0.351, 0.349]], t), [[1, 0]])
    assert choose_thresholds("global", y, probs).tolist() == [t, t]
    # Nothing to find (no positives): every cut scores 0; the one closest to 0.5 is "just above the top score"
    assert global_threshold([[0], [0]], [[0.45], [0.2]]) == np.nextafter(0.45, 1.0)
    assert global_threshold(np.zeros((0, 3)), np.zeros((0, 3))) == 0.5
    assert global_threshold(np.zeros((3, 0)), np.zeros((3, 0))) == 0.5


def _edge_case_data() -> tuple[np.ndarray, np.ndarray]:
    """Class 0 with one positive, class 1 with one negative, class 2 without positives, class 3 all positive;
    sample 5 scores below 0.5 everywhere."""
    y = np.array([[1, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 0, 1], [0, 1, 0, 1]])
    probs = np.array([[0.7, 0.2, 0.1, 0.9], [0.6, 0.8, 0.2, 0.7], [0.1, 0.7, 0.3, 0.6], [0.2, 0.6, 0.6, 0.8],
                      [0.55, 0.9, 0.1, 0.5], [0.3, 0.4, 0.2, 0.45]])
    return y, probs


def test_summarize_on_classes_with_one_positive_one_negative_none_or_all_against_sklearn() -> None:
    from sklearn.metrics import average_precision_score

    y, probs = _edge_case_data()
    t = np.array([0.65, 0.65, 0.65, 0.95])
    out = summarize(y, probs, thresholds=t, ensure_one=True)
    assert set(out) == {"n_samples", "macro_f1", "per_class_f1", "roc_auc", "per_class_roc_auc", "n_auc_classes",
                        "mean_average_precision", "per_class_average_precision", "n_ap_classes", "macro_f1_tuned",
                        "per_class_f1_tuned", "thresholds"}
    assert out["n_samples"] == 6 and out["thresholds"] == t.tolist()
    np.testing.assert_allclose(out["per_class_f1"], f1_score(y, probs >= 0.5, average=None, zero_division=0),
                               rtol=0, atol=FLOAT32_TOL)
    assert out["macro_f1"] == pytest.approx(f1_score(y, probs >= 0.5, average="macro", zero_division=0),
                                            abs=FLOAT32_TOL)
    # Both one-sided classes are scored (1 and 2/5: the negative of class 1 outscores 3 of its 5 positives); the
    # other two are None, not 0
    auc = [roc_auc_score(y[:, c], probs[:, c]) for c in (0, 1)]
    assert auc == pytest.approx([1.0, 0.4])
    assert out["per_class_roc_auc"][2:] == [None, None] and out["n_auc_classes"] == 2
    assert out["per_class_roc_auc"][:2] == pytest.approx(auc, abs=FLOAT32_TOL)
    assert out["roc_auc"] == pytest.approx(np.mean(auc), abs=FLOAT32_TOL)
    ap = [average_precision_score(y[:, c], probs[:, c]) for c in (0, 1, 3)]
    assert out["per_class_average_precision"][2] is None and out["n_ap_classes"] == 3
    assert [out["per_class_average_precision"][c] for c in (0, 1, 3)] == pytest.approx(ap, abs=FLOAT32_TOL)
    assert out["mean_average_precision"] == pytest.approx(np.mean(ap), abs=FLOAT32_TOL)
    # ensure_one: rows 3 and 5 have no class at or above t; they get their top class, 3, which is right
    decided = probs >= t
    assert decided.sum(axis=1).tolist() == [1, 1, 1, 0, 1, 0]
    with_fallback = decide(probs, t, ensure_one=True).astype(bool)
    expected = f1_score(y, with_fallback, average=None, zero_division=0)
    np.testing.assert_allclose(out["per_class_f1_tuned"], expected, rtol=0, atol=FLOAT32_TOL)
    plain = summarize(y, probs, thresholds=t)
    np.testing.assert_allclose(plain["per_class_f1_tuned"], f1_score(y, decided, average=None, zero_division=0),
                               rtol=0, atol=FLOAT32_TOL)
    assert out["macro_f1_tuned"] > plain["macro_f1_tuned"]  # the fallback is not vacuous here
    assert summarize(y, probs, thresholds=0.65)["thresholds"] == [0.65] * 4  # a scalar applies to every class


def test_every_threshold_strategy_end_to_end() -> None:
    """choose_thresholds -> threshold_record -> summarize on new samples, per strategy, with the values pinned."""
    y, probs = _edge_case_data()
    names = ["one_pos", "one_neg", "none", "all"]
    per_class = choose_thresholds("per_class_f1", y, probs, default=0.37, min_positives=2)
    assert per_class.tolist() == tune_thresholds(y, probs, default=0.37, min_positives=2).tolist()
    # class 1's best cut takes every sample (F1 10/11), as class 3's (all positive): the lowest score
    assert per_class.tolist() == [0.37, 0.2, 0.37, 0.45]
    assert choose_thresholds("per_class_f1", y, probs).tolist() == [mid(0.7, 0.6), 0.2, 0.5, 0.45]  # 0.5, 1
    ratios = np.array([0.5, 1 / 3, 0.0, 1.0])
    by_ratio = choose_thresholds("label_ratio", y, probs, train_ratios=ratios)
    assert by_ratio.tolist() == label_ratio_thresholds(probs, ratios).tolist()
    assert (probs >= by_ratio).sum(axis=0).tolist() == [3, 2, 0, 6]
    single = choose_thresholds("global", y, probs)
    assert single.tolist() == [global_threshold(y, probs)] * 4

    record = threshold_record(per_class, y, names, 0.37, 2, True)
    assert record == {"thresholds": dict(zip(names, [0.37, 0.2, 0.37, 0.45], strict=True)),
                      "strategy": "per_class_f1", "tuned_on": "val", "tta": 1, "default": 0.37, "min_positives": 2,
                      "ensure_one": True, "tuned_classes": ["one_neg", "all"],
                      "default_classes": {"one_pos": 1, "none": 0}}
    json.dumps(record, allow_nan=False)
    for strategy, thresholds in (("label_ratio", by_ratio), ("global", single)):
        record = threshold_record(thresholds, y, names, 0.5, 5, False, strategy=strategy)
        assert record["strategy"] == strategy and record["tuned_classes"] == names
        assert record["default_classes"] == {} and record["ensure_one"] is False and record["min_positives"] == 5
        assert list(record["thresholds"].values()) == thresholds.tolist()
    for short_names, short_thresholds, short_targets, counts in ((names[:3], per_class, y, "3, 4 and 4"),
                                                                  (names, per_class[:3], y, "4, 3 and 4"),
                                                                  (names, per_class, y[:, :3], "4, 4 and 3")):
        with pytest.raises(ValueError) as raised:  # one name and one threshold per class
            threshold_record(short_thresholds, short_targets, short_names, 0.5, 1, False)
        n_names, n_thresholds, n_classes = counts.replace(" and", ",").split(", ")
        assert str(raised.value) == (f"{n_names} class names for {n_thresholds} thresholds and {n_classes} classes of "
                                     "targets")
    # min_positives: a class with exactly that many positives is tuned, and it is at least 1 (class "one_pos")
    assert threshold_record(per_class, y, names, 0.5, 5, True)["default_classes"] == {"one_pos": 1, "none": 0}
    assert threshold_record(per_class, y, names, 0.5, 6, True)["default_classes"] == {"one_pos": 1, "one_neg": 5,
                                                                                        "none": 0}
    assert threshold_record(per_class, y, names, 0.5, 0, True)["default_classes"] == {"none": 0}
    written = threshold_record([1, 0, 1, 1], y, names, 1, 1, 1)
    assert all(type(v) is float for v in [*written["thresholds"].values(), written["default"]])
    assert written["ensure_one"] is True and type(written["min_positives"]) is int
    new_y, new_probs = _data(9, 40, 4)
    for thresholds in (per_class, by_ratio, single):
        out = summarize(new_y, new_probs, thresholds=thresholds)
        expected = f1_score(new_y, new_probs >= thresholds, average=None, zero_division=0)
        np.testing.assert_allclose(out["per_class_f1_tuned"], expected, rtol=0, atol=FLOAT32_TOL)


def test_one_sample_and_one_class_are_not_special_cases() -> None:
    # One sample: class 0 right at 0.8 (F1 1), class 1 without positives (0 whatever the cut): macro 1/2 from 0.8
    # down; of those cuts, the midpoint 0.55 is the one closest to 0.5
    assert global_threshold([[1, 0]], [[0.8, 0.3]]) == mid(0.8, 0.3)
    assert global_threshold([[1], [0], [1]], [[0.9], [0.2], [0.6]]) == mid(0.6, 0.2)  # one class
    out = summarize([[1], [0], [1]], [[0.9], [0.2], [0.4]], thresholds=[0.3])
    assert out["per_class_f1"] == [pytest.approx(2 / 3)] and out["per_class_f1_tuned"] == [1.0]
    assert out["per_class_roc_auc"] == [1.0] and out["per_class_average_precision"] == [1.0]


def test_float32_scores_are_cut_in_float64() -> None:
    """A threshold between two float32 scores is their float64 midpoint (a float32 one could round onto either)."""
    probs = np.array([[0.7], [0.4]], dtype=np.float32)
    in_float64 = [mid(float(probs[0, 0]), float(probs[1, 0]))]
    assert tune_thresholds([[1], [0]], probs).tolist() == in_float64
    assert label_ratio_thresholds(torch.from_numpy(probs), [0.5]).tolist() == in_float64


def test_no_class_with_a_defined_score_is_none_without_warnings() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" would land in every training log
        out = summarize(np.zeros((4, 2)), np.full((4, 2), 0.3))
        assert math.isnan(roc_auc_valid_classes(np.ones((4, 2)), np.full((4, 2), 0.3))[0])
    assert out["roc_auc"] is None and out["mean_average_precision"] is None and out["n_ap_classes"] == 0
    assert out["per_class_average_precision"] == [None, None]


def test_a_grid_of_one_threshold_is_that_threshold() -> None:
    assert tune_thresholds([[1], [0]], [[0.9], [0.1]], grid=[0.3]).tolist() == [0.3]


TWO_ARGUMENTS = {  # function of (targets, scores or decisions) -> the name its second argument goes by
    "per_class_f1": (per_class_f1, "preds"),
    "macro_f1": (macro_f1, "preds"),
    "roc_auc_valid_classes": (roc_auc_valid_classes, "probs"),
    "tune_thresholds": (tune_thresholds, "probs"),
    "global_threshold": (global_threshold, "probs"),
    "summarize": (summarize, "probs"),
    "choose_thresholds per_class_f1": (lambda y, p: choose_thresholds("per_class_f1", y, p), "probs"),
    "choose_thresholds global": (lambda y, p: choose_thresholds("global", y, p), "probs"),
}


@pytest.mark.parametrize("name", TWO_ARGUMENTS)
def test_every_function_names_the_argument_it_refuses(name: str) -> None:
    """The messages name the argument as the caller knows it (targets / probs / preds)."""
    function, second = TWO_ARGUMENTS[name]
    good_y, good = np.zeros((3, 2)), np.zeros((3, 2)) if second == "preds" else np.full((3, 2), 0.5)
    cases = [((np.zeros(3), good), "targets must be a 2-D (N, C) array, got shape (3,)"),
             ((np.full((3, 2), 2), good), "targets must contain only 0/1 values"),
             ((good_y, np.zeros(3)), f"{second} must be a 2-D (N, C) array, got shape (3,)"),
             ((good_y, np.zeros((3, 3))), f"targets and {second} must have the same shape, got (3, 2) and (3, 3)"),
             ((good_y, np.full((3, 2), np.inf if second == "probs" else 0.5)),
              "probs must be finite" if second == "probs" else "preds must contain only 0/1 values")]
    for (y, p), message in cases:
        with pytest.raises(ValueError) as raised:
            function(y, p)
        assert str(raised.value) == message


@pytest.mark.parametrize("function", [lambda p: decide(p, 0.5), lambda p: label_ratio_thresholds(p, [0.5, 0.5]),
                                      lambda p: choose_thresholds("label_ratio", None, p, train_ratios=[0.5, 0.5])])
def test_functions_of_scores_alone_name_probs(function) -> None:
    for probs, message in ((np.zeros(2), "probs must be a 2-D (N, C) array, got shape (2,)"),
                           (np.full((3, 2), np.nan), "probs must be finite")):
        with pytest.raises(ValueError) as raised:
            function(probs)
        assert str(raised.value) == message
    with pytest.raises(ValueError) as raised:
        threshold_record([0.5, 0.5], [[0.5, 1]], ["a", "b"], 0.5, 1, False)
    assert str(raised.value) == "targets must contain only 0/1 values"


def test_format_score() -> None:
    from hpa_lightning.metrics import format_score

    assert format_score(None) == "n/a" and format_score(0.123456) == "0.1235" and format_score(1) == "1.0000"


def test_tensors_that_require_grad_are_read_as_values() -> None:
    y, probs = _edge_case_data()
    scores = torch.tensor(probs, requires_grad=True)
    assert summarize(torch.tensor(y), scores) == summarize(y, probs)

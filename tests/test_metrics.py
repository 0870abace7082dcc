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
    targets[:, 0] = 0  # a class without positives counts as F1 0, as sklearn's zero_division=0
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

"""K-fold splits of train+val with the test split held out unchanged (data.split.folds / data.split.fold)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import KFold

from hpa_lightning.classes import KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES
from hpa_lightning.data.split import fold_split, stratified_split
from hpa_lightning.errors import DataError


def kaggle_like_labels(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    prior = np.asarray(KAGGLE_TRAIN_COUNTS) / KAGGLE_TRAIN_SAMPLES
    labels = (rng.random((n, 28)) < prior).astype(np.uint8)
    labels[labels.sum(axis=1) == 0, 0] = 1  # every image has a location
    return labels


def test_folds_cover_train_val_once_and_keep_the_test_split() -> None:
    labels = kaggle_like_labels(1500)
    plain = stratified_split(labels, 0.1, 0.1, seed=7)
    folds = [fold_split(labels, 0.1, 0.1, 5, k, seed=7) for k in range(5)]
    for assignment in folds:
        np.testing.assert_array_equal(assignment == "test", plain == "test")  # one test split for every fold
    vals = [np.flatnonzero(a == "val") for a in folds]
    pool = np.flatnonzero(plain != "test")
    np.testing.assert_array_equal(np.sort(np.concatenate(vals)), pool)  # each train+val sample in one val fold
    assert all(abs(len(v) - len(pool) / 5) <= 0.1 * len(pool) / 5 for v in vals)  # iterative stratification: near equal
    assert all(set(np.flatnonzero(a == "train")) == set(pool) - set(v) for a, v in zip(folds, vals, strict=True))


def test_folds_are_stratified_better_than_plain_k_fold() -> None:
    """The class ratios of the val folds stay closer to the pool's than those of an unstratified KFold."""
    labels = kaggle_like_labels(1500, seed=1)
    pool = np.flatnonzero(stratified_split(labels, 0.1, 0.1, seed=3) != "test")
    ratios = labels[pool].mean(axis=0)

    def deviation(val_sets: list[np.ndarray]) -> float:
        return float(np.mean([np.abs(labels[v].mean(axis=0) - ratios).sum() for v in val_sets]))

    stratified = [np.flatnonzero(fold_split(labels, 0.1, 0.1, 5, k, seed=3) == "val") for k in range(5)]
    random = [pool[val] for _, val in KFold(5, shuffle=True, random_state=3).split(pool)]
    assert deviation(stratified) < 0.5 * deviation(random)


def test_copies_of_one_image_stay_in_one_fold() -> None:
    labels = kaggle_like_labels(600, seed=2)
    groups = np.arange(600)
    groups[300:330] = np.arange(30)  # rows 300..329 are copies of rows 0..29
    for k in range(4):
        assignment = fold_split(labels, 0.1, 0.1, 4, k, seed=0, groups=groups)
        assert (assignment[300:330] == assignment[:30]).all()


@pytest.mark.parametrize(("folds", "fold", "message"), [
    (1, 0, "data.split.folds=1: expected a whole number >= 2"),
    (5, 5, "data.split.fold=5: expected 0..4 for data.split.folds=5"),
    (5, -1, "data.split.fold=-1: expected 0..4"),
])
def test_bad_fold_settings_are_one_line(folds: int, fold: int, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        fold_split(kaggle_like_labels(100), 0.1, 0.1, folds, fold, seed=0)

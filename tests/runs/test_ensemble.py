"""Ensembles of finished runs from their saved predictions: folds out of fold, shared splits averaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import f1_score

from hpa_lightning.errors import DataError
from hpa_lightning.metrics import choose_thresholds
from hpa_lightning.runs.ensemble import ensemble_evaluation, member_runs
from hpa_lightning.runs.outputs import write_predictions

C = 28


Predictions = tuple[list[str], np.ndarray, np.ndarray]


def fake_run(folder: Path, val: Predictions, test: Predictions, strategy: str = "per_class_f1") -> Path:
    folder.mkdir(parents=True)
    for name, (ids, probs, targets) in (("val", val), ("test", test)):
        write_predictions(folder / f"{name}_predictions.csv", ids, probs, targets, (probs >= 0.5).astype(np.uint8))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml({"thresholds": {"default": 0.5, "ensure_one": False,
                                                                          "min_positives": 1, "strategy": strategy}}))
    (folder / "results.json").write_text("{}")
    return folder


def split(rng: np.random.Generator, ids: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    targets = (rng.random((len(ids), C)) < 0.2).astype(np.uint8)
    return ids, np.clip(targets * 0.3 + rng.random((len(ids), C)) * 0.7, 0, 1).round(6), targets


def test_folds_tune_on_the_concatenated_out_of_fold_predictions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    test_ids = [f"t{i}" for i in range(40)]
    _, _, test_targets = split(rng, test_ids)
    runs, vals, test_probs = [], [], []
    for k in range(3):
        val = split(rng, [f"f{k}_{i}" for i in range(30)])
        probs = rng.random((40, C)).round(6)
        order = rng.permutation(40)  # each run may list the test Ids in its own order
        runs.append(fake_run(tmp_path / "sweep" / f"{k}_fold{k}", val,
                             ([test_ids[i] for i in order], probs[order], test_targets[order])))
        vals.append(val)
        test_probs.append(probs)
    assert member_runs([tmp_path / "sweep"]) == runs
    evaluation = ensemble_evaluation(runs, weights=[1, 1, 2])
    assert evaluation["validation"] == "out_of_fold"
    oof_targets = np.concatenate([v[2] for v in vals])
    oof_probs = np.concatenate([v[1] for v in vals])
    np.testing.assert_allclose(evaluation["thresholds"], choose_thresholds("per_class_f1", oof_targets, oof_probs))
    order = [test_ids.index(i) for i in evaluation["test_ids"]]  # the first member's order
    mean = ((test_probs[0] + test_probs[1] + 2 * test_probs[2]) / 4)[order]
    np.testing.assert_allclose(evaluation["test_probs"], mean, atol=1e-6)
    assert evaluation["test"]["macro_f1"] == pytest.approx(
        f1_score(test_targets[order], (mean >= 0.5).astype(int), average="macro", zero_division=0), abs=1e-6)


def test_runs_on_one_split_average_their_validation_too(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    val, test = split(rng, [f"v{i}" for i in range(30)]), split(rng, [f"t{i}" for i in range(20)])
    other_val = (val[0], rng.random((30, C)).round(6), val[2])
    runs = [fake_run(tmp_path / "a", val, test, "global"), fake_run(tmp_path / "b", other_val, test)]
    evaluation = ensemble_evaluation(runs)
    assert evaluation["validation"] == "shared" and evaluation["thresholds_strategy"] == "global"
    expected = choose_thresholds("global", val[2], (val[1] + other_val[1]) / 2)
    np.testing.assert_allclose(evaluation["thresholds"], expected)


def test_members_of_different_splits_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    test = split(rng, [f"t{i}" for i in range(20)])
    a = fake_run(tmp_path / "a", split(rng, ["x", "y", "z"]), test)
    b = fake_run(tmp_path / "b", split(rng, ["y", "z", "w"]), test)
    with pytest.raises(DataError, match="neither coincide nor partition"):
        ensemble_evaluation([a, b])
    c = fake_run(tmp_path / "c", split(rng, ["p", "q"]), split(rng, [f"u{i}" for i in range(20)]))
    with pytest.raises(DataError, match="other Ids than the first member"):
        ensemble_evaluation([a, c])
    with pytest.raises(DataError, match="weights=1,2: expected 3 numbers"):
        ensemble_evaluation([a, b, c], weights=[1, 2])

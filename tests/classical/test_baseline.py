"""The classical baselines: feature extraction, constant classes, configs, and both models through the entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.lib.format import open_memmap
from sklearn.linear_model import LogisticRegression

from hpa_lightning.classes import CLASS_NAMES
from hpa_lightning.classical.features import FeatureSpec, area_weights, extract_features
from hpa_lightning.classical.one_vs_all import fit_predict_one_vs_all
from hpa_lightning.classical.pipeline import BASELINE_MODELS
from hpa_lightning.classical.pipeline import run_baseline as run_baseline_in_process
from hpa_lightning.data.split import channel_stats
from hpa_lightning.errors import ConfigError
from tests.conftest import REPO, assert_metrics_equal_sklearn, compose_config

TINY_DATA = ["data.synthetic.n=240", "data.synthetic.size=48", "data.image_size=32", "data.num_workers=0"]


@pytest.fixture
def images(tmp_path: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    array = open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(11, 4, 12, 12))
    array[:] = rng.integers(0, 256, array.shape, dtype=np.uint8)
    array.flush()
    return np.load(tmp_path / "images.npy", mmap_mode="r")


MEAN, STD = [0.5, 0.4, 0.3, 0.2], [0.25, 0.2, 0.15, 0.1]


def standardised(cells: np.ndarray) -> np.ndarray:
    """(n, 4, g, g) cell means in [0, 255] -> the expected (n, 4 * g * g) features."""
    m, s = np.array(MEAN)[None, :, None, None], np.array(STD)[None, :, None, None]
    return ((cells / 255.0 - m) / s).reshape(len(cells), -1)


def test_area_weights_average_by_area() -> None:
    weights = area_weights(12, 5)
    assert weights.shape == (5, 12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(area_weights(12, 4), np.kron(np.eye(4), np.full((1, 3), 1 / 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="grid=13"):
        area_weights(12, 13)


def test_features_are_standardised_block_means_in_row_order(images: np.ndarray) -> None:
    rows = np.array([7, 2, 9, 0, 5, 2])  # unsorted, with a repeat: output follows `rows`
    features = extract_features(images, rows, MEAN, STD, FeatureSpec(grid=4, chunk=4))
    assert features.dtype == np.float32 and features.shape == (6, 4 * 4 * 4)
    block_means = images[rows].astype(np.float64).reshape(6, 4, 4, 3, 4, 3).mean(axis=(3, 5))
    np.testing.assert_allclose(features, standardised(block_means), rtol=1e-5, atol=1e-5)


def test_features_non_divisible_grid_is_exact_area_average(images: np.ndarray) -> None:
    rows = np.arange(len(images))
    features = extract_features(images, rows, MEAN, STD, FeatureSpec(grid=5))
    # Repeating each pixel 5x5 makes 60 px sides; 12x12 blocks of that are exactly the fractional-area cells.
    upsampled = np.repeat(np.repeat(images[rows].astype(np.float64), 5, axis=2), 5, axis=3)
    cells = upsampled.reshape(len(rows), 4, 5, 12, 5, 12).mean(axis=(3, 5))
    np.testing.assert_allclose(features, standardised(cells), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("intensity_stats", [False, True])
def test_chunked_equals_unchunked(images: np.ndarray, intensity_stats: bool) -> None:
    rows = np.array([10, 3, 4, 1, 8, 6, 0])
    whole = extract_features(images, rows, MEAN, STD, FeatureSpec(grid=3, chunk=1000, intensity_stats=intensity_stats))
    for chunk in (1, 2, 3):
        chunked = extract_features(images, rows, MEAN, STD,
                                   FeatureSpec(grid=3, chunk=chunk, intensity_stats=intensity_stats))
        np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_intensity_stats(images: np.ndarray) -> None:
    spec = FeatureSpec(grid=2, intensity_stats=True, percentiles=(5, 50))
    rows = np.array([4, 1])
    features = extract_features(images, rows, MEAN, STD, spec)
    names = spec.names()
    assert features.shape == (2, spec.n_features()) == (2, len(names)) == (2, 4 * (4 + 4))
    pixels = images[rows].reshape(2, 4, -1).astype(np.float64) / 255.0
    m, s = np.array(MEAN), np.array(STD)
    column = {name: features[:, i] for i, name in enumerate(names)}
    for c, channel in enumerate(("red", "green", "blue", "yellow")):
        np.testing.assert_allclose(column[f"{channel}_mean"], (pixels[:, c].mean(1) - m[c]) / s[c], rtol=1e-5)
        np.testing.assert_allclose(column[f"{channel}_std"], pixels[:, c].std(1) / s[c], rtol=1e-4)
        np.testing.assert_allclose(column[f"{channel}_p50"], (np.median(pixels[:, c], 1) - m[c]) / s[c], rtol=1e-5)


def test_train_statistics_centre_the_train_features(images: np.ndarray) -> None:
    train = np.array([0, 2, 3, 5, 6, 9, 10])
    mean, std = channel_stats(images, train)
    features = extract_features(images, train, mean, std, FeatureSpec(grid=1))
    np.testing.assert_allclose(features.mean(axis=0), 0.0, atol=1e-5)  # grid 1: the images' channel means


def test_constant_classes_need_no_model() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = np.zeros((60, 4), dtype=np.uint8)
    y[:, 0] = x[:, 0] > 0
    y[:, 2] = 1  # every train sample positive
    y[:, 3] = x[:, 1] + 0.3 * rng.normal(size=60) > 0.5  # class 1 has no positives
    result = fit_predict_one_vs_all(LogisticRegression(), x, y, [x[:10], x[10:30]])
    assert result.without_positives == [1] and result.all_positive == [2]
    assert [p.shape for p in result.probs] == [(10, 4), (20, 4)]
    for probs in result.probs:
        assert (probs[:, 1] == 0).all() and (probs[:, 2] == 1).all()
    reference = LogisticRegression().fit(x, y[:, 3]).predict_proba(x[10:30])[:, 1]
    np.testing.assert_allclose(result.probs[1][:, 3], reference)
    assert result.fit_s > 0 and result.predict_s > 0


@pytest.mark.parametrize("model", ["logreg", "random_forest"])
def test_model_override_composes(model: str) -> None:
    cfg = compose_config([f"model={model}"], "baseline")
    assert cfg.model.name == model and cfg.experiment_name == f"baseline_{model}"
    target = {"logreg": "sklearn.linear_model.LogisticRegression",
              "random_forest": "sklearn.ensemble.RandomForestClassifier"}[model]
    assert cfg.model.estimator._target_ == target and cfg.model.estimator.random_state == cfg.seed
    assert cfg.data.synthetic.n == 3000 and cfg.data.image_size == 64  # the deep models' demo data
    assert cfg.features.grid == 8


def test_model_options_are_the_baseline_model_files() -> None:
    assert sorted(BASELINE_MODELS) == sorted(p.stem for p in (REPO / "conf" / "baseline_model").glob("*.yaml"))
    assert {"logreg", "random_forest"} <= set(BASELINE_MODELS)


def run_baseline(args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPA_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "hpa_lightning.baseline", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


RUN_ARGS = {
    "logreg": ["model=logreg"],
    # A subset of each split, small enough that some rare classes have no train positives.
    "random_forest": ["model=random_forest", "model.estimator.n_estimators=8", "model.estimator.n_jobs=1",
                      "features.intensity_stats=true", "data.max_samples=100"],
}


@pytest.fixture(scope="module", params=sorted(RUN_ARGS))
def baseline_run(request: pytest.FixtureRequest, shared_cache: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    model = request.param
    run_dir = tmp_path_factory.mktemp("baseline_runs") / model
    proc = run_baseline([*RUN_ARGS[model], *TINY_DATA, f"hydra.run.dir={run_dir}"], shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run folder: {run_dir}" in proc.stdout and "test macro F1 @0.5" in proc.stdout
    return model, run_dir


@pytest.mark.slow
def test_baseline_run_folder(baseline_run: tuple[str, Path]) -> None:
    model, run_dir = baseline_run
    for name in ("results.json", "test_predictions.csv", "split.csv", "thresholds.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["model"] == model
    assert results["experiment"] == f"baseline_{model}"
    assert results["loss"] is None and results["gamma"] is None and results["scheduler"] == "none"
    assert results["device"] == "cpu" and results["seed"] == 42 and results["image_size"] == 32
    assert results["class_names"] == list(CLASS_NAMES) and len(results["thresholds"]) == 28
    assert set(results["timings_s"]) >= {"features", "fit", "predict"} and results["wall_time_s"] > 0
    assert results["features"]["count"] == (292 if model == "random_forest" else 256)
    for name in ("val", "test"):
        assert {"macro_f1", "macro_f1_tuned", "roc_auc", "macro_f1_classes_ge20"} <= set(results[name])
    split = pd.read_csv(run_dir / "split.csv")
    counts = split["split"].value_counts().to_dict()
    if model == "logreg":  # the full splits, as the deep runs use them
        assert results["data"]["split"] == {name: counts[name] for name in ("train", "val", "test")}


@pytest.mark.slow
def test_baseline_metrics_equal_sklearn_on_saved_predictions(baseline_run: tuple[str, Path]) -> None:
    _, run_dir = baseline_run
    results = json.loads((run_dir / "results.json").read_text())
    predictions = pd.read_csv(run_dir / "test_predictions.csv")
    assert list(predictions.columns) == (["Id"] + [f"prob_{c}" for c in range(28)] + [f"true_{c}" for c in range(28)]
                                         + ["Predicted"])
    split = pd.read_csv(run_dir / "split.csv")
    assert predictions["Id"].is_unique
    assert set(predictions["Id"]) <= set(split.loc[split["split"] == "test", "Id"])
    assert results["test"]["n_samples"] == len(predictions) == results["data"]["split"]["test"]
    thresholds, decided = assert_metrics_equal_sklearn(run_dir, results, predictions)
    np.testing.assert_allclose(thresholds, results["thresholds"])
    predicted = [" ".join(str(c) for c in np.flatnonzero(row)) for row in decided]
    assert predictions["Predicted"].fillna("").astype(str).tolist() == predicted


@pytest.mark.slow
def test_classes_without_train_positives_are_reported(baseline_run: tuple[str, Path]) -> None:
    model, run_dir = baseline_run
    results = json.loads((run_dir / "results.json").read_text())
    store = Path(results["data"]["store"])
    split = pd.read_csv(run_dir / "split.csv")
    train_rows = np.flatnonzero(split["split"] == "train")[: results["data"]["split"]["train"]]
    expected = np.flatnonzero(np.load(store / "labels.npy")[train_rows].sum(axis=0) == 0).tolist()
    assert results["classes_without_train_positives"] == expected
    if model == "random_forest":  # data.max_samples leaves rare classes without train positives
        assert expected
        predictions = pd.read_csv(run_dir / "test_predictions.csv")
        assert (predictions[[f"prob_{c}" for c in expected]].to_numpy() == 0).all()


@pytest.mark.parametrize(("override", "message"), [
    ("features.grid=0", "features.grid=0: expected an integer >= 1"),
    ("features.grid=33", "features.grid=33: larger than data.image_size=32"),
    ("features.chunk=many", "features.chunk='many': expected an integer >= 1"),
    ("features.percentiles=[50,101]", r"features.percentiles=\[50, 101\]: expected a list of numbers in \[0, 100\]"),
    ("model.estimator.C=-1", r"model.estimator: The 'C' parameter of LogisticRegression must be a float"),
    ("+model.estimator.trees=3", r"model.estimator: .*unexpected keyword argument 'trees'"),
    ("model.estimator._target_=sklearn.svm.SVC ~model.estimator.solver", "not a classifier with predict_proba"),
    ("model=resnet18", r"model=resnet18: not a baseline \(no model.estimator._target_\); choose one of logreg"),
    ("thresholds.default=2", r"thresholds.default=2: expected a number in \[0, 1\]"),
    ("thresholds.strategy=best", "thresholds.strategy='best': expected one of per_class_f1, label_ratio, global"),
])
def test_bad_config_value_is_rejected_before_any_work(override: str, message: str) -> None:
    cfg = compose_config([*override.split(), *TINY_DATA], "baseline")
    with pytest.raises(ConfigError, match=message):
        run_baseline_in_process(cfg)


@pytest.mark.slow
def test_bad_config_is_one_clear_line(tmp_path: Path) -> None:
    proc = run_baseline(["features.grid=0", *TINY_DATA, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: features.grid=0: expected an integer >= 1"
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "cache").exists()  # rejected before any data is generated

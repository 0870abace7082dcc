"""The poster's classical baselines: 28 one-vs-all scikit-learn classifiers on downsampled RGBY images.

    python -m hpa_lightning.baseline model=logreg          # one logistic regression per class
    python -m hpa_lightning.baseline model=random_forest   # one random forest per class
    python -m hpa_lightning.baseline model=random_forest model.estimator.n_estimators=50 features.grid=16

Same data path as `hpa_lightning.train`: the data config's packed store, stratified split, sample rows
(`data.max_samples` included) and train-only channel statistics. Each channel of the uint8 image is area-averaged
to `features.grid` x `features.grid` cells and standardised with the train mean/std (optionally with per-channel
intensity statistics), streamed from the memory map in chunks into float32. One classifier per class is fitted
on train (a class with no train positives predicts probability 0, one with only positives probability 1), the
per-class thresholds are tuned on val and the run folder has the layout of a deep run: results.json (written
last), test_predictions.csv, thresholds.json, split.csv, config.yaml.

The `model` options are the files of conf/baseline_model/, registered below as the `model` group of this entry
point's config (conf/model/ holds the deep models of `hpa_lightning.train`). Any scikit-learn classifier with
`predict_proba` can be used through `model.estimator._target_`. Returns the val macro F1 (at 0.5) for sweepers.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from sklearn.base import clone, is_classifier
from sklearn.exceptions import ConvergenceWarning

from hpa_lightning.classes import CHANNELS
from hpa_lightning.cli import hydra_task, run_hydra
from hpa_lightning.run_outputs import plain, write_evaluation, write_results
from hpa_lightning.sources import DataError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf" / "baseline_model"
SPLITS = ("train", "val", "test")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


USER_ERRORS = (DataError, ConfigError)


def register_model_configs(folder: Path = MODEL_CONFIG_DIR) -> list[str]:
    """Make conf/baseline_model/NAME.yaml selectable as `model=NAME` (the group name the user types)."""
    store = ConfigStore.instance()
    names = []
    for path in sorted(folder.glob("*.yaml")):
        store.store(group="model", name=path.stem, node=OmegaConf.load(path), provider="hpa_lightning.baseline")
        names.append(path.stem)
    return names


BASELINE_MODELS = register_model_configs()


# ----------------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureSpec:
    grid: int = 8
    intensity_stats: bool = False
    percentiles: tuple[float, ...] = (1, 5, 25, 50, 75, 95, 99)
    chunk: int = 512

    def n_features(self, channels: int = len(CHANNELS)) -> int:
        return channels * (self.grid * self.grid + (2 + len(self.percentiles) if self.intensity_stats else 0))

    def names(self, channels: Sequence[str] = CHANNELS) -> list[str]:
        """Column names in the order `extract_features` writes them."""
        out = [f"{ch}_r{r}c{c}" for ch in channels for r in range(self.grid) for c in range(self.grid)]
        if self.intensity_stats:
            stats = ["mean", "std", *(f"p{q:g}" for q in self.percentiles)]
            out += [f"{ch}_{s}" for ch in channels for s in stats]
        return out


def area_weights(size: int, grid: int) -> np.ndarray:
    """(grid, size) matrix averaging `size` pixels into `grid` equal cells by area.

    Cell i covers [i * size / grid, (i + 1) * size / grid); a pixel straddling a border contributes to both cells in
    proportion to its overlap (PIL's BOX / OpenCV's INTER_AREA downsampling). Every row sums to 1, so
    `W @ image @ W.T` is the mean of each cell; with `size % grid == 0` it is the plain block mean.
    """
    if not 1 <= grid <= size:
        raise ValueError(f"grid={grid} must be in [1, {size}]")
    edges = np.arange(grid + 1, dtype=np.float64) * (size / grid)
    left = np.arange(size, dtype=np.float64)
    overlap = np.minimum(left[None, :] + 1, edges[1:, None]) - np.maximum(left[None, :], edges[:-1, None])
    return (np.clip(overlap, 0.0, None) * (grid / size)).astype(np.float32)


def extract_features(images: np.ndarray, rows: np.ndarray, mean: Sequence[float], std: Sequence[float],
                     spec: FeatureSpec = FeatureSpec()) -> np.ndarray:
    """float32 features ``(len(rows), n_features)`` of `images[rows]` (uint8 ``(N, C, S, S)``, usually a memory map).

    Per chunk of `spec.chunk` rows (read in ascending row order, written back in the order of `rows`): each channel
    area-averaged to ``grid x grid`` cells, in [0, 1] units, standardised with the per-channel `mean`/`std`
    (train statistics in [0, 1] units); with `intensity_stats` also each channel's mean and percentiles
    (standardised the same way) and std (divided by the channel std). Peak extra memory is about one chunk as
    float32; nothing of the dataset is held beyond the float32 output.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (N, C, S, S), got shape {images.shape}")
    if spec.chunk < 1:
        raise ValueError(f"chunk={spec.chunk} must be >= 1")
    channels, size = images.shape[1], images.shape[2]
    weights = area_weights(size, spec.grid)
    mu = np.asarray(mean, dtype=np.float32).reshape(1, channels, 1)
    sigma = np.asarray(std, dtype=np.float32).reshape(1, channels, 1)
    percentiles = np.asarray(spec.percentiles, dtype=np.float64)
    out = np.empty((len(rows), spec.n_features(channels)), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    for start in range(0, len(rows), spec.chunk):
        positions = order[start:start + spec.chunk]
        raw = images[rows[positions]]  # uint8 (B, C, S, S), one sequential read
        pixels = raw.astype(np.float32)
        pooled = (weights @ pixels @ weights.T).reshape(len(positions), channels, -1) / 255.0
        parts = [((pooled - mu) / sigma).reshape(len(positions), -1)]
        if spec.intensity_stats:
            flat = pixels.reshape(len(positions), channels, -1)
            levels = [flat.mean(axis=-1, keepdims=True)]  # (B, C, 1) each, in [0, 255]
            spread = flat.std(axis=-1, keepdims=True) / 255.0
            if len(percentiles):
                quantiles = np.percentile(raw.reshape(len(positions), channels, -1), percentiles, axis=-1)
                levels.append(np.moveaxis(quantiles, 0, -1))  # (B, C, P)
            level = (np.concatenate(levels, axis=-1) / 255.0 - mu) / sigma
            stats = np.concatenate([level[..., :1], spread / sigma, level[..., 1:]], axis=-1)  # mean, std, p...
            parts.append(stats.reshape(len(positions), -1))
        out[positions] = np.concatenate(parts, axis=1)
    return out


# ------------------------------------------------------------------------------------------- one-vs-all models


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


# ------------------------------------------------------------------------------------------------ configuration


def _int_at_least(node: Mapping, key: str, where: str, low: int) -> int:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}.{key}={value!r}: expected an integer >= {low}")
    return value


def feature_spec(cfg: DictConfig) -> FeatureSpec:
    node = cfg.get("features")
    if not isinstance(node, Mapping):
        raise ConfigError(f"features={node!r}: expected a mapping with grid, intensity_stats, percentiles, chunk")
    unknown = set(node) - {"grid", "intensity_stats", "percentiles", "chunk"}
    if unknown:
        raise ConfigError(f"features: unknown keys {sorted(unknown)}; expected grid, intensity_stats, percentiles, "
                          f"chunk")
    grid = _int_at_least(node, "grid", "features", 1)
    image_size = cfg.data.get("image_size")
    if isinstance(image_size, int) and grid > image_size:
        raise ConfigError(f"features.grid={grid}: larger than data.image_size={image_size}")
    chunk = _int_at_least(node, "chunk", "features", 1)
    intensity_stats = node.get("intensity_stats", False)
    if not isinstance(intensity_stats, bool):
        raise ConfigError(f"features.intensity_stats={intensity_stats!r}: expected true or false")
    percentiles = node.get("percentiles") or []
    if isinstance(percentiles, ListConfig):
        percentiles = OmegaConf.to_container(percentiles, resolve=True)
    if not isinstance(percentiles, list) or not all(
            isinstance(q, int | float) and not isinstance(q, bool) and 0 <= q <= 100 for q in percentiles):
        raise ConfigError(f"features.percentiles={percentiles!r}: expected a list of numbers in [0, 100]")
    return FeatureSpec(grid=grid, intensity_stats=intensity_stats, percentiles=tuple(float(q) for q in percentiles),
                       chunk=chunk)


def build_estimator(cfg: DictConfig) -> Any:
    """The per-class scikit-learn classifier of `model.estimator`, with its parameters validated up front."""
    choice = cfg.model.get("name", "?") if isinstance(cfg.get("model"), Mapping) else cfg.get("model")
    node = cfg.model.get("estimator") if isinstance(cfg.get("model"), Mapping) else None
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ConfigError(f"model={choice}: not a baseline (no model.estimator._target_); choose one of "
                          f"{', '.join(BASELINE_MODELS)}")
    params = dict(plain(node))
    target = params.pop("_target_")
    private = sorted(k for k in params if str(k).startswith("_"))
    if private:
        raise ConfigError(f"model.estimator: unsupported keys {private}; give the classifier's parameters only")
    try:
        cls = get_class(str(target))
    except Exception as err:  # ImportError / ValueError with Hydra's explanation
        raise ConfigError(f"model.estimator._target_={target!r}: {' '.join(str(err).split())}") from None
    try:
        estimator = cls(**params)
        validate = getattr(estimator, "_validate_params", None)  # scikit-learn's own parameter checks
        if validate is not None:
            validate()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.estimator: {' '.join(str(err).split())}") from None
    if not is_classifier(estimator) or not hasattr(estimator, "predict_proba"):
        raise ConfigError(f"model.estimator._target_={target!r}: not a classifier with predict_proba")
    return estimator


def check_thresholds(cfg: DictConfig) -> tuple[float, bool]:
    """thresholds.default and thresholds.ensure_one, checked."""
    node = cfg.get("thresholds") or {}
    default, ensure_one = node.get("default", 0.5), node.get("ensure_one", True)
    if isinstance(default, bool) or not isinstance(default, int | float) or not 0 <= default <= 1:
        raise ConfigError(f"thresholds.default={default!r}: expected a number in [0, 1]")
    if not isinstance(ensure_one, bool):
        raise ConfigError(f"thresholds.ensure_one={ensure_one!r}: expected true or false")
    return float(default), ensure_one


# ------------------------------------------------------------------------------------------------------- a run


def run_baseline(cfg: DictConfig) -> dict:
    started = time.time()
    spec = feature_spec(cfg)
    estimator = build_estimator(cfg)
    check_thresholds(cfg)  # one line now rather than after the features and the fits
    min_pos = cfg.get("report_min_positives", 20)
    if isinstance(min_pos, bool) or not isinstance(min_pos, int) or min_pos < 1:
        raise ConfigError(f"report_min_positives={min_pos!r}: expected an integer >= 1")
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    if cfg.data.get("oversample"):
        log.warning("data.oversample only affects the deep models' sampler; the baselines fit every train sample "
                    "once (model.estimator.class_weight=balanced reweights classes instead)")
    tick = time.perf_counter()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    store, split = datamodule.store, datamodule.split
    if spec.grid > store.image_size:
        raise ConfigError(f"features.grid={spec.grid}: larger than the packed image size {store.image_size}")
    rows = {name: datamodule.datasets[name].indices for name in SPLITS}
    targets = {name: store.labels[rows[name]] for name in SPLITS}
    timings["data_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    images = store.images()
    features = {name: extract_features(images, rows[name], split.mean, split.std, spec) for name in SPLITS}
    del images
    timings["features_s"] = time.perf_counter() - tick
    log.info("features: %d per sample (grid %d, intensity stats %s) for %s samples in %.1fs",
             features["train"].shape[1], spec.grid, spec.intensity_stats,
             {n: len(f) for n, f in features.items()}, timings["features_s"])

    fitted = fit_predict_one_vs_all(estimator, features["train"], targets["train"], [features["val"], features["test"]])
    timings["fit_s"], timings["predict_s"] = fitted.fit_s, fitted.predict_s
    if fitted.without_positives:
        log.warning("classes without train positives (probability 0): %s", fitted.without_positives)
    if fitted.not_converged:
        log.warning("classes whose fit did not converge: %s", fitted.not_converged)
    val = {"targets": targets["val"], "probs": fitted.probs[0]}
    test = {"targets": targets["test"], "probs": fitted.probs[1]}

    tick = time.perf_counter()
    evaluation = write_evaluation(cfg, run_dir, val, test, datamodule.ids(rows["test"]), split.path)
    timings["evaluate_s"] = time.perf_counter() - tick

    estimator_cfg = dict(plain(cfg.model.estimator))
    results = {
        "status": "completed",
        "experiment": cfg.experiment_name,
        "model": cfg.model.name,
        "loss": None,
        "gamma": None,
        "scheduler": "none",
        "base_lr": None,
        "lr_ratios": None,
        "frozen_epochs": None,
        "image_size": datamodule.image_size,
        "pretrained_loaded": False,
        "device": "cpu",
        "precision": None,
        "seed": int(cfg.seed),
        "epochs": None,
        "best_checkpoint": None,
        "wall_time_s": round(time.time() - started, 2),
        "timings_s": {key.removesuffix("_s"): round(value, 3) for key, value in timings.items()},
        "estimator": {"class": estimator_cfg.pop("_target_"), "params": estimator_cfg},
        "features": {"count": int(features["train"].shape[1]), "grid": spec.grid,
                     "intensity_stats": spec.intensity_stats,
                     "percentiles": list(spec.percentiles) if spec.intensity_stats else [],
                     "standardised_with": "per-channel train mean/std in [0,1] units", "dtype": "float32"},
        "classes_without_train_positives": fitted.without_positives,
        "classes_all_train_positive": fitted.all_positive,
        "classes_not_converged": fitted.not_converged,
        "data": {"root": str(datamodule.root), "store": str(store.path),
                 "split": {n: len(rows[n]) for n in SPLITS}, "mean": list(split.mean), "std": list(split.std)},
        **evaluation,
    }
    return write_results(run_dir, results, min_pos, f"features {timings['features_s']:.1f}s  fit "
                         f"{timings['fit_s']:.1f}s  predict {timings['predict_s']:.1f}s  total "
                         f"{results['wall_time_s']:.1f}s")


@hydra.main(version_base="1.3", config_path="../conf", config_name="baseline")
@hydra_task
def main(cfg: DictConfig) -> float | None:
    try:
        results = run_baseline(cfg)
    except USER_ERRORS as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # let Hydra mark this job failed and go on with the others
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return results["val"]["macro_f1"]


if __name__ == "__main__":
    run_hydra(main)

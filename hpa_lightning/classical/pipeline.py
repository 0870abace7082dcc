"""One baseline run (usage: hpa_lightning/baseline.py): configuration checks, the features of every split, the 28
one-vs-all classifiers, thresholds tuned on val, and the run folder written by the shared writer (runs/outputs.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf
from sklearn.base import is_classifier

from hpa_lightning import CONF_DIR
from hpa_lightning.classical.features import FeatureSpec, extract_features
from hpa_lightning.classical.one_vs_all import fit_predict_one_vs_all
from hpa_lightning.errors import ConfigError
from hpa_lightning.runs.outputs import check_thresholds, plain, write_evaluation, write_results

log = logging.getLogger(__name__)


MODEL_CONFIG_DIR = CONF_DIR / "baseline_model"


SPLITS = ("train", "val", "test")


def register_model_configs(folder: Path = MODEL_CONFIG_DIR) -> list[str]:
    """Make conf/baseline_model/NAME.yaml selectable as `model=NAME` (the group name the user types)."""
    store = ConfigStore.instance()
    names = []
    for path in sorted(folder.glob("*.yaml")):
        store.store(group="model", name=path.stem, node=OmegaConf.load(path), provider="hpa_lightning.baseline")
        names.append(path.stem)
    return names


BASELINE_MODELS = register_model_configs()


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
    if cfg.data.get("store"):
        raise ConfigError(f"data.store={cfg.data.store}: the baselines read the memmap store's pixels at random; run "
                          f"them with data.store=null (data.root)")
    from hpa_lightning.data.datamodule import datamodule_from_config  # torch and Lightning: only once checked

    datamodule = datamodule_from_config(cfg.data)
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
    ids = {name: datamodule.ids(rows[name]) for name in ("val", "test")}
    evaluation = write_evaluation(cfg, run_dir, val, test, ids, split.path, targets["train"], datamodule.class_names)
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
        "recipe": None,
        "lr_ratios": None,
        "layer_decay": None,
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

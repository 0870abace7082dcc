"""What every finished run writes, deep model or baseline alike: thresholds tuned on val, test predictions, the split
and config it used, val/test summaries, results.json (last: its presence marks a finished run) and a summary line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from hpa_lightning import metrics
from hpa_lightning.errors import ConfigError
from hpa_lightning.files import write_json_atomic, write_text_atomic
from hpa_lightning.logs import summary
from hpa_lightning.runs import layout


def plain(node) -> object:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def target_name(node) -> str | None:
    """A short name for results and reports, from a node's `_target_` (config nodes carry no display name):
    `FocalLoss` -> focal, `bce_loss` -> bce, `LovaszHingeLoss` -> lovasz_hinge, `sgdr` -> sgdr, `MultiStepLR` ->
    multi_step_lr; a sum of losses joins its terms' names with `+`."""
    if not node or "_target_" not in node:
        return None
    if isinstance(node.get("losses"), (list, tuple)) and node["losses"]:  # a sum of losses, whatever class sums them
        return "+".join(str(target_name(term)) for term in node["losses"])
    last = str(node["_target_"]).rsplit(".", 1)[-1]
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", last).lower()
    return snake.removesuffix("_loss") or snake


def write_predictions(path: Path, ids: list[str], probs: np.ndarray, targets: np.ndarray,
                      decisions: np.ndarray) -> None:
    frame = pd.DataFrame({"Id": ids})
    frame = pd.concat([frame,
                       pd.DataFrame(probs, columns=[f"prob_{c}" for c in range(probs.shape[1])]),
                       pd.DataFrame(targets.astype(np.uint8), columns=[f"true_{c}" for c in range(probs.shape[1])])],
                      axis=1)
    frame["Predicted"] = [" ".join(str(c) for c in np.flatnonzero(row)) for row in decisions]
    write_text_atomic(path, frame.to_csv(index=False, float_format="%.6f"))


def split_summary(result: dict[str, np.ndarray], thresholds: np.ndarray, ensure_one: bool,
                  min_positives: int) -> dict:
    summary_ = metrics.summarize(result["targets"], result["probs"], thresholds=thresholds, ensure_one=ensure_one)
    positives = result["targets"].sum(axis=0)
    common = positives >= min_positives
    per_class = np.asarray(summary_["per_class_f1"])
    summary_["positives_per_class"] = positives.astype(int).tolist()
    summary_[f"macro_f1_classes_ge{min_positives}"] = float(per_class[common].mean()) if common.any() else None
    return summary_


def check_thresholds(cfg: DictConfig) -> dict:
    """cfg.thresholds checked (one line naming the key): default, ensure_one, min_positives, strategy."""
    node = cfg.get("thresholds") or {}
    default, ensure_one = node.get("default", 0.5), node.get("ensure_one", True)
    min_positives, strategy = node.get("min_positives", 1), node.get("strategy", "per_class_f1")
    if isinstance(default, bool) or not isinstance(default, int | float) or not 0 <= default <= 1:
        raise ConfigError(f"thresholds.default={default!r}: expected a number in [0, 1]")
    if not isinstance(ensure_one, bool):
        raise ConfigError(f"thresholds.ensure_one={ensure_one!r}: expected true or false")
    if isinstance(min_positives, bool) or not isinstance(min_positives, int) or min_positives < 0:
        raise ConfigError(f"thresholds.min_positives={min_positives!r}: expected a whole number >= 0")
    if strategy not in metrics.THRESHOLD_STRATEGIES:
        raise ConfigError(f"thresholds.strategy={strategy!r}: expected one of "
                          f"{', '.join(metrics.THRESHOLD_STRATEGIES)}")
    return {"default": float(default), "ensure_one": ensure_one, "min_positives": min_positives, "strategy": strategy}


def write_evaluation(cfg: DictConfig, run_dir: Path, val: dict[str, np.ndarray], test: dict[str, np.ndarray],
                     ids: dict[str, list[str]], split_dir: Path, train_targets: np.ndarray,
                     class_names: list[str]) -> dict:
    """thresholds.json (chosen on `val` as cfg.thresholds says; `label_ratio` matches the ratios of
    `train_targets`), val_predictions.csv and test_predictions.csv (`ids` of each), split.csv and config.yaml;
    returns the results.json entries they give:
    thresholds, their strategy, val and test summaries."""
    settings = check_thresholds(cfg)
    default, ensure_one, min_positives = settings["default"], settings["ensure_one"], settings["min_positives"]
    thresholds = metrics.choose_thresholds(settings["strategy"], val["targets"], val["probs"], default=default,
                                           min_positives=min_positives,
                                           train_ratios=np.asarray(train_targets, dtype=np.float64).mean(axis=0))
    write_json_atomic(run_dir / layout.THRESHOLDS, metrics.threshold_record(
        thresholds, val["targets"], list(class_names), default, min_positives, ensure_one, settings["strategy"]))
    for name, result, path in (("val", val, layout.VAL_PREDICTIONS), ("test", test, layout.TEST_PREDICTIONS)):
        write_predictions(run_dir / path, ids[name], result["probs"], result["targets"],
                          metrics.decide(result["probs"], thresholds, ensure_one=ensure_one))
    write_text_atomic(run_dir / layout.SPLIT, (split_dir / layout.SPLIT).read_text())
    write_text_atomic(run_dir / layout.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    min_pos = int(cfg.get("report_min_positives", 20))
    return {"class_names": list(class_names), "thresholds": thresholds.tolist(),
            "thresholds_strategy": settings["strategy"],
            "val": split_summary(val, thresholds, ensure_one, min_pos),
            "test": split_summary(test, thresholds, ensure_one, min_pos)}


def write_results(run_dir: Path, results: dict, min_positives: int, time_line: str) -> dict:
    """results.json, written last, and the closing summary (screen and run log)."""
    write_json_atomic(run_dir / layout.RESULTS, results)
    test = results["test"]
    common_f1 = test[f"macro_f1_classes_ge{min_positives}"]
    summary(f"\nrun folder: {run_dir}\n"
            f"test macro F1 @0.5: {test['macro_f1']:.4f}   tuned thresholds: {test['macro_f1_tuned']:.4f}"
            f"   macro ROC AUC: {metrics.format_score(test['roc_auc'])}"
            f"   mAP: {metrics.format_score(test.get('mean_average_precision'))}   "
            f"macro F1 over classes with >= {min_positives} test positives: {metrics.format_score(common_f1)}"
            + (f"   cell mAP: {metrics.format_score(test['cell_map'])}" if "cell_map" in test else "")
            + (f"\ntime: {time_line}" if time_line else ""))
    return results

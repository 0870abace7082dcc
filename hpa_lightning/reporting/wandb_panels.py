"""W&B result panels at the end of a successful job: summary, per-class table, PR and ROC curves, sample composites."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from hpa_lightning.reporting.cam import class_maps, overlay, rgb_composite
from hpa_lightning.reporting.wandb_run import PANEL_DEFAULTS, logger_kwargs, wandb_node
from hpa_lightning.runs import layout

log = logging.getLogger(__name__)


def _labels(names: list[str], ids: list[int]) -> str:
    return ", ".join(f"{i} {names[i]}" for i in ids) or "-"


def _test_samples(results: dict, run_dir: Path, count: int) -> list[tuple[str, np.ndarray, list[int], list[int]]]:
    """The first `count` test samples of the run: (Id, uint8 RGBY image from the store, true and predicted labels)."""
    import pandas as pd

    if count <= 0:
        return []
    store = Path(results["data"]["store"])
    predictions = pd.read_csv(run_dir / layout.TEST_PREDICTIONS, nrows=count, keep_default_na=False)
    index = pd.read_csv(store / "index.csv", dtype=str, keep_default_na=False)
    row_of = {sample_id: row for row, sample_id in enumerate(index["Id"])}
    images = np.load(store / "images.npy", mmap_mode="r")
    samples = []
    for _, pred in predictions.iterrows():
        truth = [c for c in range(len(results["class_names"])) if int(pred.get(f"true_{c}", 0)) == 1]
        predicted = [int(c) for c in str(pred["Predicted"]).split()]
        samples.append((str(pred["Id"]), np.asarray(images[row_of[str(pred["Id"])]]), truth, predicted))
    return samples


def sample_images(results: dict, run_dir: Path, count: int) -> list[tuple[np.ndarray, str]]:
    """The first `count` test samples of the run: (RGB composite, caption with true and predicted labels)."""
    names = list(results["class_names"])
    return [(rgb_composite(image), f"{sample_id}\ntrue: {_labels(names, truth)}\npred: {_labels(names, predicted)}")
            for sample_id, image, truth, predicted in _test_samples(results, run_dir, count)]


def sample_class_maps(results: dict, run_dir: Path, count: int) -> list[tuple[np.ndarray, str]]:
    """The same samples' class maps (reporting/cam.py) of their most probable class, by the run's best model."""
    import torch

    from hpa_lightning.inference.load import load_model

    model = load_model(run_dir)
    maps = []
    for sample_id, image, _, _ in _test_samples(results, run_dir, count):
        x = model.standardize(torch.from_numpy(image[None]))
        with torch.no_grad():
            probs = torch.sigmoid(model.net.eval()(x).float())[0]
        top = int(probs.argmax())
        heat, method = class_maps(model.net, x, torch.tensor([[top]]))
        maps.append((overlay(rgb_composite(image), heat[0, 0]),
                     f"{sample_id}: {top} {model.class_names[top]} p={float(probs[top]):.3f} ({method})"))
    return maps


def _curve_rows(truth: np.ndarray, probs: np.ndarray, names: list[str], points: int, kind: str) -> list[list]:
    """Per-class curves interpolated on a fixed grid: rows (class, x, y) for W&B's area-under-curve chart."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    grid = np.linspace(0.0, 1.0, points)
    rows = []
    for c, name in enumerate(names):
        positives = truth[:, c].sum()
        if positives == 0 or positives == len(truth):
            continue
        label = f"{c} {name}"
        if kind == "pr":
            precision, recall, _ = precision_recall_curve(truth[:, c], probs[:, c])
            precision, recall = precision[::-1], recall[::-1]          # recall ascending
            precision = np.maximum.accumulate(precision[::-1])[::-1]   # interpolated (monotone) precision
            ys = precision[np.minimum(np.searchsorted(recall, grid, side="left"), len(precision) - 1)]
        else:
            fpr, tpr, _ = roc_curve(truth[:, c], probs[:, c])
            ys = np.interp(grid, fpr, tpr)
        rows.extend([label, round(float(x), 4), round(float(y), 4)] for x, y in zip(grid, ys, strict=True))
    return rows


def per_class_rows(results: dict) -> list[list]:
    names = list(results["class_names"])
    val, test = results.get("val", {}), results.get("test", {})
    thresholds = results.get("thresholds") or [None] * len(names)

    def col(split: dict, key: str) -> list:
        values = split.get(key)
        return list(values) if values is not None else [None] * len(names)

    columns = [col(val, "per_class_f1"), col(val, "per_class_f1_tuned"), col(test, "per_class_f1"),
               col(test, "per_class_f1_tuned"), col(test, "per_class_roc_auc"),
               col(test, "per_class_average_precision"), col(test, "positives_per_class")]
    return [[c, name, *(column[c] for column in columns), thresholds[c]] for c, name in enumerate(names)]


PER_CLASS_COLUMNS = ["class_id", "class", "val_f1", "val_f1_tuned", "test_f1", "test_f1_tuned", "test_roc_auc",
                     "test_ap", "test_positives", "threshold"]


def log_results(cfg: DictConfig, results: dict, run_dir: Path) -> None:
    """Summary, per-class table, PR/ROC curves and sample images into this job's W&B run (if it has one)."""
    node = wandb_node(cfg)
    wandb = sys.modules.get("wandb")
    if node is None or wandb is None or wandb.run is None:
        return
    _, panels = logger_kwargs(node, cfg)
    try:
        log_result_panels(wandb.run, results, Path(run_dir), panels)
    except Exception as err:  # dashboards are extras: never fail a finished training because of them
        log.warning("could not log the result panels to W&B: %s", err)


def log_result_panels(run, results: dict, run_dir: Path, panels: dict | None = None) -> None:
    import pandas as pd
    import wandb

    panels = {**PANEL_DEFAULTS, **(panels or {})}
    summary = {"experiment": results.get("experiment"), "device": results.get("device"),
               "wall_time_s": results.get("wall_time_s"), "epochs": results.get("epochs")}
    for split in ("val", "test"):
        for key in ("macro_f1", "macro_f1_tuned", "roc_auc", "mean_average_precision", "cell_map"):
            value = results.get(split, {}).get(key)
            if value is not None:
                summary[f"{split}/{key}"] = value
    if results.get("gpu"):
        summary["gpu"] = results["gpu"].get("device")
    run.summary.update({k: v for k, v in summary.items() if v is not None})

    payload: dict[str, Any] = {}
    names = list(results["class_names"])
    if panels["per_class"]:
        payload["results/per_class"] = wandb.Table(columns=PER_CLASS_COLUMNS, data=per_class_rows(results))
    predictions_path = run_dir / layout.TEST_PREDICTIONS
    if panels["curves"] and predictions_path.is_file():
        frame = pd.read_csv(predictions_path, keep_default_na=False)
        truth = frame[[f"true_{c}" for c in range(len(names))]].to_numpy().astype(int)
        probs = frame[[f"prob_{c}" for c in range(len(names))]].to_numpy().astype(float)
        for kind, x, y, title in (("pr", "recall", "precision", "Test precision-recall per class"),
                                  ("roc", "fpr", "tpr", "Test ROC per class")):
            rows = _curve_rows(truth, probs, names, int(panels["curve_points"]), kind)
            if rows:
                table = wandb.Table(columns=["class", x, y], data=rows)
                payload[f"test/{kind}_curves"] = wandb.plot_table(
                    "wandb/area-under-curve/v0", table, {"x": x, "y": y, "class": "class"},
                    {"title": title, "x-axis-title": "Recall" if kind == "pr" else "False positive rate",
                     "y-axis-title": "Precision" if kind == "pr" else "True positive rate"})
    if int(panels["samples"]) > 0 and predictions_path.is_file():
        samples = sample_images(results, run_dir, int(panels["samples"]))
        payload["test/samples"] = [wandb.Image(image, caption=caption) for image, caption in samples]
        if panels["class_maps"] and results.get("best_checkpoint"):  # where each top label comes from
            maps = sample_class_maps(results, run_dir, int(panels["samples"]))
            payload["test/class_maps"] = [wandb.Image(image, caption=caption) for image, caption in maps]
    if payload:
        run.log(payload)

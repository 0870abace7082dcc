"""Weights & Biases for training jobs: one W&B run per job, grouped by sweep, with result panels at the end.

    python -m hpa_lightning.train +experiment=focal_g02 logger=wandb                 # W&B only
    python -m hpa_lightning.train -m +sweep=poster logger=wandb_csv                  # W&B and metrics.csv
    python -m hpa_lightning.train logger=wandb logger.wandb.mode=offline             # no network: `wandb sync` later

- One run per job: Lightning's WandbLogger never finishes its run, so `hpa_lightning.train.main` (through
  `rerun_failed.JobGuard`) calls `finish_run` at the end of every job, `exit_code=1` when the job failed (a job that
  failed before training started gets a run of its own, only to be marked failed). A run still open when a job
  starts (left over by an earlier job of the same process) is finished first.
- Offline: `mode: offline` (or `WANDB_MODE=offline`) writes `<job dir>/wandb/offline-run-*/run-*.wandb`, which
  `wandb sync <that folder>` uploads later. Lightning's own `offline: true` flag would set WANDB_MODE for the whole
  process (all later jobs of a sweep worker); here it is translated into this run's `mode` instead.
- Group: `group` when set, else the sweep folder's name in a multirun (one group per launch; reruns made by
  `hpa_lightning.rerun_failed` inside the sweep folder join it); tags: the experiment name (from the config).
- Config: the whole resolved job config as a plain dict (Lightning adds the module's hyperparameters).
- Metrics: whatever Lightning logs (per-epoch train/val/test metrics, `lr/<group>` per step from `LRTrace`).
- At the end of a successful job (`log_results`): the summary (val/test macro F1 at 0.5 and tuned, ROC AUC, device,
  GPU), `results/per_class` (a table: class id and name, val/test F1 at 0.5 and tuned, test ROC AUC, positives,
  threshold), `test/pr_curves` and `test/roc_curves` (one chart each, a curve per class with test positives and
  negatives, from test_predictions.csv), and `test/samples`: the first `panels.samples` test images as RGB
  composites with their true and predicted (tuned thresholds) labels.

RGB composite of the four channels (uint8): R = red + yellow/2, G = green + yellow/2, B = blue, clipped to 255, so
the yellow (ER) channel shows yellow while the green protein channel keeps its own colour.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from hpa_lightning import layout

log = logging.getLogger(__name__)

PANEL_DEFAULTS = {"samples": 8, "curves": True, "per_class": True, "curve_points": 41}


# ----------------------------------------------------------------------------------------------------- runs


def is_wandb_node(node: Any) -> bool:
    target = node.get("_target_", "") if isinstance(node, (dict, DictConfig)) else ""
    return str(target).rsplit(".", 1)[-1] == "WandbLogger"


def wandb_node(cfg: DictConfig) -> DictConfig | None:
    for node in (cfg.get("logger") or {}).values():
        if node is not None and is_wandb_node(node):
            return node
    return None


def _sweep_group(run_dir: Path) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
            return Path(hydra_cfg.sweep.dir).name
    if (run_dir.parent / "multirun.yaml").is_file():  # a rerun placed in its sweep folder
        return run_dir.parent.name
    return None


def _job_suffix() -> str:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
            return f"-{hydra_cfg.job.num}"
    return ""


def logger_kwargs(node: DictConfig, cfg: DictConfig) -> tuple[dict, dict]:
    """(WandbLogger keyword arguments, panel options) for a `logger.wandb` node of `cfg`."""
    kwargs = OmegaConf.to_container(node, resolve=True)
    kwargs.pop("_target_", None)
    panels = {**PANEL_DEFAULTS, **(kwargs.pop("panels", None) or {})}
    if kwargs.pop("offline", False):
        kwargs["mode"] = "offline"
    if kwargs.get("mode") is None:
        kwargs.pop("mode", None)  # WANDB_MODE, else online
    run_dir = Path(cfg.paths.output_dir)
    kwargs["save_dir"] = str(kwargs.get("save_dir") or run_dir)
    Path(kwargs["save_dir"]).mkdir(parents=True, exist_ok=True)
    if not kwargs.get("name"):
        kwargs["name"] = f"{cfg.experiment_name}{_job_suffix()}"
    if not kwargs.get("group"):
        kwargs["group"] = _sweep_group(run_dir)
    kwargs["tags"] = [str(t) for t in (kwargs.get("tags") or [])]
    kwargs["config"] = OmegaConf.to_container(cfg, resolve=True)
    return kwargs, panels


def build_logger(node: DictConfig, cfg: DictConfig):
    """A logger of `cfg.logger`: W&B nodes get their per-job run settings, others are instantiated as they are."""
    if not is_wandb_node(node):
        from hydra.utils import instantiate

        return instantiate(node)
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    if wandb.run is not None:
        log.warning("finishing W&B run %s left open by an earlier job of this process", wandb.run.id)
        wandb.finish()
    kwargs, _ = logger_kwargs(node, cfg)
    return WandbLogger(**kwargs)


def _init_kwargs(node: DictConfig, cfg: DictConfig) -> dict:
    """wandb.init arguments equivalent to the WandbLogger of `node` (for runs made outside Lightning)."""
    kwargs, _ = logger_kwargs(node, cfg)
    kwargs["dir"] = kwargs.pop("save_dir")
    for lightning_only in ("log_model", "prefix", "checkpoint_name", "experiment", "add_file_policy", "version"):
        kwargs.pop(lightning_only, None)
    return kwargs


def finish_run(cfg: DictConfig, failed: bool, error: str | None = None) -> None:
    """Finish this job's W&B run (exit code 1 when `failed`); a failed job without a run gets one to show it."""
    node = wandb_node(cfg)
    wandb = sys.modules.get("wandb")
    if node is None and (wandb is None or wandb.run is None):
        return
    try:
        if wandb is None or wandb.run is None:
            if not failed or node is None:
                return
            import wandb

            wandb.init(**_init_kwargs(node, cfg))
        if failed and error:
            wandb.run.summary["error"] = error
        wandb.finish(exit_code=1 if failed else 0)
    except Exception as err:  # the job's own outcome is already recorded; W&B trouble must not change it
        log.warning("could not finish the W&B run: %s", err)


# --------------------------------------------------------------------------------------------- result panels


def rgb_composite(image: np.ndarray) -> np.ndarray:
    """(4, S, S) uint8 red, green, blue, yellow -> (S, S, 3) uint8: R = red + yellow/2, G = green + yellow/2,
    B = blue."""
    red, green, blue, yellow = (image[i].astype(np.uint16) for i in range(4))
    rgb = np.stack([red + yellow // 2, green + yellow // 2, blue], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _labels(names: list[str], ids: list[int]) -> str:
    return ", ".join(f"{i} {names[i]}" for i in ids) or "-"


def sample_images(results: dict, run_dir: Path, count: int) -> list[tuple[np.ndarray, str]]:
    """The first `count` test samples of the run: (RGB composite, caption with true and predicted labels)."""
    import pandas as pd

    if count <= 0:
        return []
    store = Path(results["data"]["store"])
    names = list(results["class_names"])
    predictions = pd.read_csv(run_dir / layout.TEST_PREDICTIONS, nrows=count, keep_default_na=False)
    index = pd.read_csv(store / "index.csv", dtype=str, keep_default_na=False)
    row_of = {sample_id: row for row, sample_id in enumerate(index["Id"])}
    images = np.load(store / "images.npy", mmap_mode="r")
    samples = []
    for _, pred in predictions.iterrows():
        truth = [c for c in range(len(names)) if int(pred.get(f"true_{c}", 0)) == 1]
        predicted = [int(c) for c in str(pred["Predicted"]).split()]
        caption = f"{pred['Id']}\ntrue: {_labels(names, truth)}\npred: {_labels(names, predicted)}"
        samples.append((rgb_composite(np.asarray(images[row_of[str(pred['Id'])]])), caption))
    return samples


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
               col(test, "per_class_f1_tuned"), col(test, "per_class_roc_auc"), col(test, "positives_per_class")]
    return [[c, name, *(column[c] for column in columns), thresholds[c]] for c, name in enumerate(names)]


PER_CLASS_COLUMNS = ["class_id", "class", "val_f1", "val_f1_tuned", "test_f1", "test_f1_tuned", "test_roc_auc",
                     "test_positives", "threshold"]


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
        for key in ("macro_f1", "macro_f1_tuned", "roc_auc"):
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
    if payload:
        run.log(payload)


# --------------------------------------------------------------------------------------- reading offline runs


def offline_runs(folder: str | Path) -> list[Path]:
    """The offline run folders (`offline-run-*`) under `folder`."""
    return sorted(p.parent for p in Path(folder).rglob("offline-run-*/run-*.wandb"))


def _records(path: Path) -> list[bytes]:
    """The records of a `.wandb` transaction log (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    data = path.read_bytes()
    block, pos, records, pending = 32768, 7, [], b""
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    return records


def read_offline_run(run_folder: str | Path) -> dict:
    """What an offline run recorded: name, group, tags, config, history rows, summary, exit code, media files."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_folder = Path(run_folder)
    log_file = next(run_folder.glob("run-*.wandb"))
    out: dict[str, Any] = {"name": None, "group": None, "tags": [], "config": {}, "history": [], "summary": {},
                           "exit_code": None}

    def key_of(item) -> str:
        return item.key or "/".join(item.nested_key)

    for data in _records(log_file):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, group=record.run.run_group, tags=list(record.run.tags),
                       project=record.run.project, id=record.run.run_id)
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({key_of(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({key_of(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key_of(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["media"] = sorted(str(p.relative_to(run_folder / "files")) for p in (run_folder / "files").rglob("*")
                          if p.is_file() and "media" in p.parts)
    return out

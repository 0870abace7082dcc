"""W&B (offline): per-job logger settings, the result panels of a run, failed runs, reading an offline run back.

The two-jobs-two-runs check of a real multirun is in tests/runs/test_sweeps.py (`test_every_job_has_its_own_wandb_run`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from hpa_lightning.classes import CLASS_NAMES
from hpa_lightning.reporting import wandb_panels, wandb_run
from tests.conftest import REPO

wandb = pytest.importorskip("wandb")
N_CLASSES = len(CLASS_NAMES)


def job_config(run_dir: Path, **wandb_overrides) -> OmegaConf:
    node = OmegaConf.load(REPO / "conf" / "logger" / "wandb.yaml")
    cfg = OmegaConf.create({"experiment_name": "focal_g02", "paths": {"output_dir": str(run_dir)},
                            "optimizer": {"lr": 0.02}, "logger": node})
    for key, value in wandb_overrides.items():
        OmegaConf.update(cfg, f"logger.wandb.{key}", value)
    return cfg


@pytest.fixture
def finished_run(tmp_path: Path) -> tuple[Path, dict]:
    """A run folder as `write_run_outputs` leaves it (results.json, test_predictions.csv) over a tiny packed store."""
    rng = np.random.default_rng(0)
    store = tmp_path / "store"
    store.mkdir()
    ids = [f"id{i}" for i in range(6)]
    images = rng.integers(0, 256, (6, 4, 8, 8), dtype=np.uint8)
    np.save(store / "images.npy", images)
    pd.DataFrame({"Id": ids, "Target": ["0", "1 2", "3", "0 5", "2", "25"]}).to_csv(store / "index.csv", index=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    test_ids = ["id4", "id1", "id5", "id0"]
    truth = np.zeros((4, N_CLASSES), dtype=int)
    truth[[0, 1, 1, 2, 3, 3], [2, 1, 2, 25, 0, 5]] = 1
    probs = rng.random((4, N_CLASSES)).round(4)
    frame = pd.concat([pd.DataFrame({"Id": test_ids}),
                       pd.DataFrame(probs, columns=[f"prob_{c}" for c in range(N_CLASSES)]),
                       pd.DataFrame(truth, columns=[f"true_{c}" for c in range(N_CLASSES)])], axis=1)
    frame["Predicted"] = ["2", "1 2", "", "0"]
    frame.to_csv(run_dir / "test_predictions.csv", index=False)
    split = {"macro_f1": 0.25, "macro_f1_tuned": 0.5, "roc_auc": 0.75, "per_class_f1": [0.1] * N_CLASSES,
             "per_class_f1_tuned": [0.2] * N_CLASSES, "per_class_roc_auc": [None] * N_CLASSES,
             "positives_per_class": truth.sum(0).tolist()}
    results = {"experiment": "focal_g02", "device": "cpu", "epochs": 1, "wall_time_s": 3.0,
               "class_names": list(CLASS_NAMES), "thresholds": [0.3] * N_CLASSES,
               "data": {"store": str(store)}, "val": split, "test": {**split, "macro_f1": 0.3},
               "gpu": {"index": 1, "device": "1", "simulated": True}}
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir, results


def test_rgb_composite_mixes_yellow_into_red_and_green() -> None:
    image = np.zeros((4, 2, 2), dtype=np.uint8)
    image[0], image[1], image[2], image[3] = 100, 50, 30, 200  # red, green, blue, yellow
    image[0, 0, 0] = 250
    rgb = wandb_panels.rgb_composite(image)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[1, 1].tolist() == [200, 150, 30]
    assert rgb[0, 0].tolist() == [255, 150, 30]  # clipped


def test_logger_settings_per_job_without_process_wide_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = job_config(tmp_path / "run", offline=True, **{"panels.samples": 2})
    kwargs, panels = wandb_run.logger_kwargs(cfg.logger.wandb, cfg)
    assert kwargs["mode"] == "offline" and "offline" not in kwargs and "panels" not in kwargs
    assert panels["samples"] == 2 and panels["curves"] is True
    assert kwargs["name"] == "focal_g02" and kwargs["group"] is None and kwargs["tags"] == ["focal_g02"]
    assert kwargs["save_dir"] == str(tmp_path / "run")
    assert isinstance(kwargs["config"], dict) and kwargs["config"]["optimizer"] == {"lr": 0.02}
    logger = wandb_run.build_logger(cfg.logger.wandb, cfg)
    assert type(logger).__name__ == "WandbLogger" and logger._wandb_init["mode"] == "offline"
    assert "WANDB_MODE" not in os.environ  # Lightning's offline=True would have set it for the whole process
    csv_cfg = OmegaConf.merge(cfg, {"logger": OmegaConf.load(REPO / "conf" / "logger" / "csv.yaml")})
    assert type(wandb_run.build_logger(csv_cfg.logger.csv, csv_cfg)).__name__ == "CSVLogger"


def test_result_panels_land_in_the_offline_run(finished_run, tmp_path: Path) -> None:
    run_dir, results = finished_run
    run = wandb.init(mode="offline", dir=str(tmp_path), project="hpa_lightning", name="panels", group="g",
                     tags=["focal_g02"])
    try:
        run.log({"test/macro_f1": results["test"]["macro_f1"]})
        wandb_panels.log_result_panels(run, results, run_dir, {"samples": 2})
    finally:
        wandb.finish()
    [folder] = wandb_run.offline_runs(tmp_path)
    assert folder.name.startswith("offline-run-") and any(folder.glob("run-*.wandb"))
    logged = wandb_run.read_offline_run(folder, wait_s=60)
    assert logged["exit_code"] == 0 and logged["group"] == "g" and logged["tags"] == ["focal_g02"]
    summary = logged["summary"]
    assert summary["test/macro_f1"] == 0.3 and summary["test/macro_f1_tuned"] == 0.5 and summary["gpu"] == "1"
    media = logged["media"]
    [table] = [m for m in media if "results/per_class" in m]
    per_class = json.loads((folder / "files" / table).read_text())
    assert per_class["columns"] == wandb_panels.PER_CLASS_COLUMNS and len(per_class["data"]) == N_CLASSES
    assert per_class["data"][25][1] == CLASS_NAMES[25]
    [pr] = [m for m in media if "test/pr_curves" in m]
    curves = json.loads((folder / "files" / pr).read_text())
    assert {row[0] for row in curves["data"]} == {f"{c} {CLASS_NAMES[c]}" for c in (0, 1, 2, 5, 25)}
    assert any("test/roc_curves" in m for m in media)
    images = sorted(m for m in media if "test/samples" in m)
    assert len(images) == 2
    captions = summary["test/samples/captions"]
    assert captions[0].startswith("id4\ntrue: 2 " + CLASS_NAMES[2]) and "pred: 2 " + CLASS_NAMES[2] in captions[0]
    stored = np.load(Path(results["data"]["store"]) / "images.npy")
    expected = {wandb_panels.rgb_composite(stored[i]).tobytes() for i in (4, 1)}
    assert {np.asarray(Image.open(folder / "files" / m).convert("RGB")).tobytes() for m in images} == expected


def test_a_job_failing_before_training_gets_a_failed_run(tmp_path: Path) -> None:
    cfg = job_config(tmp_path / "run", mode="offline")
    assert wandb.run is None
    wandb_run.finish_run(cfg, failed=True, error="DataError: /data/train.csv: file not found")
    assert wandb.run is None
    [folder] = wandb_run.offline_runs(tmp_path / "run")
    logged = wandb_run.read_offline_run(folder, wait_s=60)
    assert logged["exit_code"] == 1 and logged["summary"]["error"].startswith("DataError")
    assert logged["name"] == "focal_g02" and logged["config"]["experiment_name"] == "focal_g02"
    wandb_run.finish_run(cfg, failed=False)  # nothing open: no new run
    assert len(wandb_run.offline_runs(tmp_path / "run")) == 1


def test_class_maps_of_the_sample_images_land_in_the_run(finished_run, tmp_path: Path) -> None:
    """With the run's best checkpoint: the samples' class maps (reporting/cam.py) as W&B images."""
    from hpa_lightning.models.module import HPAModule

    run_dir, results = finished_run
    torch.manual_seed(0)
    module = HPAModule(model={"name": "resnet10t", "pretrained": False},
                       loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "name": "focal", "gamma": 0.2},
                       optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.02})
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, ckpt)
    results = {**results, "best_checkpoint": str(ckpt), "image_size": 8}
    (run_dir / "results.json").write_text(json.dumps(results))
    run = wandb.init(mode="offline", dir=str(tmp_path), project="hpa_lightning", name="maps")
    try:
        wandb_panels.log_result_panels(run, results, run_dir, {"samples": 2, "curves": False, "per_class": False})
    finally:
        wandb.finish()
    [folder] = wandb_run.offline_runs(tmp_path)
    logged = wandb_run.read_offline_run(folder, wait_s=60)
    assert len([m for m in logged["media"] if "test/class_maps" in m]) == 2
    captions = logged["summary"]["test/class_maps/captions"]
    assert captions[0].startswith("id4: ") and captions[0].endswith("(cam)")

"""TensorBoard and MLflow, as Lightning ships them, offline: the same metric names as metrics.csv, read back with
each library's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, run_train

pytestmark = pytest.mark.slow
TINY = ["+experiment=focal_g02", "+preset=tiny", "data.synthetic.n=120", "data.image_size=24"]
NAMES = ("train/loss_epoch", "val/macro_f1", "val/roc_auc", "test/macro_f1", "lr/head")


def tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(event.value for event in accumulator.Scalars(tag))
    return scalars


def test_tensorboard_logger(tmp_path: Path, shared_cache: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "logger=tensorboard", f"hydra.run.dir={run_dir}"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(NAMES) <= set(scalars) and set(NAMES) <= set(metrics.columns)
    assert scalars["val/macro_f1"] == pytest.approx(metrics["val/macro_f1"].dropna().tolist(), abs=1e-6)


def test_mlflow_logger_with_its_local_store(tmp_path: Path, shared_cache: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    proc = run_train([*TINY, "logger=mlflow", f"paths.log_dir={log_dir}", f"hydra.run.dir={run_dir}"], shared_cache,
                     REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{log_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("hpa_lightning")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "focal_g02" and run.info.status == "FINISHED"
    assert set(NAMES) <= set(run.data.metrics)
    results = json.loads((run_dir / "results.json").read_text())
    assert run.data.metrics["test/macro_f1"] == pytest.approx(results["test"]["macro_f1"], abs=1e-6)
    history = [m.value for m in client.get_metric_history(run.info.run_id, "val/macro_f1")]
    assert history == pytest.approx(pd.read_csv(run_dir / "metrics.csv")["val/macro_f1"].dropna().tolist(), abs=1e-6)

"""`make reproduce` at the tests' scale: every step runs and docs/results gets the table, figures, plots, commands,
versions and timings of that very run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import hpa_lightning.classical.pipeline  # noqa: F401 - registers conf/baseline_model/ as the baseline's model group
from hpa_lightning.reporting.poster import plan
from tests.conftest import REPO, compose_config


def test_the_demo_plan_composes_every_training_command(tmp_path: Path) -> None:
    commands = plan(tmp_path, "demo", None)
    assert list(commands) == ["poster", "logreg", "random_forest", "lr_find", "report"]
    poster = [a for a in commands["poster"][1:] if a != "-m"]
    cfg = compose_config([*poster, "+experiment=bce"])
    assert cfg.model.name == "resnet10t" and cfg.hydra.sweeper.params["+experiment"].count(",") == 9
    assert compose_config(commands["logreg"][1:], "baseline").model.name == "logreg"
    assert compose_config(commands["lr_find"][1:], "lr_find").experiment_name == "focal_g02"


@pytest.mark.e2e
def test_reproduce_publishes_what_its_run_produced(shared_cache: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "results" / "synthetic"
    env = {**os.environ, "HPA_CACHE_DIR": str(shared_cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "hpa_lightning.reproduce", "preset=tiny", "arms=focal_g02",
                           f"work={tmp_path / 'work'}", f"docs={docs}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(docs / "results.csv")
    assert sorted(table["experiment"]) == ["baseline_logreg", "baseline_random_forest", "focal_g02"]
    produced = pd.read_csv(tmp_path / "work" / "report" / "results.csv")
    pd.testing.assert_frame_equal(table, produced)  # the published table is the run's own
    for name in ("report.md", "test_macro_f1.png", "test_roc_auc.png", "commands.txt", "run.json"):
        assert (docs / name).is_file(), name
    plots = {p.name for p in (docs / "plots").iterdir()}
    assert any("lr_find" in p for p in plots) and any("lr_trace" in p for p in plots)
    figure = "test_macro_f1.png"
    assert (docs / figure).read_bytes() == (tmp_path / "work" / "report" / figure).read_bytes()
    record = json.loads((docs / "run.json").read_text())
    assert set(record["steps"]) == {"poster", "logreg", "random_forest", "lr_find", "report"}
    assert all(step["exit"] == 0 and step["wall_time_s"] > 0 for step in record["steps"].values())
    assert record["versions"]["torch"] and record["machine"]["cpu"] and record["total_wall_time_s"] > 0
    assert len((docs / "commands.txt").read_text().splitlines()) == 5
    assert str(tmp_path) not in (docs / "report.md").read_text()

"""The comparison report from hand-written run folders: table, figures, plots, and jobs that did not finish."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from hpa_lightning import report
from hpa_lightning.runs.status import write_status
from tests.conftest import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def write_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)


def run_folder(folder: Path, experiment: str, test_f1: float, overrides: list[str], model: str = "resnet18",
               loss: str | None = "focal", gamma: float | None = 2.0, scheduler: str = "constant",
               lr: float | None = 0.02, lr_trace: bool = False, val_f1: float | None = None) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    results = {"status": "completed", "experiment": experiment, "model": model, "loss": loss, "gamma": gamma,
               "scheduler": scheduler, "base_lr": lr, "epochs": 3 if loss else None, "wall_time_s": 12.5,
               "device": "cpu",
               "val": {"macro_f1": test_f1 + 0.01 if val_f1 is None else val_f1, "macro_f1_tuned": test_f1 + 0.05,
                       "roc_auc": 0.8},
               "test": {"macro_f1": test_f1, "macro_f1_tuned": test_f1 + 0.04, "roc_auc": 0.7 + test_f1 / 10,
                        "mean_average_precision": 0.5 + test_f1 / 10}}
    (folder / "results.json").write_text(json.dumps(results))
    if lr_trace:
        write_png(folder / "lr_trace.png")
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    # best on validation, not on test: the report's headline must pick it (choosing by test score is optimistic)
    run_folder(sweep / "0_bce", "bce", 0.20, ["+sweep=poster", "+experiment=bce"], loss="bce", gamma=0.0,
               val_f1=0.40)
    run_folder(sweep / "1_focal_g02_sgdr", "focal_g02_sgdr", 0.30, ["+sweep=poster", "+experiment=focal_g02_sgdr"],
               gamma=0.2, scheduler="sgdr", lr_trace=True)
    failed = sweep / "2_focal_g1"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["+sweep=poster", "+experiment=focal_g1"]))
    write_status(failed, "failed", error="NonFiniteLossError: non-finite training loss (nan) at epoch 0, step 5")
    (sweep / "3_focal_g2" / ".hydra").mkdir(parents=True)  # killed before it could mark anything
    # the same experiment at two LRs, told apart by the override that differs
    lr_sweep = tmp_path / "lr"
    run_folder(lr_sweep / "0", "focal_g02", 0.10, ["+experiment=focal_g02", "optimizer.lr=0.01"], lr=0.01)
    run_folder(lr_sweep / "1", "focal_g02", 0.15, ["+experiment=focal_g02", "optimizer.lr=0.05"], lr=0.05)
    # a classical baseline and an LR-finder run
    run_folder(tmp_path / "baselines" / "logreg", "baseline_logreg", 0.05, ["model=logreg"], model="logreg",
               loss=None, gamma=None, scheduler="none", lr=None)
    finder = tmp_path / "lr_find" / "focal_g02"
    (finder / ".hydra").mkdir(parents=True)
    (finder / "lr_find.json").write_text(json.dumps({"suggestion": 0.02}))
    write_png(finder / "lr_find.png")
    return tmp_path


def test_report_table_figures_plots_and_failed_jobs(runs: Path) -> None:
    out = runs / "out"
    assert report.main([str(runs), f"out={out}"]) == 0
    frame = pd.read_csv(out / "results.csv", dtype={"run": str})
    completed = frame[frame["status"] == "completed"].set_index("label")
    assert set(completed.index) == {"bce", "focal_g02_sgdr", "focal_g02 optimizer.lr=0.01",
                                    "focal_g02 optimizer.lr=0.05", "baseline_logreg"}
    row = completed.loc["focal_g02_sgdr"]
    assert (row["model"], row["loss"], row["gamma"], row["scheduler"]) == ("resnet18", "focal", 0.2, "sgdr")
    assert row["test_macro_f1"] == pytest.approx(0.30) and row["test_macro_f1_tuned"] == pytest.approx(0.34)
    assert row["val_macro_f1"] == pytest.approx(0.31) and row["val_macro_f1_tuned"] == pytest.approx(0.35)
    assert row["test_roc_auc"] == pytest.approx(0.73) and row["epochs"] == 3 and row["wall_time_s"] == 12.5
    assert row["test_map"] == pytest.approx(0.53)
    assert completed.loc["baseline_logreg", "model"] == "logreg"

    problems = frame[frame["status"] != "completed"].set_index("run")
    assert set(problems.index) == {"sweep/2_focal_g1", "sweep/3_focal_g2"}  # the LR finder is not a failed job
    assert problems.loc["sweep/2_focal_g1", "status"] == "failed"
    assert problems.loc["sweep/2_focal_g1", "error"].startswith("NonFiniteLossError")
    assert problems.loc["sweep/3_focal_g2", "status"] == "incomplete"

    md = (out / "report.md").read_text()
    assert "| focal_g02_sgdr | resnet18 | focal | 0.2 | sgdr | 0.02 | 0.3100 | 0.3500 | 0.3000 | 0.3400 |" in md
    assert "## Failed or unfinished jobs" in md and "NonFiniteLossError" in md and "sweep/3_focal_g2" in md
    assert ("Best on validation (val macro F1 @0.5 0.4000): **bce**; its test macro F1: 0.2000 @0.5, 0.2400 with "
            "tuned thresholds, ROC AUC 0.7200, mAP 0.5200.") in md
    assert "focal_g02_sgdr" not in md.split("## Results")[0]
    for figure in ("test_macro_f1.png", "test_roc_auc.png"):
        assert (out / figure).read_bytes().startswith(PNG) and f"]({figure})" in md
    assert (out / "plots" / "focal_g02_sgdr_lr_trace.png").read_bytes().startswith(PNG)
    [finder] = list((out / "plots").glob("*lr_find.png"))
    assert f"]({finder.relative_to(out)})" in md


def test_report_of_one_sweep_defaults_into_it_and_shows_reruns(runs: Path) -> None:
    sweep = runs / "sweep"
    rerun = run_folder(sweep / "2_focal_g1_rerun1", "focal_g1", 0.25, ["+sweep=poster", "+experiment=focal_g1"],
                       gamma=1.0)
    write_status(rerun, "completed", fresh=True, rerun_of=str(sweep / "2_focal_g1"))
    proc = subprocess.run([sys.executable, "-m", "hpa_lightning.report", str(sweep)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FAILED: 2_focal_g1: NonFiniteLossError" in proc.stdout and "(replaced by 2_focal_g1_rerun1)" in proc.stdout
    frame = pd.read_csv(sweep / "report" / "results.csv", dtype={"run": str, "rerun": str}).set_index("run")
    assert frame.loc["2_focal_g1", "rerun"] == "2_focal_g1_rerun1"
    assert frame.loc["2_focal_g1_rerun1", "rerun"] == "rerun of 2_focal_g1"
    assert frame.loc["2_focal_g1_rerun1", "label"] == "focal_g1"
    assert "rerun of 2_focal_g1" in (sweep / "report" / "report.md").read_text()


def test_report_of_an_empty_folder_fails(tmp_path: Path) -> None:
    assert report.main([str(tmp_path)]) == 2
    assert report.main([str(tmp_path / "missing")]) == 2

"""A cell model end to end: data=hpa2021_cells trains the same module on cell crops, and its test cells are scored
against a cell truth file exactly as `evaluate_cells` scores the submission rows it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hpa_lightning import evaluate_cells
from hpa_lightning.cells.submission import read_submission, write_submission
from hpa_lightning.reporting.comparison import gather
from tests.conftest import REPO, run_train
from tests.data.test_cell_store import write_cell_dataset


@pytest.mark.slow
def test_a_cell_model_trains_and_reports_the_cell_map_evaluate_cells_gives(shared_cache: Path,
                                                                            tmp_path: Path) -> None:
    root = write_cell_dataset(tmp_path / "hpa2021", n=12)
    run_dir = tmp_path / "run"
    proc = run_train(["+preset=tiny", "data=hpa2021_cells", f"data.root={root}", f"data.cells={root / 'masks'}",
                      f"data.cell_truth={root / 'cell_truth.csv'}", "data.synthetic=null", "data.image_size=32",
                      "data.split.val_fraction=0.25", "data.split.test_fraction=0.25", "trainer.max_epochs=1",
                      f"hydra.run.dir={run_dir}"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    metrics = json.loads((run_dir / "cell_metrics.json").read_text())
    assert results["test"]["cell_map"] == metrics["map"] is not None
    assert results["test"]["cell_ap_per_class"] == [entry["ap"] for entry in metrics["per_class"]]
    assert "cell mAP:" in proc.stdout

    # every test cell, grouped by image, all cells of a test image in the test split
    split = pd.read_csv(run_dir / "split.csv", dtype=str)
    split["image"] = split["Id"].str.rsplit("_", n=1).str[0]
    assert (split.groupby("image")["split"].nunique() == 1).all()
    cells = pd.read_csv(run_dir / "test_cells.csv", dtype={"ID": str})
    assert sorted(cells["ID"] + "_" + cells["cell_id"].astype(str)) == sorted(split[split["split"] == "test"]["Id"])
    assert results["cells"]["test_cells"] == len(cells) and results["cells"]["test_images"] == 3

    # the same numbers from the command, on the rows written and the truth of the test images
    pred = read_submission(run_dir / "test_cell_submission.csv")
    truth = read_submission(root / "cell_truth.csv", truth=True)
    write_submission(tmp_path / "truth_test.csv", [truth[image_id] for image_id in pred])
    command = evaluate_cells.run({"pred": run_dir / "test_cell_submission.csv", "truth": tmp_path / "truth_test.csv",
                                  "iou": 0.6, "out": tmp_path / "evaluated"})
    assert command["map"] == pytest.approx(metrics["map"], abs=1e-12)
    assert command["per_class"] == metrics["per_class"] and command["counts"] == metrics["counts"]

    logged = pd.read_csv(run_dir / "metrics.csv")["test/cell_map"].dropna()  # what CSV and W&B loggers get
    assert logged.tolist() == pytest.approx([metrics["map"]])
    completed, _, _ = gather([run_dir])  # the comparison report's row
    assert completed[0]["test_cell_map"] == pytest.approx(metrics["map"])

"""The submission CSV: what the project writes is well formed, bad rows are one line naming file and row, and
`evaluate_cells` end to end in a subprocess (exit 0 and cell_metrics.json; exit 2 with one line for a stray ID)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from hpa_lightning.cells.rle import encode_mask, mask_counts
from hpa_lightning.cells.submission import CellPrediction, ImageCells, read_submission, write_submission
from hpa_lightning.classes import class_set
from hpa_lightning.errors import DataError
from tests.conftest import REPO

HPA2021 = class_set("hpa2021")


def random_images(seed: int = 0, count: int = 6, truth: bool = False) -> list[ImageCells]:
    rng = np.random.default_rng(seed)
    images = []
    for n in range(count):
        height, width = int(rng.integers(4, 30)), int(rng.integers(4, 30))
        cells = []
        for _ in range(int(rng.integers(0, 5))):
            mask = rng.random((height, width)) < 0.3
            for label in rng.choice(len(HPA2021), size=int(rng.integers(1, 4)), replace=False).tolist():
                cells.append(CellPrediction(label, 1.0 if truth else float(rng.random()), encode_mask(mask)))
        images.append(ImageCells(f"id{n}", width, height, tuple(cells)))
    return [*images, ImageCells("no-cells", 7, 3, ())]


def test_what_the_project_writes_is_well_formed(tmp_path: Path) -> None:
    images = random_images()
    path = tmp_path / "submission.csv"
    write_submission(path, images)
    lines = path.read_text().splitlines()
    assert lines[0] == "ID,ImageWidth,ImageHeight,PredictionString" and len(lines) == len(images) + 1
    assert any(line.endswith(",") for line in lines[1:])  # an image without cells: empty PredictionString
    for line in lines[1:]:  # checked here from the text, not through the reader
        _, width, height, prediction = line.split(",")
        tokens = prediction.split()
        assert len(tokens) % 3 == 0
        for label, confidence, mask in zip(tokens[::3], tokens[1::3], tokens[2::3], strict=True):
            assert 0 <= int(label) < len(HPA2021) == 19 and 0.0 <= float(confidence) <= 1.0
            rle = {"size": [int(height), int(width)], "counts": mask_counts(mask)}
            assert coco_mask.decode(rle).shape == (int(height), int(width))
    assert list(read_submission(path).values()) == images  # confidences read back exactly


VALID = encode_mask(np.eye(4, 5, dtype=bool))
ROWS = {
    "tokens": (f"3 0.5 {VALID} 4", "has 4 tokens, not a multiple of 3"),
    "label": (f"19 0.5 {VALID}", "label '19' is not a class id 0..18"),
    "label text": (f"Nucleoli 0.5 {VALID}", "label 'Nucleoli' is not a class id"),
    "confidence": (f"3 1.5 {VALID}", "confidence '1.5' is not a number in [0, 1]"),
    "confidence nan": (f"3 nan {VALID}", "confidence 'nan' is not a number in [0, 1]"),
    "confidence text": (f"3 high {VALID}", "confidence 'high' is not a number in [0, 1]"),
    "mask": ("3 0.5 !!notamask", "is not base64 of zlib-compressed RLE counts"),
    "mask size": (f"3 0.5 {encode_mask(np.eye(5, dtype=bool))}", "covers 25 pixels, not ImageHeight x ImageWidth"),
}


@pytest.mark.parametrize("case", ROWS)
def test_a_bad_row_is_one_line_naming_file_and_row(tmp_path: Path, case: str) -> None:
    prediction, message = ROWS[case]
    path = tmp_path / "pred.csv"
    path.write_text(f"ID,ImageWidth,ImageHeight,PredictionString\ngood,5,4,3 0.5 {VALID}\nbad,5,4,{prediction}\n")
    with pytest.raises(DataError) as err:
        read_submission(path)
    text = str(err.value)
    assert text.startswith(f"{path} row 3 (ID bad):") and message in text and "\n" not in text, text


@pytest.mark.parametrize(("content", "message"), [
    ("ID,ImageWidth,PredictionString\n", "missing column(s) ImageHeight"),
    ("ID,ImageWidth,ImageHeight,PredictionString\na,5,4,\na,5,4,\n", "row 3 (ID a): ID a repeats row 2"),
    ("ID,ImageWidth,ImageHeight,PredictionString\na,5,0,\n", "row 2 (ID a): ImageHeight '0' is not a positive"),
    ("ID,ImageWidth,ImageHeight,PredictionString\n,5,4,\n", "row 2: empty ID"),
])
def test_bad_files_and_sizes(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "pred.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_submission(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_truth_has_confidence_1(tmp_path: Path) -> None:
    path = tmp_path / "truth.csv"
    path.write_text(f"ID,ImageWidth,ImageHeight,PredictionString\na,5,4,3 0.5 {VALID}\n")
    with pytest.raises(DataError, match="row 2 .*confidence 1"):
        read_submission(path, truth=True)


def _evaluate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpa_lightning.evaluate_cells", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO),
                                                                             "PATH": "/usr/bin:/bin"})


def test_the_command_end_to_end(tmp_path: Path) -> None:
    truth = random_images(seed=1, truth=True)
    write_submission(tmp_path / "truth.csv", truth)
    write_submission(tmp_path / "pred.csv", [ImageCells(i.id, i.width, i.height, tuple(
        CellPrediction(c.label, 0.7, c.mask) for c in i.cells)) for i in truth])
    done = _evaluate(tmp_path, "pred=pred.csv", "truth=truth.csv", "out=scores")
    assert done.returncode == 0, done.stderr
    assert "mAP@IoU0.6 1.000000" in done.stdout
    metrics = json.loads((tmp_path / "scores" / "cell_metrics.json").read_text())
    assert metrics["map"] == 1.0 and metrics["iou"] == 0.6 and metrics["counts"]["images"] == len(truth)
    assert [entry["name"] for entry in metrics["per_class"]] == list(HPA2021.names)
    assert metrics["counts"]["detections"] == sum(len(i.cells) for i in truth)
    assert {entry["ap"] for entry in metrics["per_class"]} <= {1.0, None}

    write_submission(tmp_path / "extra.csv", [*truth, ImageCells("stray", 5, 4, ())])
    done = _evaluate(tmp_path, "pred=extra.csv", "truth=truth.csv", "out=scores2")
    assert done.returncode == 2 and done.stderr.strip() == "error: extra.csv: ID stray is not in truth.csv"
    assert not (tmp_path / "scores2").exists()
    done = _evaluate(tmp_path, "pred=truth.csv", "truth=extra.csv")
    assert done.returncode == 2 and "ID stray is not in truth.csv" in done.stderr and "Traceback" not in done.stderr


def test_the_command_refuses_a_bad_row_and_a_bad_iou(tmp_path: Path) -> None:
    (tmp_path / "pred.csv").write_text(f"ID,ImageWidth,ImageHeight,PredictionString\na,5,4,3 2 {VALID}\n")
    write_submission(tmp_path / "truth.csv", [ImageCells("a", 5, 4, ())])
    for args in (["pred=pred.csv", "truth=truth.csv"], ["pred=truth.csv", "truth=truth.csv", "iou=1.5"],
                 ["truth=truth.csv"]):
        done = _evaluate(tmp_path, *args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr

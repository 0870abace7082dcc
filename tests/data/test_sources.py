"""Every validation error of the Kaggle-layout reader: one line, naming the file, row or key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpa_lightning.data.sources import load_sample, read_label_table
from hpa_lightning.errors import DataError
from tests.conftest import write_kaggle_folder


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "expected"), [
    ("Id,Label\na,1\n", "missing columns Id,Target or ID,Label (found Id, Label)"),
    ("Id,Target\na,1\nb,2\na,3\n", "row 4: duplicate Id a (first at row 2)"),
    ("Id,Target\na,1 x\n", "row 2 (Id a): label 'x' is not an integer"),
    ("Id,Target\na,28\n", "row 2 (Id a): label 28 out of range 0..27"),
    ("Id,Target\na,-1\n", "row 2 (Id a): label -1 out of range"),
    ("Id,Target\na,1.5\n", "label '1.5' is not an integer"),
    ("Id,Target\na,\n", "row 2 (Id a): empty Target"),
    ("", "empty CSV"),
    ("Id,Target\n", "no samples"),
    ("Id,Target\n../etc,1\n", "row 2: Id '../etc' contains a path separator"),
    ("Id,Target\nsub/x,1\n", "path separator"),
])
def test_label_table_errors_name_the_row(tmp_path: Path, text: str, expected: str) -> None:
    path = write_csv(tmp_path, text)
    with pytest.raises(DataError) as info:
        read_label_table(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_label_table_parses_unsorted_targets(tmp_path: Path) -> None:
    table = read_label_table(write_csv(tmp_path, "Id,Target\na,16 0\nb,27\n"))
    assert table.ids == ["a", "b"]
    assert table.labels.shape == (2, 28)
    assert table.labels[0].nonzero()[0].tolist() == [0, 16]
    assert table.labels[1].nonzero()[0].tolist() == [27]


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train.csv: file not found"):
        read_label_table(tmp_path / "train.csv")


def test_missing_channel_names_the_file(tmp_path: Path) -> None:
    root = write_kaggle_folder(tmp_path, {"a": "1"})
    (root / "train" / "a_yellow.png").unlink()
    with pytest.raises(DataError, match=r"a_yellow\.png: missing channel file"):
        load_sample(root / "train", "a", 8)


def test_corrupt_png_names_the_file(tmp_path: Path) -> None:
    root = write_kaggle_folder(tmp_path, {"a": "1"})
    path = root / "train" / "a_green.png"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=r"a_green\.png: cannot decode image"):
        load_sample(root / "train", "a", 8)


def test_channels_of_different_sizes(tmp_path: Path) -> None:
    root = write_kaggle_folder(tmp_path, {"a": "1"}, size=16)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "train" / "a_blue.png")
    with pytest.raises(DataError, match=r"a_blue\.png: size 20x20 differs from a_red\.png \(16x16\)"):
        load_sample(root / "train", "a", 8)


def test_any_format_and_size_is_resized(tmp_path: Path) -> None:
    root = tmp_path
    (root / "train").mkdir()
    values = {"red": 10, "green": 200, "blue": 50, "yellow": 120}
    for channel, value in values.items():
        image = Image.fromarray(np.full((64, 64), value, np.uint8))
        suffix = {"red": ".jpg", "green": ".tif", "blue": ".png", "yellow": ".png"}[channel]
        image.save(root / "train" / f"s_{channel}{suffix}")
    sample = load_sample(root / "train", "s", 16)
    assert sample.shape == (4, 16, 16) and sample.dtype == np.uint8
    assert np.abs(sample.reshape(4, -1).mean(axis=1) - np.array(list(values.values()))).max() <= 2

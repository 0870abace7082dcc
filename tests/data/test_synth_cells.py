"""Tests of the synthetic HPA 2021 single cells: truth that reads back and scores 1, masks that agree with it, labels
that follow the green actually drawn, heterogeneous images, determinism and atomicity like the 2018 generator."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpa_lightning import synth as synth_cli
from hpa_lightning.cells.average_precision import cell_map
from hpa_lightning.cells.rle import decode_mask
from hpa_lightning.cells.submission import ImageCells, read_submission
from hpa_lightning.classes import CHANNELS, class_set
from hpa_lightning.data import simulator as synth
from hpa_lightning.data.simulator.single_cell import HPA2021_FROM_2018, NEGATIVE, hpa2021_patterns
from hpa_lightning.data.sources import read_label_table

N = 40


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def image_labels(root: Path) -> dict[str, list[int]]:
    text = (root / "train.csv").read_text()
    assert text.splitlines()[0] == "ID,Label"
    return {row["ID"]: [int(c) for c in row["Label"].split("|")] for row in csv.DictReader(text.splitlines())}


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "I;16", (path, im.mode)
        return np.array(im).astype(np.int64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("cells") / "hpa2021", n=N, seed=4, size=128, workers=1,
                          classes="hpa2021", cells=True)


@pytest.fixture(scope="module")
def cells_by_image(dataset: Path) -> dict[str, tuple[np.ndarray, dict[int, list[int]]]]:
    """Per image: its cell mask PNG and, per cell id of that mask, the truth labels whose mask is exactly that cell."""
    truth = read_submission(dataset / "cell_truth.csv", truth=True)
    out = {}
    for image_id, image in truth.items():
        cell_mask = read_mask(dataset / "masks" / f"{image_id}_cell_mask.png")
        assert cell_mask.shape == (image.height, image.width) == (128, 128)
        labels: dict[int, list[int]] = {}
        for triple in image.cells:
            mask = decode_mask(triple.mask, image.height, image.width)
            ids = np.unique(cell_mask[mask])
            assert ids.size == 1 and ids[0] > 0, "a truth mask covers exactly one cell of the mask PNG"
            assert np.array_equal(mask, cell_mask == ids[0]), "a truth mask is its whole cell"
            labels.setdefault(int(ids[0]), []).append(triple.label)
        out[image_id] = (cell_mask, labels)
    return out


def test_layout_and_truth_reads_back(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == ["cell_truth.csv", "masks", "train", "train.csv"]
    ids = list(image_labels(dataset))
    assert len(ids) == N and ids == sorted(ids)
    assert {p.name for p in (dataset / "train").iterdir()} == {f"{i}_{ch}.png" for i in ids for ch in CHANNELS}
    assert {p.name for p in (dataset / "masks").iterdir()} == {f"{i}_{kind}_mask.png" for i in ids
                                                               for kind in ("cell", "nuclei")}
    table = read_label_table(dataset / "train.csv", class_set("hpa2021"))  # what data=hpa2021 reads
    assert table.ids == ids and table.labels.shape == (N, 19)
    truth = read_submission(dataset / "cell_truth.csv", truth=True)
    assert list(truth) == ids
    scores = cell_map(truth, truth, num_classes=19)
    assert scores["map"] == 1.0
    # a shuffled truth (every label moved to the next cell of its image) scores below 1: the check can fail
    moved = {i: ImageCells(i, t.width, t.height, tuple(type(c)(c.label, c.confidence, t.cells[(k + 1) % len(t.cells)]
                                                                   .mask) for k, c in enumerate(t.cells)))
             for i, t in truth.items()}
    assert cell_map(moved, truth, num_classes=19)["map"] < 1.0


def test_every_cell_has_truth_and_nuclei_lie_in_their_cells(dataset: Path, cells_by_image: dict) -> None:
    for image_id, (cell_mask, labels) in cells_by_image.items():
        k = int(cell_mask.max())
        assert k >= 1 and set(np.unique(cell_mask)) == set(range(k + 1)), "cells are numbered 1..k"
        assert sorted(labels) == list(range(1, k + 1)), "every cell has a truth triple"
        for cell_labels in labels.values():
            assert len(set(cell_labels)) == len(cell_labels)
            assert NEGATIVE not in cell_labels or cell_labels == [NEGATIVE]
        nuclei = read_mask(dataset / "masks" / f"{image_id}_nuclei_mask.png")
        inside = nuclei > 0
        assert np.array_equal(nuclei[inside], cell_mask[inside]), "a nucleus carries its cell's id"
        shares = [np.mean(nuclei[cell_mask == c] > 0) for c in range(1, k + 1)]
        assert all(s < 0.7 for s in shares)
        assert sum(s > 0.05 for s in shares) >= k - 1, shares  # a fragment may have lost its nucleus to the border


def test_image_labels_are_the_union_of_the_cells(dataset: Path, cells_by_image: dict) -> None:
    labels = image_labels(dataset)
    for image_id, (_mask, cells) in cells_by_image.items():
        union = sorted({c for row in cells.values() for c in row} - {NEGATIVE})
        assert labels[image_id] == (union or [NEGATIVE])


def test_labelled_cells_show_more_green_than_negative_ones(dataset: Path, cells_by_image: dict) -> None:
    compared = 0
    for image_id, (cell_mask, cells) in cells_by_image.items():
        with Image.open(dataset / "train" / f"{image_id}_green.png") as im:
            green = np.array(im).astype(np.float64)
        mean = {c: green[cell_mask == c].mean() for c in cells}
        negative = [mean[c] for c, row in cells.items() if row == [NEGATIVE]]
        shown = [mean[c] for c, row in cells.items() if row != [NEGATIVE]]
        if negative and shown:
            assert min(shown) > max(negative), (image_id, cells, mean)
            compared += 1
        # not even a trace of a neighbour's pattern: at most the camera's background (<= 6) plus its noise
        dark = np.isin(cell_mask, [c for c, row in cells.items() if row == [NEGATIVE]])
        assert not dark.any() or green[dark].max() <= 9, (image_id, green[dark].max())
    assert compared >= 5


def test_some_images_are_heterogeneous(cells_by_image: dict) -> None:
    heterogeneous = sum(
        any(set(row) != set().union(*cells.values()) - {NEGATIVE} for row in cells.values())
        for _mask, cells in cells_by_image.values()
    )
    assert heterogeneous >= 5, heterogeneous
    negative_cells = sum(row == [NEGATIVE] for _m, cells in cells_by_image.values() for row in cells.values())
    assert negative_cells >= 5


def test_same_bytes_for_any_worker_count_and_refuses_an_existing_out(tmp_path: Path) -> None:
    kwargs = dict(n=6, seed=2, size=64, zoom=1.5, classes="hpa2021", cells=True)
    a = tree_bytes(synth.generate(tmp_path / "a", workers=1, **kwargs))
    b = tree_bytes(synth.generate(tmp_path / "b", workers=2, **kwargs))
    assert len(a) == 6 * 6 + 2 and a == b
    with pytest.raises(FileExistsError, match="already exists"):
        synth.generate(tmp_path / "a", workers=1, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    with pytest.raises(ValueError, match="needs classes=hpa2021"):
        synth.generate(tmp_path / "c", n=1, cells=True)
    without = synth.generate(tmp_path / "d", workers=1, **{**kwargs, "cells": False})
    assert sorted(p.name for p in without.iterdir()) == ["train", "train.csv"]
    assert (without / "train.csv").read_bytes() == a["train.csv"]


def test_the_mapping_covers_the_2021_classes_once() -> None:
    patterns = [p for members in HPA2021_FROM_2018.values() for p in members]
    assert sorted(HPA2021_FROM_2018) == list(range(18))
    assert sorted(patterns) == sorted(set(range(28)) - {16, 27})
    rng = np.random.default_rng(0)
    assert hpa2021_patterns([16, 27], rng) == {}
    assert hpa2021_patterns([25, 0, 16], rng) == {0: 0, 16: 25}
    drawn = {hpa2021_patterns([8, 9, 20], rng)[17] for _ in range(50)}
    assert drawn == {8, 9, 20}


def test_spindle_only_in_the_mitotic_cell_and_negative_images_stay_dark() -> None:
    for seed in range(6):
        sample = synth.render_cell_sample([11], 96, np.random.default_rng(seed))
        # the layout has one mitotic cell: the spindle is in that one cell, or the image is Negative
        spindle = [row for row in sample.cell_labels if 11 in row]
        assert len(spindle) == 1 or sample.labels == [NEGATIVE]
        negative = synth.render_cell_sample([], 96, np.random.default_rng(seed))
        assert negative.labels == [NEGATIVE] and all(row == [NEGATIVE] for row in negative.cell_labels)
        assert negative.image[1].max() < 20, "no green pattern in a Negative image"
        assert negative.cell_mask.dtype == np.uint16 and negative.image.shape == (4, 96, 96)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    synth_cli.main([f"out={out}", "n=2", "size=32", "workers=1", "classes=hpa2021", "cells=true"])
    assert capsys.readouterr().out.strip() == str(out)
    assert len(read_submission(out / "cell_truth.csv", truth=True)) == 2
    with pytest.raises(SystemExit) as exc:
        synth_cli.main([f"out={tmp_path / 'x'}", "classes=hpa2019"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_interrupted_generate_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpa_lightning.data.simulator import single_cell

    calls = {"n": 0}
    real = single_cell.render_cell_sample

    def flaky(*args: object, **kwargs: object) -> synth.CellSample:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(single_cell, "render_cell_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(tmp_path / "hpa", n=5, size=32, workers=1, classes="hpa2021", cells=True)
    assert list(tmp_path.iterdir()) == []

"""The cell store (data=hpa2021_cells): one row per cell, cut by cells.crops.crop_cell from the decoded image, labelled
with its image's labels, split by image; changed masks repack; bad masks are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa_lightning.cells.crops import cell_boxes, crop_cell
from hpa_lightning.cells.masks import cell_mask_path, write_masks
from hpa_lightning.cells.scores import ScoredCells, submission_row
from hpa_lightning.cells.submission import read_submission, write_submission
from hpa_lightning.classes import CHANNELS, class_set
from hpa_lightning.data.cell_store import CellDataModule, build_cell_store
from hpa_lightning.data.split import prepare_split
from hpa_lightning.errors import DataError
from tests.conftest import REPO, compose_config

HPA2021 = class_set("hpa2021")
SIXTEEN_BIT = "img01"  # the one image whose channels are 16-bit PNGs


def write_cell_dataset(root: Path, n: int = 12, seed: int = 0) -> Path:
    """An HPA-2021-layout folder: `train.csv` (ID,Label), `train/{ID}_{channel}.png` of non-square sizes (8-bit, one
    image 16-bit), `masks/{ID}_cell_mask.png` (2-4 rectangular cells with ids that skip numbers) and `cell_truth.csv`
    (each cell labelled with a non-empty subset of its image's labels, confidence 1)."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    ids, targets, truth = [], [], []
    for i in range(n):
        image_id = f"img{i:02d}"
        height, width = int(rng.integers(36, 50)), int(rng.integers(52, 68))
        labels = np.zeros((height, width), dtype=np.int32)
        quadrants = [(y, x) for y in (0, height // 2) for x in (0, width // 2)]
        for k, (y, x) in enumerate(quadrants[:int(rng.integers(2, 5))]):
            h, w = int(rng.integers(6, height // 2 - 1)), int(rng.integers(6, width // 2 - 1))
            labels[y + 1:y + 1 + h, x + 1:x + 1 + w] = 3 * k + 2  # ids 2, 5, 8, 11
        write_masks(root / "masks", image_id, labels, labels)
        for channel in CHANNELS:
            if image_id == SIXTEEN_BIT:
                pixels = rng.integers(0, 65536, (height, width)).astype(np.uint16)
            else:
                pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / f"{image_id}_{channel}.png")
        classes = sorted(int(c) for c in rng.choice(18, int(rng.integers(1, 3)), replace=False))
        ids.append(image_id)
        targets.append("|".join(map(str, classes)))
        boxes = tuple(cell_boxes(labels))
        probs = np.zeros((len(boxes), len(HPA2021)))
        for row in range(len(boxes)):
            probs[row, rng.choice(classes, int(rng.integers(1, len(classes) + 1)), replace=False)] = 1.0
        truth.append(submission_row(ScoredCells(image_id, labels, boxes, probs), min_confidence=0.5))
    pd.DataFrame({"ID": ids, "Label": targets}).to_csv(root / "train.csv", index=False)
    write_submission(root / "cell_truth.csv", truth)
    return root


@pytest.fixture(scope="module")
def cell_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cell_dataset(tmp_path_factory.mktemp("cells") / "hpa2021")


def decoded(root: Path, image_id: str) -> np.ndarray:
    """The oracle: the channel files read by PIL, 16-bit to 8 by the `divide` rule (round(v / 257))."""
    planes = []
    for channel in CHANNELS:
        array = np.asarray(Image.open(root / "train" / f"{image_id}_{channel}.png"))
        planes.append(np.rint(array / 257.0).astype(np.uint8) if array.dtype == np.uint16 else array)
    return np.stack(planes)


def pack(root: Path, cache: Path, **kwargs):
    return build_cell_store(root, 16, cache, kwargs.pop("cells", root / "masks"), workers=kwargs.pop("workers", 1),
                            classes=HPA2021, **kwargs)


def test_each_row_is_crop_cell_of_the_decoded_image_with_its_images_labels(cell_data: Path, tmp_path: Path) -> None:
    store = pack(cell_data, tmp_path, workers=2)  # two workers: rows written out of order land in place
    index = pd.read_csv(store.path / "index.csv", dtype={"Id": str, "image_id": str}, keep_default_na=False)
    images = store.images()
    labels = pd.read_csv(cell_data / "train.csv", dtype=str).set_index("ID")["Label"]
    row = 0
    for image_id in labels.index:
        image = decoded(cell_data, image_id)
        mask = np.asarray(Image.open(cell_mask_path(cell_data / "masks", image_id))).astype(np.int32)
        assert image.shape[1] != image.shape[2]  # non-square
        for box in cell_boxes(mask):
            assert np.array_equal(images[row], crop_cell(image, mask, box, 16)), (image_id, box)
            entry = index.iloc[row]
            assert (entry.image_id, entry.cell_id, entry.y0, entry.x0, entry.y1, entry.x1, entry.area) == (
                image_id, box.cell_id, box.y0, box.x0, box.y1, box.x1, box.area)
            assert (entry.image_height, entry.image_width) == mask.shape and entry.Id == f"{image_id}_{box.cell_id}"
            expected = np.zeros(len(HPA2021), dtype=np.uint8)
            expected[[int(c) for c in labels[image_id].split("|")]] = 1
            assert np.array_equal(store.labels[row], expected)  # weak labels: the image's
            row += 1
    assert row == len(store) and store.image_ids == index["image_id"].tolist()
    meta = json.loads((store.path / "meta.json").read_text())
    assert meta["cells"]["cells"] == row and meta["cells"]["images"] == len(labels)


def test_the_split_keeps_each_images_cells_together_and_stats_come_from_train_cells(cell_data: Path,
                                                                                    tmp_path: Path) -> None:
    store = pack(cell_data, tmp_path)
    split = prepare_split(store, val_fraction=0.25, test_fraction=0.25, seed=3)
    by_image = pd.DataFrame({"image": store.image_ids, "split": split.assignment}).groupby("image")["split"]
    assert (by_image.nunique() == 1).all()
    assert sorted(by_image.first().value_counts().to_dict().items()) == [("test", 3), ("train", 6), ("val", 3)]
    train = store.images()[split.indices("train")] / 255.0
    assert np.allclose(split.mean, train.mean(axis=(0, 2, 3)))


def test_changed_masks_pack_a_new_store(tmp_path: Path) -> None:
    root = write_cell_dataset(tmp_path / "data", n=4)
    first = pack(root, tmp_path / "cache")
    assert pack(root, tmp_path / "cache").path == first.path  # unchanged: reused
    labels = np.asarray(Image.open(cell_mask_path(root / "masks", "img02"))).astype(np.int32)
    labels[labels == labels.max()] = 0  # one cell fewer
    write_masks(root / "masks", "img02", labels, labels)
    second = pack(root, tmp_path / "cache")
    assert second.path != first.path and len(second) == len(first) - 1
    capped = pack(root, tmp_path / "cache", max_cells_per_image=2)
    assert pd.Series(capped.image_ids).value_counts().max() == 2
    index = pd.read_csv(capped.path / "index.csv", dtype={"image_id": str})
    for image_id, group in index.groupby("image_id"):  # the largest cells are kept
        mask = np.asarray(Image.open(cell_mask_path(root / "masks", image_id))).astype(np.int32)
        areas = sorted((box.area for box in cell_boxes(mask)), reverse=True)
        assert sorted(group["area"], reverse=True) == areas[:2]


@pytest.mark.parametrize(("damage", "message"), [
    ("missing", r"masks: no cell mask for image img02 \(expected img02_cell_mask.png"),
    ("size", r"img02_cell_mask.png: the mask is \d+x\d+ px but its image is \d+x\d+ px"),
    ("empty", r"img02_cell_mask.png: the mask holds no cell"),
])
def test_a_bad_mask_is_one_line_naming_it_or_skipped(tmp_path: Path, damage: str, message: str) -> None:
    root = write_cell_dataset(tmp_path / "data", n=6)
    path = cell_mask_path(root / "masks", "img02")
    if damage == "missing":
        path.unlink()
    else:
        shape = (10, 12) if damage == "size" else np.asarray(Image.open(path)).shape
        write_masks(root / "masks", "img02", np.zeros(shape, np.int32) + (damage == "size"),
                    np.zeros(shape, np.int32))
    with pytest.raises(DataError, match=message) as caught:
        pack(root, tmp_path / "cache")
    assert "\n" not in str(caught.value)
    store = pack(root, tmp_path / "cache", on_bad_sample="skip", max_bad_fraction=0.5)
    assert "img02" not in store.image_ids and len(set(store.image_ids)) == 5
    assert pd.read_csv(store.path / "skipped.csv")["Id"].tolist() == ["img02"]


def test_the_datamodule_refuses_a_truth_file_without_a_test_image(cell_data: Path, tmp_path: Path) -> None:
    truth = read_submission(cell_data / "cell_truth.csv", truth=True)
    split = {"seed": 3, "val_fraction": 0.25, "test_fraction": 0.25}
    module = CellDataModule(cell_data, image_size=16, cache_dir=str(tmp_path), cells=str(cell_data / "masks"),
                            cell_truth=str(cell_data / "cell_truth.csv"), classes="hpa2021", split=split,
                            num_workers=0, pack_workers=1)
    module.prepare_data()
    module.setup("fit")
    test_images = module.test_images()
    assert len(test_images) == 3 and set(test_images) <= set(truth)
    partial = tmp_path / "partial.csv"
    write_submission(partial, [image for image_id, image in truth.items() if image_id != test_images[1]])
    module = CellDataModule(cell_data, image_size=16, cache_dir=str(tmp_path), cells=str(cell_data / "masks"),
                            cell_truth=str(partial), classes="hpa2021", split=split, num_workers=0)
    with pytest.raises(DataError, match=f"partial.csv: no row for test image {test_images[1]} \\(1 of 3"):
        module.setup("fit")


def test_the_cell_config_composes_with_every_experiment() -> None:
    for experiment in sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")):
        cfg = compose_config([f"+experiment={experiment}", "data=hpa2021_cells", "data.root=/d", "data.cells=/m"])
        assert cfg.data._target_ == "hpa_lightning.data.cell_store.CellDataModule"
        assert cfg.data.classes == "hpa2021" and cfg.data.sixteen_bit == "percentile" and cfg.data.synthetic is None
        assert cfg.data.cells == "/m" and cfg.data.cell_truth is None and cfg.data.max_cells_per_image is None
    with pytest.raises(DataError, match="data.cells: required"):
        CellDataModule("/d", cells=None, classes="hpa2021")

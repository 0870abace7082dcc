"""The cell store (`data=hpa2021_cells`): a row per cell, cut from its full-resolution image by `cells.crops.crop_cell`.

Each row of the packed store (data/store.py's layout, read by the same loader, split and statistics) is one cell of
a source image: its crop (bounding box, pixels outside the cell zeroed, padded square, resized to `data.image_size`)
with its image's labels (weak labels: a pattern is in some of the image's cells, not necessarily this one).

Packing runs in two passes over the images with store.py's workers: the masks (`data.cells`, any form
`cells.masks.find_cell_mask` finds) give each image's cells and so every image's first row; then each image is decoded
once at its own resolution (`sources.load_sample(size=None)`: the 16-bit rule, RGB planes and pixel bound of every
other sample), its mask read again and checked against it, and its crops written into their rows. index.csv carries
the image id, cell id, bounding box, area and image size of every row; `PackedStore.groups` keeps the cells of one
image together in the split, so the split is stratified on image labels and grouped by image.

The store's name holds the fingerprint of the sources, of the masks folder (name, size, mtime of every file), of the
crop rule (`cells.crops.CROP_RULE`) and of `max_cells_per_image`: changed masks pack a new store.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from hpa_lightning.cells.crops import CROP_RULE, CellBox, cell_boxes, crop_cell
from hpa_lightning.cells.masks import find_cell_mask, load_cell_mask, read_label_image
from hpa_lightning.classes import CHANNELS, HPA2018, ClassSet
from hpa_lightning.data.datamodule import HPADataModule
from hpa_lightning.data.sources import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DataSource,
    LabelTable,
    load_sample,
    parse_sources,
    read_sources,
)
from hpa_lightning.data.store import (
    STORE_FORMAT,
    PackedStore,
    _check_skipped,
    _compact_rows,
    _RowWriter,
    _truncate_rows,
    _write_all,
    check_free_space,
    check_pack_options,
    hash_folder,
    sources_fingerprint,
    store_path,
)
from hpa_lightning.errors import DataError
from hpa_lightning.files import atomic_folder, exclusive, remove_stale_temporaries, write_json_atomic
from hpa_lightning.machine import available_cpus

log = logging.getLogger(__name__)

CELL_COLUMNS = ("image_id", "cell_id", "y0", "x0", "y1", "x1", "area", "image_height", "image_width")


def check_cell_options(cells: object, max_cells_per_image: object) -> tuple[Path, int | None]:
    if cells in (None, "", "???"):
        raise DataError("data.cells: required with data=hpa2021_cells (the folder of {ID}_cell_mask.png label images, "
                        "e.g. written by python -m hpa_lightning.segment)")
    if max_cells_per_image is not None and (isinstance(max_cells_per_image, bool) or
                                            not isinstance(max_cells_per_image, int) or max_cells_per_image < 1):
        raise DataError(f"data.max_cells_per_image={max_cells_per_image!r}: expected a whole number >= 1 or null (all "
                        f"cells)")
    return Path(str(cells)), max_cells_per_image


def cells_fingerprint(sources: list[DataSource], masks: Path, max_cells_per_image: int | None) -> str:
    digest = hashlib.sha256(sources_fingerprint(sources).encode())
    digest.update(f"\0cells {masks.resolve()}\0{CROP_RULE}\0max{max_cells_per_image}\n".encode())
    hash_folder(digest, masks)
    return digest.hexdigest()


def cell_store_path(root: object, size: int, cache_dir: str | Path, cells: str | Path, image_dir: str = "train",
                    on_bad_sample: str = "error", sixteen_bit: str = "divide", classes: ClassSet = HPA2018,
                    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_cells_per_image: int | None = None,
                    fingerprint: str | None = None) -> Path:
    sources = parse_sources(root, image_dir)
    fingerprint = fingerprint or cells_fingerprint(sources, Path(cells), max_cells_per_image)
    image_store = store_path(root, size, cache_dir, image_dir, on_bad_sample, fingerprint, sixteen_bit, "drop",
                             classes, max_image_pixels)
    return image_store.with_name(image_store.name + "-cells")


def keep_cells(boxes: list[CellBox], max_cells: int | None) -> list[CellBox]:
    """At most `max_cells` of an image's cells: the largest (cells cut by the image border are the small ones), in id
    order."""
    if max_cells is None or len(boxes) <= max_cells:
        return boxes
    largest = sorted(boxes, key=lambda box: (-box.area, box.cell_id))[:max_cells]
    return sorted(largest, key=lambda box: box.cell_id)


class _MaskBoxes:
    """Pass 1, in the packing workers: (row, image folder, Id) -> (row, None, (mask shape, boxes)), or (row, reason,
    None) for a bad mask when skipping."""

    def __init__(self, masks: Path, skip_bad: bool, max_cells: int | None, max_pixels: int):
        self.masks, self.skip_bad, self.max_cells, self.max_pixels = masks, skip_bad, max_cells, max_pixels

    def __call__(self, task: tuple[int, str, str]) -> tuple[int, str | None, object]:
        row, _, image_id = task
        try:
            path = find_cell_mask(self.masks, image_id)
            if path is None:  # load_cell_mask's one line for a missing mask
                load_cell_mask(self.masks, image_id, 0, 0, self.max_pixels)
            labels = read_label_image(path, self.max_pixels)
            boxes = keep_cells(cell_boxes(labels), self.max_cells)
            if not boxes:
                raise DataError(f"{path}: the mask holds no cell")
        except DataError as err:
            if not self.skip_bad:
                raise
            return row, str(err), None
        return row, None, (labels.shape, boxes)

    def close(self) -> None:
        pass


@dataclass
class _CellCrops:
    """Pass 2: (image folder, Id) -> uint8 (cells, 4, size, size), the image decoded once at its own resolution."""

    masks: Path
    boxes: dict[str, list[CellBox]]
    size: int
    sixteen_bit: str
    max_pixels: int

    def __call__(self, image_dir: str, image_id: str) -> np.ndarray:
        image = load_sample(image_dir, image_id, None, self.sixteen_bit, self.max_pixels)
        labels = load_cell_mask(self.masks, image_id, image.shape[1], image.shape[2], self.max_pixels)
        return np.stack([crop_cell(image, labels, box, self.size) for box in self.boxes[image_id]])


def build_cell_store(root: object, size: int, cache_dir: str | Path, cells: str | Path, image_dir: str = "train",
                     workers: int | None = None, progress: bool = False, on_bad_sample: str = "error",
                     max_bad_fraction: float = 0.01, sixteen_bit: str = "divide", classes: ClassSet = HPA2018,
                     max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     max_cells_per_image: int | None = None) -> PackedStore:
    """Pack the cells of `root`'s images (masks in `cells`) at `size` px unless that store exists; returns it opened.
    A missing mask, one of another size than its image or holding no cell is one line naming the file, or (with
    `on_bad_sample="skip"`) its image is left out like an unreadable one."""
    max_image_pixels = check_pack_options(size, on_bad_sample, sixteen_bit, "drop", max_image_pixels)
    masks, max_cells_per_image = check_cell_options(cells, max_cells_per_image)
    sources = parse_sources(root, image_dir)
    if len(sources) > 1:
        raise DataError(f"data.root: data=hpa2021_cells packs one folder ({len(sources)} given); merge the sources "
                        f"into one folder with one train.csv")
    if not sources[0].image_dir.is_dir():
        raise DataError(f"{sources[0].image_dir}: image folder not found")
    if not masks.is_dir():
        raise DataError(f"{masks}: cell mask folder not found (data.cells)")
    table, _ = read_sources(sources, classes)
    fingerprint = cells_fingerprint(sources, masks, max_cells_per_image)
    target = cell_store_path(root, size, cache_dir, masks, image_dir, on_bad_sample, sixteen_bit, classes,
                             max_image_pixels, max_cells_per_image, fingerprint)
    if not (target / "meta.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(target):
            if not (target / "meta.json").is_file():  # else packed by the job we waited for
                _pack_cells(sources[0], table, target, size, fingerprint, classes, masks,
                            workers=workers or available_cpus(), progress=progress, on_bad_sample=on_bad_sample,
                            max_bad_fraction=max_bad_fraction, sixteen_bit=sixteen_bit,
                            max_image_pixels=max_image_pixels, max_cells=max_cells_per_image)
    return PackedStore.open(target)


def _pack_cells(source: DataSource, table: LabelTable, target: Path, size: int, fingerprint: str, classes: ClassSet,
                masks: Path, *, workers: int, progress: bool, on_bad_sample: str, max_bad_fraction: float,
                sixteen_bit: str, max_image_pixels: int, max_cells: int | None) -> None:
    skip = on_bad_sample == "skip"
    remove_stale_temporaries(target)
    tasks = [(row, str(source.image_dir), image_id) for row, image_id in enumerate(table.ids)]
    failures: dict[str, str] = {}
    found: dict[int, tuple[tuple[int, int], list[CellBox]]] = {}
    for row, reason, result in _write_all(_MaskBoxes(masks, skip, max_cells, max_image_pixels), tasks, workers):
        if reason is not None:
            failures[table.ids[row]] = reason
        else:
            found[row] = result  # type: ignore[assignment]
    images = sorted(found)  # image rows of the label table, each with its cells in consecutive store rows
    first_row = np.cumsum([0] + [len(found[row][1]) for row in images])
    total = int(first_row[-1])
    check_free_space(target.parent, total, size)
    with atomic_folder(target, marker="meta.json") as tmp:
        header_bytes = open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                   shape=(total, len(CHANNELS), size, size)).offset
        crops = _CellCrops(masks, {table.ids[row]: found[row][1] for row in images}, size, sixteen_bit,
                           max_image_pixels)
        writer = _RowWriter(tmp / "images.npy", header_bytes, size, skip_bad=skip, sixteen_bit=sixteen_bit,
                            max_pixels=max_image_pixels, decode=crops)
        image_at = {int(first_row[k]): row for k, row in enumerate(images)}
        written = _write_all(writer, [(int(first_row[k]), str(source.image_dir), table.ids[row])
                                      for k, row in enumerate(images)], workers)
        if progress:
            from tqdm import tqdm

            written = tqdm(written, total=len(images), desc=f"packing the cells of {source.name} at {size}px",
                           unit="image")
        for first, reason, _ in written:
            if reason is not None:
                failures[table.ids[image_at[first]]] = reason
        skipped = [(image_id, failures[image_id]) for image_id in table.ids if image_id in failures]
        if skipped:
            _check_skipped(skipped, len(table), max_bad_fraction)
        kept_images = [row for row in images if table.ids[row] not in failures]
        first_of = {row: int(first_row[k]) for k, row in enumerate(images)}
        rows = [first_of[row] + k for row in kept_images for k in range(len(found[row][1]))]
        if len(rows) < total:
            _compact_rows(tmp / "images.npy", header_bytes, writer.row_bytes, rows)
            _truncate_rows(tmp / "images.npy", len(rows))
        if skipped:
            pd.DataFrame(skipped, columns=["Id", "error"]).to_csv(tmp / "skipped.csv", index=False)
        index = [(f"{table.ids[row]}_{box.cell_id}", table.targets[row], table.ids[row], box.cell_id, box.y0, box.x0,
                  box.y1, box.x1, box.area, *found[row][0]) for row in kept_images for box in found[row][1]]
        pd.DataFrame(index, columns=["Id", "Target", *CELL_COLUMNS]).to_csv(tmp / "index.csv", index=False)
        np.save(tmp / "labels.npy", table.labels[[row for row in kept_images for _ in found[row][1]]]
                .reshape(len(rows), len(classes)))
        meta = {"format": STORE_FORMAT, "source": str(source.root.resolve()), "image_dir": source.image_dir.name,
                "image_size": size, "num_samples": len(rows), "skipped_samples": len(skipped),
                "on_bad_sample": on_bad_sample, "sixteen_bit": sixteen_bit, "max_image_pixels": max_image_pixels,
                "sources": [{"root": str(source.root.resolve()), "csv": str(source.csv.resolve()),
                             "image_dir": str(source.image_dir.resolve()), "samples": len(table),
                             "kept": len(kept_images)}],
                "duplicates": {"policy": "drop", "pairs": 0},
                "cells": {"masks": str(masks.resolve()), "crop_rule": CROP_RULE, "max_cells_per_image": max_cells,
                          "images": len(kept_images), "cells": len(rows)},
                "channels": list(CHANNELS), "num_classes": len(classes), "classes": classes.name,
                "class_names": list(classes.names), "fingerprint": fingerprint}
        write_json_atomic(tmp / "meta.json", meta)


class CellDataModule(HPADataModule):
    """HPADataModule over the cell store: every sample one cell of an image, labelled with its image's labels.

    Args (besides HPADataModule's):
        cells: the folder of the images' cell masks (`{ID}_cell_mask.png` or any form `cells.masks` reads).
        cell_truth: an HPA 2021 cell truth CSV (`ID,ImageWidth,ImageHeight,PredictionString`, confidence 1): after the
            test stage the test split's cells are scored against its rows of the test images (runs/cell_evaluation).
        max_cells_per_image: keep at most this many cells of an image (its largest); None keeps all.
    """

    def __init__(self, *args, cells: str | None = None, cell_truth: str | None = None,
                 max_cells_per_image: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cells, self.max_cells_per_image = check_cell_options(cells, max_cells_per_image)
        self.cell_truth = Path(str(cell_truth)) if cell_truth else None
        if self.cell_truth is not None and not self.cell_truth.is_file():
            raise DataError(f"{self.cell_truth}: cell truth file not found (data.cell_truth)")
        if self.cell_truth is not None and self.class_set.name != "hpa2021":
            raise DataError(f"data.cell_truth: the cell mAP scores HPA 2021's classes, but data.classes="
                            f"{self.class_set.name}; train on data.classes=hpa2021 or leave data.cell_truth=null")
        self.cell_index: pd.DataFrame | None = None

    def build_store(self) -> PackedStore:
        return build_cell_store(self.root_spec, self.image_size, self.cache_dir, self.cells, self.image_dir,
                                workers=self.pack_workers, progress=True, on_bad_sample=self.on_bad_sample,
                                max_bad_fraction=self.max_bad_fraction, sixteen_bit=self.sixteen_bit,
                                classes=self.class_set, max_image_pixels=self.max_image_pixels,
                                max_cells_per_image=self.max_cells_per_image)

    def store_path(self) -> Path:
        return cell_store_path(self.root_spec, self.image_size, self.cache_dir, self.cells, self.image_dir,
                               self.on_bad_sample, self.sixteen_bit, self.class_set, self.max_image_pixels,
                               self.max_cells_per_image)

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        super().setup(stage)
        assert self.store is not None
        self.cell_index = pd.read_csv(self.store.path / "index.csv", dtype={"Id": str, "image_id": str},
                                      keep_default_na=False)
        if self.cell_truth is not None:
            self.check_truth_covers_test()

    def cells_of(self, rows: np.ndarray) -> pd.DataFrame:
        """index.csv's cell columns of store `rows` (image id, cell id, box, area, image size), in that order."""
        assert self.cell_index is not None, "setup() first"
        return self.cell_index.iloc[np.asarray(rows, dtype=np.int64)][list(CELL_COLUMNS)].reset_index(drop=True)

    def test_images(self) -> list[str]:
        return list(dict.fromkeys(self.cells_of(self.datasets["test"].indices)["image_id"]))

    def check_truth_covers_test(self) -> None:
        """Before training: every test image has a row in the cell truth file (one line naming the first that has
        not)."""
        from hpa_lightning.cells.submission import read_submission

        assert self.cell_truth is not None
        truth = read_submission(self.cell_truth, truth=True)
        missing = [image_id for image_id in self.test_images() if image_id not in truth]
        if missing:
            raise DataError(f"{self.cell_truth}: no row for test image {missing[0]} ({len(missing)} of "
                            f"{len(self.test_images())} test images have none); data.cell_truth must hold every image "
                            f"of data.root")

    def cells_summary(self) -> dict:
        """The store's cell counts and where the masks came from, for results.json."""
        assert self.store is not None, "setup() first"
        return json.loads((self.store.path / "meta.json").read_text()).get("cells", {})

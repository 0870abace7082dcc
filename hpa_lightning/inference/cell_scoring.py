"""Per-cell prediction (HPA 2021): every cell of an image gets its own class probabilities, four ways.

- `image`: each cell gets its image's probabilities ("copy the image labels to every cell"), the baseline.
- `cam`: an image model's probability of class k times the share of the class's activation map that the cell holds,
  its mean positive CAM over the strongest cell's of the image (the 3rd-place idea of HPA 2021): no new training.
- `crop`: a cell model (trained with `data=hpa2021_cells` on crops, `cells/crops.py`) scores each cell's crop.
- `blend`: `cell_weight` x crop + (1 - `cell_weight`) x cam: cell and image evidence mixed (4th place took 0.7).

The cell methods also say Negative where no class is found: a cell's Negative probability is at least 1 minus its
highest other probability. Image-level training labels call an image Negative only when all its cells are, so a
model alone would rank a negative cell of a positive image low.

Decoding, masks (a folder, or segmentation on the fly) and crops run in DataLoader workers, one image per item at
its own size; the networks run in the main process on the device.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from hpa_lightning.cells.crops import CellBox, cell_boxes, crop_cell
from hpa_lightning.cells.masks import load_cell_mask
from hpa_lightning.cells.scores import ScoredCells, with_negative
from hpa_lightning.classes import CHANNELS
from hpa_lightning.data.sources import DEFAULT_MAX_IMAGE_PIXELS, channel_path, load_sample, resize_square
from hpa_lightning.data.store import JPEG_SUFFIXES
from hpa_lightning.errors import DataError, InferenceError
from hpa_lightning.inference.load import InferenceModel
from hpa_lightning.inference.tta import tta_probabilities
from hpa_lightning.models.class_maps import raw_class_maps

CELL_SCORES = ("cam", "crop", "blend", "image")
SEGMENT_SIXTEEN_BIT = "percentile"  # how the `segment` command reads 16-bit channels (its default)
DEFAULT_CELL_WEIGHT = 0.7

Segmenter = Callable[[np.ndarray], np.ndarray]  # uint8 (4, H, W) RGBY -> int (H, W) cell label image


def needs_image_model(method: str) -> bool:
    return method in ("cam", "blend", "image")


def needs_cell_model(method: str) -> bool:
    return method in ("crop", "blend")


@dataclass(frozen=True)
class CellItem:
    """One image as the workers hand it over: its cells, the image at the image model's side, the cells' crops."""

    image_id: str
    labels: np.ndarray
    boxes: tuple[CellBox, ...]
    image: torch.Tensor | None  # uint8 (4, S, S)
    crops: torch.Tensor | None  # uint8 (cells, 4, s, s)
    error: str = ""


class CellImageDataset(Dataset):
    """Per image: the four channels at their own size, its cell mask (from `masks`, else `segment`), the image
    resized for the image model (as `load_sample` packs it) and each cell's crop for the cell model."""

    def __init__(self, image_dir: Path, ids: list[str], masks: Path | None, segment: Segmenter | None,
                 image_size: int | None, crop_size: int | None, sixteen_bit: str = "divide",
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if (masks is None) == (segment is None):
            raise ValueError("give a masks folder or a segmenter, not both")
        self.image_dir, self.ids, self.masks, self.segment = image_dir, ids, masks, segment
        self.image_size, self.crop_size = image_size, crop_size
        self.sixteen_bit, self.max_pixels = sixteen_bit, max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> CellItem:
        image_id = self.ids[i]
        try:
            full = load_sample(self.image_dir, image_id, None, self.sixteen_bit, self.max_pixels)
            height, width = full.shape[1:]
            if self.masks is not None:
                labels = load_cell_mask(self.masks, image_id, height, width)
            else:
                # segmented as the `segment` command reads images: a low-range 16-bit channel divided down to 8 bits
                # would leave the thresholds almost nothing to work on
                seen = full if self.sixteen_bit == SEGMENT_SIXTEEN_BIT else load_sample(
                    self.image_dir, image_id, None, SEGMENT_SIXTEEN_BIT, self.max_pixels)
                labels = np.asarray(self.segment(seen), dtype=np.int32)
                if not labels.any():
                    raise DataError(f"{self.image_dir}: no cell found in image {image_id} by segmentation")
        except DataError as err:
            return CellItem(image_id, np.zeros((1, 1), np.int32), (), None, None, str(err))
        boxes = tuple(cell_boxes(labels))
        image = torch.from_numpy(self._image_input(image_id, full)) if self.image_size else None
        crops = (torch.from_numpy(np.stack([crop_cell(full, labels, box, self.crop_size) for box in boxes]))
                 if self.crop_size else None)
        return CellItem(image_id, labels, boxes, image, crops)


    def _image_input(self, image_id: str, full: np.ndarray) -> np.ndarray:
        """The image as the image model's store packed it: JPGs decoded again at a reduced DCT scale as the packer
        decodes them (the full decode resized would differ by a grey level or two), other files resized."""
        if channel_path(self.image_dir, image_id, CHANNELS[0]).suffix.lower() in JPEG_SUFFIXES:
            return load_sample(self.image_dir, image_id, self.image_size, self.sixteen_bit, self.max_pixels)
        return np.stack([resize_square(plane, self.image_size) for plane in full])


def _one(items: list[CellItem]) -> CellItem:
    return items[0]


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """A label image resized to (size, size) by nearest neighbour at pixel centres, as the image was squared."""
    height, width = labels.shape
    rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * width / size).astype(np.int64), width - 1)
    return labels[rows[:, None], cols[None, :]]


def cell_activation_means(maps: np.ndarray, labels: np.ndarray, boxes: tuple[CellBox, ...]) -> np.ndarray:
    """(cells, C) mean of the (C, S, S) maps over each cell, the cell's mask taken to the maps' grid; a cell too small
    to hold a pixel of the grid takes the value at its box's centre."""
    size = maps.shape[-1]
    small = resize_labels(labels, size).ravel()
    ids = np.array([box.cell_id for box in boxes], dtype=np.int64)
    lookup = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    slot = lookup[small]
    inside = slot >= 0
    counts = np.bincount(slot[inside], minlength=len(ids)).astype(np.float64)
    flat = maps.reshape(maps.shape[0], -1)
    sums = np.stack([np.bincount(slot[inside], weights=channel[inside], minlength=len(ids)) for channel in flat], 1)
    means = sums / np.maximum(counts, 1.0)[:, None]
    height, width = labels.shape
    for j in np.flatnonzero(counts == 0):
        box = boxes[j]
        y = min(int((box.y0 + box.y1) / 2 * size / height), size - 1)
        x = min(int((box.x0 + box.x1) / 2 * size / width), size - 1)
        means[j] = maps[:, y, x]
    return means


def cam_scores(maps: np.ndarray, labels: np.ndarray, boxes: tuple[CellBox, ...], image_probs: np.ndarray) -> np.ndarray:
    """(cells, C): the image's probability of each class times the cell's share of its positive activation (its mean
    over the image's strongest cell's mean). A class without positive activation in any cell says nothing about
    where it is: every cell gets the image's probability."""
    means = cell_activation_means(np.maximum(maps, 0.0), labels, boxes)
    peak = means.max(axis=0, keepdims=True)
    share = np.divide(means, peak, out=np.ones_like(means), where=peak > 0)
    return image_probs[None, :] * share


def combine(method: str, image_probs: np.ndarray | None, cam: np.ndarray | None, crop: np.ndarray | None,
            cells: int, class_names: list[str], cell_weight: float = DEFAULT_CELL_WEIGHT) -> np.ndarray:
    """(cells, C) scores of `method` from its parts."""
    if method == "image":
        return np.repeat(image_probs[None, :], cells, axis=0)
    if method == "cam":
        scores = cam
    elif method == "crop":
        scores = crop
    elif method == "blend":
        scores = cell_weight * crop + (1.0 - cell_weight) * cam
    else:
        raise InferenceError(f"cell_score={method}: expected one of {', '.join(CELL_SCORES)}")
    return with_negative(np.clip(scores, 0.0, 1.0), class_names)


def image_cell_scores(model: InferenceModel, image: torch.Tensor, labels: np.ndarray, boxes: tuple[CellBox, ...],
                      tta: int = 1, channels_last: bool = False, cam_method: str = "auto",
                      with_cam: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """An image model's (C,) probabilities of the uint8 (4, S, S) image (its `tta` views) and, `with_cam`, its
    (cells, C) cam scores (`cam_scores`; the maps of the image itself, upsampled to S bilinearly)."""
    device = next(model.net.parameters()).device
    uint8 = image[None].to(device)
    with torch.no_grad():
        probs = _probabilities(model, uint8, tta, channels_last)[0].float().cpu().numpy()
    if not with_cam:
        return probs, None
    every = torch.arange(model.num_classes, device=device)[None]
    raw, _ = raw_class_maps(model.net, model.standardize(uint8), every, cam_method)
    maps = F.interpolate(raw.float(), size=uint8.shape[-2:], mode="bilinear", align_corners=False)
    return probs, cam_scores(maps[0].cpu().numpy(), labels, boxes, probs)


def _probabilities(model: InferenceModel, uint8: torch.Tensor, tta: int, channels_last: bool) -> torch.Tensor:
    return tta_probabilities(model.net, model.standardize(uint8), tta, channels_last)


def score_cells(dataset: CellImageDataset, method: str, image_model: InferenceModel | None,
                cell_model: InferenceModel | None, *, cell_weight: float = DEFAULT_CELL_WEIGHT, tta: int = 1,
                batch_size: int = 32, workers: int = 0, device: torch.device | str = "cpu",
                channels_last: bool = True, cam_method: str = "auto", progress: bool = False,
                on_bad_sample: str = "error") -> tuple[list[ScoredCells], dict[str, str]]:
    """Every image's ScoredCells in the dataset's order, and the images skipped ({id: why}; `on_bad_sample=skip`)."""
    from tqdm import tqdm

    device = torch.device(device)
    class_names = (image_model or cell_model).class_names
    for model in (image_model, cell_model):
        if model is not None:
            model.to(device).net.eval()
            if channels_last:
                model.net.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers, collate_fn=_one)
    scored, skipped = [], {}
    with tqdm(total=len(dataset), desc=f"cells ({method})", unit="img", disable=not progress, file=sys.stderr) as bar:
        for item in loader:
            bar.update(1)
            if item.error:
                if on_bad_sample != "skip":
                    bar.leave = False
                    bar.close()
                    raise DataError(item.error)
                skipped[item.image_id] = item.error
                continue
            image_probs = cam = crop = None
            if image_model is not None:
                image_probs, cam = image_cell_scores(image_model, item.image, item.labels, item.boxes, tta=tta,
                                                     channels_last=channels_last, cam_method=cam_method,
                                                     with_cam=method != "image")
            if cell_model is not None:
                parts = []
                with torch.no_grad():
                    for start in range(0, len(item.boxes), batch_size):
                        chunk = item.crops[start:start + batch_size].to(device)
                        parts.append(_probabilities(cell_model, chunk, tta, channels_last).float().cpu())
                crop = torch.cat(parts).numpy()
            scores = combine(method, image_probs, cam, crop, len(item.boxes), class_names, cell_weight)
            scored.append(ScoredCells(item.image_id, item.labels, item.boxes, scores.astype(np.float64)))
    return scored, skipped

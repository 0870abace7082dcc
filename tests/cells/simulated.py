"""Synthetic HPA images with their true cell and nucleus masks, drawn by the simulator (as `render_sample` draws the
landmark channels), for the segmentation tests."""

from __future__ import annotations

import math

import numpy as np

from hpa_lightning.data.simulator.landmarks import draw_microtubules, draw_nuclei, draw_reticulum
from hpa_lightning.data.simulator.scene import build_scene, unit_noise

MIN_VISIBLE = 0.25  # a true cell cut by the border to less than this share of its ellipse area is dropped from truth


def simulated_cells(seed: int, size: int = 512, zoom: float = 1.0, mitotic: bool = False, dividing: bool = False,
                    dtype: type = np.uint8) -> dict[str, np.ndarray]:
    """blue, red, yellow channels (`dtype`: uint8, or uint16 low-range as HPA 2021 PNGs) and the true `cells` and
    `nuclei` labels (int32, id = simulator cell index + 1, 0 background; cells mostly outside the image removed)."""
    rng = np.random.default_rng(seed)
    scene = build_scene(size, rng, mitotic, dividing, zoom)
    red, yellow, blue = draw_microtubules(scene), draw_reticulum(scene), draw_nuclei(scene)
    gains = scene.gain_map(rng.uniform(0.7, 1.0, len(scene.cells)))
    top = 255 if dtype == np.uint8 else 4000
    out = {}
    for name, image in (("red", red), ("yellow", yellow), ("blue", blue)):
        value = image * gains * np.float32(rng.uniform(0.45, 0.9) * top / (float(image.max()) + 1e-6))
        value += np.float32(rng.uniform(0.5, 6.0) * top / 255)
        value += unit_noise(rng, (size, size)) * (np.float32(0.4 * top / 255) + np.float32(0.25) * np.sqrt(value))
        out[name] = np.clip(np.rint(value), 0, top).astype(dtype)
    cells = scene.owner.astype(np.int32) + 1
    for index, cell in enumerate(scene.cells):
        if np.count_nonzero(cells == index + 1) < MIN_VISIBLE * math.pi * cell.a * cell.b:
            cells[cells == index + 1] = 0
    out["cells"] = cells
    out["nuclei"] = np.where(scene.nrho < 1.0, cells, 0).astype(np.int32)
    return out


def iou_matrix(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth ids, predicted ids, IoU of every pair), exact: intersections counted from the pixel pairs."""
    t_ids, p_ids = np.unique(truth[truth > 0]), np.unique(pred[pred > 0])
    joint = np.bincount(truth.ravel().astype(np.int64) * (int(pred.max()) + 1) + pred.ravel(),
                        minlength=(int(truth.max()) + 1) * (int(pred.max()) + 1)).reshape(-1, int(pred.max()) + 1)
    inter = joint[np.ix_(t_ids, p_ids)].astype(np.float64)
    union = joint.sum(axis=1)[t_ids][:, None] + joint.sum(axis=0)[p_ids][None, :] - inter
    return t_ids, p_ids, inter / np.maximum(union, 1)


def recall_at(truth: np.ndarray, pred: np.ndarray, iou: float = 0.6) -> tuple[int, int]:
    """(true cells matched by a predicted cell at IoU >= `iou`, true cells); at IoU > 0.5 a match is one-to-one."""
    t_ids, _, pairs = iou_matrix(truth, pred)
    if not len(t_ids):
        return 0, 0
    return int((pairs.max(axis=1, initial=0.0) >= iou).sum()), len(t_ids)

"""Synthetic HPA 2021 single-cell data: the 2021 classes drawn by the 2018 painters, heterogeneous cells, and the
cell masks and per-cell truth of what was actually drawn.

The rules (docs/data.md, "Synthetic single cells"):

- Classes: each hpa2021 class is drawn by one of the 2018 patterns in `HPA2021_FROM_2018`; 2018 classes 16
  (cytokinetic bridge) and 27 (rods & rings) have no 2021 class and are never drawn. A dataset draws 2018 label sets
  with Kaggle's frequencies and maps them (`hpa2021_patterns`); an image left without labels is Negative (18).
- Heterogeneity: an image label is painted in a random non-empty subset of the cells that can show it (the painter's
  cell kinds, e.g. the mitotic spindle only in mitotic cells, and never in a border fragment); the others get gain 0.
- Truth from the drawing: each label is painted on its own canvas and its green mass per cell measured; a cell shows
  the label when its green per pixel is at least `SHOWN_FRACTION` of the strongest cell's. Green of that label in
  any other cell (blur bleeding over from a neighbour, a faint remnant) is then erased, so a cell shows a label
  exactly when its truth says so. A label shown by no cell is painted once more in every cell that can show it, and
  dropped from the image if still none shows it. A cell showing none of its image's labels is Negative.
- Masks: the cell mask is the scene's owner map, the nuclei mask the same ids where the scene's nucleus is (`nrho < 1`:
  the nucleus, or the metaphase plate of a mitotic cell). A cell whose visible pixels are fewer than `MIN_CELL_FRACTION`
  of its full ellipse (pi * a * b; cut by the image border or covered by neighbours) is a fragment: it is left out of
  both masks and of truth and shows no label. The cells left are numbered 1..k in scene order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpa_lightning.cells.masks import write_masks
from hpa_lightning.cells.rle import encode_mask
from hpa_lightning.cells.submission import CellPrediction, ImageCells, write_submission
from hpa_lightning.data.simulator.landmarks import stain_landmarks
from hpa_lightning.data.simulator.patterns import GREEN_PAINTERS
from hpa_lightning.data.simulator.scene import Canvas, Scene
from hpa_lightning.data.simulator.sensor import expose

# The one statement of the mapping: hpa2021 class id <- the 2018 pattern(s) that draw it.
HPA2021_FROM_2018: dict[int, tuple[int, ...]] = {
    0: (0,),  # Nucleoplasm
    1: (1,),  # Nuclear membrane
    2: (2,),  # Nucleoli
    3: (3,),  # Nucleoli fibrillar center
    4: (4,),  # Nuclear speckles
    5: (5,),  # Nuclear bodies
    6: (6,),  # Endoplasmic reticulum
    7: (7,),  # Golgi apparatus
    8: (11,),  # Intermediate filaments
    9: (12, 13),  # Actin filaments <- actin filaments, focal adhesion sites
    10: (14, 15),  # Microtubules <- microtubules, microtubule ends
    11: (17,),  # Mitotic spindle
    12: (18, 19),  # Centrosome <- microtubule organizing center, centrosome
    13: (21, 22),  # Plasma membrane <- plasma membrane, cell junctions
    14: (23,),  # Mitochondria
    15: (24,),  # Aggresome
    16: (25,),  # Cytosol
    17: (8, 9, 10, 20, 26),  # Vesicles and punctate cytosolic patterns <- peroxisomes, endosomes, lysosomes, lipid
    #                           droplets, cytoplasmic bodies
}
NEGATIVE = 18
NUM_CLASSES_2021 = 19
HPA2018_TO_2021 = {pattern: label for label, patterns in HPA2021_FROM_2018.items() for pattern in patterns}

MIN_CELL_FRACTION = 0.25  # a cell with fewer visible pixels than this share of its ellipse is a fragment
SHOWN_FRACTION = 0.2  # a cell shows a label when its green per pixel is >= this share of the strongest cell's
SHOW_RATE = (0.3, 0.8)  # per label, each cell that can show it does with a chance drawn from this range

# Cell kinds a 2018 painter draws in (the others: every kind); the measurement decides the rest.
_NOT_MITOTIC = ("interphase", "daughter")
_KINDS: dict[int, tuple[str, ...]] = {1: _NOT_MITOTIC, 2: _NOT_MITOTIC, 3: _NOT_MITOTIC, 7: _NOT_MITOTIC,
                                      11: _NOT_MITOTIC, 12: _NOT_MITOTIC, 13: _NOT_MITOTIC, 15: _NOT_MITOTIC,
                                      17: ("mitotic",), 24: _NOT_MITOTIC}
_MITOTIC_SPINDLE_2018 = 17

TRUTH_FILE = "cell_truth.csv"
LABEL_FILE = "train.csv"
MASK_DIR = "masks"
_SCRATCH_DIR = ".cells"  # per-image labels and truth written by the workers, gathered and removed by the parent


@dataclass(frozen=True)
class CellSample:
    """One rendered image and its truth: `cell_labels[i]` are the labels of cell id i + 1 (sorted, [18] =
    Negative); `labels` the image's labels (the union over its cells, or [18])."""

    image: np.ndarray  # uint8 (4, H, W): red, green, blue, yellow
    cell_mask: np.ndarray  # uint16 (H, W): 0 background, cells 1..k
    nuclei_mask: np.ndarray  # uint16 (H, W): the cell's id inside its nucleus, 0 elsewhere
    cell_labels: list[list[int]]
    labels: list[int]


def hpa2021_patterns(labels_2018: Sequence[int], rng: np.random.Generator) -> dict[int, int]:
    """The 2021 labels of a 2018 label set, each with the 2018 pattern that draws it: one of the set's members of
    that class, chosen at random. 16 and 27 are dropped; an empty result is a Negative image."""
    members: dict[int, list[int]] = {}
    for pattern in sorted({int(c) for c in labels_2018}):
        if pattern in HPA2018_TO_2021:
            members.setdefault(HPA2018_TO_2021[pattern], []).append(pattern)
    return {label: (found[int(rng.integers(len(found)))] if len(found) > 1 else found[0])
            for label, found in sorted(members.items())}


def cell_count(size: int, zoom: float) -> tuple[int, int]:
    """How many cells an image plans (inclusive range): enough to cover about 30-60 % of it, as in HPA 2021 fields
    of view (3-6 as in the 2018 simulator at 128 px, zoom 1; about 17-35 at 2048 px, zoom 0.35), at most 80."""
    typical = math.pi * (27.0 * size * zoom / 128.0) ** 2  # a typical interphase cell (radius 27 px at 128, zoom 1)
    fits = size * size / typical
    return max(3, min(40, round(0.3 * fits))), max(6, min(80, round(0.6 * fits)))


def _kept_cells(sc: Scene, area: np.ndarray) -> np.ndarray:
    full = np.array([math.pi * c.a * c.b for c in sc.cells])
    return area >= MIN_CELL_FRACTION * full


def _subset(eligible: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random non-empty subset of the eligible cells: each with the label's own chance (SHOW_RATE), at least one."""
    idx = np.flatnonzero(eligible)
    pick = rng.random(idx.size) < rng.uniform(*SHOW_RATE)
    if not pick.any():
        pick[int(rng.integers(idx.size))] = True
    chosen = np.zeros_like(eligible)
    chosen[idx[pick]] = True
    return chosen


def _paint_label(sc: Scene, pattern: int, eligible: np.ndarray, area: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One label on its own canvas: (its green layer, the cells that show it); no cell shows it if none could."""
    n, owner = len(sc.cells), sc.owner
    inside = owner >= 0
    strength = rng.uniform(0.5, 1.0)
    gains = (strength * rng.uniform(0.6, 1.0, n)).astype(np.float32)
    chosen = _subset(eligible, rng)
    attempts = [chosen] if np.array_equal(chosen, eligible) else [chosen, eligible]
    layer, shows = np.zeros((sc.size, sc.size), dtype=np.float32), np.zeros(n, dtype=bool)
    for cells in attempts:
        cv = Canvas(sc.size)
        GREEN_PAINTERS[pattern](sc, cv, gains * cells)
        layer = cv.render()
        density = np.bincount(owner[inside], weights=layer[inside], minlength=n) / np.maximum(area, 1)
        density[~cells] = 0.0
        top = float(density.max())
        shows = (density >= SHOWN_FRACTION * top) & (density > 0.0) if top > 0.0 else np.zeros(n, dtype=bool)
        if shows.any():
            break
    else:
        layer[:] = 0.0
    layer *= np.where(inside, shows[np.maximum(owner, 0)], True)  # erase it from every cell that does not show it
    return layer, shows


def render_cell_sample(labels: Sequence[int], size: int, rng: np.random.Generator, *, zoom: float = 1.0,
                       texture_noise: float = 0.0, patterns: Mapping[int, int] | None = None) -> CellSample:
    """Render one RGBY image with hpa2021 image labels (`[]` or `[18]`: Negative) and its cell masks and truth.

    `patterns` maps a label to the 2018 pattern that draws it (`hpa2021_patterns`); a label it leaves out is drawn by
    one of its members chosen with `rng`. A label no cell can show is dropped from the result's `labels`.
    """
    wanted = sorted({int(c) for c in labels})
    if any(not 0 <= c < NUM_CLASSES_2021 for c in wanted):
        raise ValueError(f"labels must be hpa2021 ids 0..{NUM_CLASSES_2021 - 1}, got {wanted}")
    if NEGATIVE in wanted and len(wanted) > 1:
        raise ValueError(f"Negative ({NEGATIVE}) is an image label only alone, got {wanted}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    wanted = [c for c in wanted if c != NEGATIVE]
    chosen: dict[int, int] = {}
    for label in wanted:
        members = HPA2021_FROM_2018[label]
        given = (patterns or {}).get(label)
        if given is not None and given not in members:
            raise ValueError(f"pattern {given} does not draw hpa2021 class {label} (members {members})")
        chosen[label] = given if given is not None else members[int(rng.integers(len(members)))]
    mitotic = bool(rng.random() < 0.12) or _MITOTIC_SPINDLE_2018 in chosen.values()
    dividing = bool(rng.random() < 0.12)
    sc, (red, blue, yellow), green_rng, out_rng = stain_landmarks(size, rng, mitotic, dividing, zoom,
                                                                   cell_count(size, zoom))
    n = len(sc.cells)
    area = np.bincount(sc.owner[sc.owner >= 0], minlength=n)
    kept = _kept_cells(sc, area)
    kinds = np.array([c.kind for c in sc.cells])
    green = np.zeros((size, size), dtype=np.float32)
    shows = np.zeros((n, len(wanted)), dtype=bool)
    for j, label in enumerate(wanted):
        eligible = kept & np.isin(kinds, _KINDS.get(chosen[label], ("interphase", "daughter", "mitotic")))
        if eligible.any():
            layer, shows[:, j] = _paint_label(sc, chosen[label], eligible, area, green_rng)
            green += layer
    lut = np.zeros(n + 1, dtype=np.uint16)
    lut[1 + np.flatnonzero(kept)] = np.arange(1, int(kept.sum()) + 1)
    cell_mask = lut[sc.owner.astype(np.int64) + 1]
    nuclei_mask = np.where(sc.nrho < 1.0, cell_mask, 0).astype(np.uint16)
    cell_labels = [[wanted[j] for j in np.flatnonzero(shows[i])] or [NEGATIVE] for i in np.flatnonzero(kept)]
    shown = sorted({c for row in cell_labels for c in row} - {NEGATIVE})
    image = expose((red, green, blue, yellow), out_rng, texture_noise)
    return CellSample(image, cell_mask, nuclei_mask, cell_labels, shown or [NEGATIVE])


def save_cell_sample(root: Path, image_id: str, sample: CellSample, with_cells: bool) -> None:
    """A worker's part of one image besides its channel PNGs: the masks (`with_cells`) and, in a scratch folder the
    parent gathers (`write_cell_tables`), its labels and truth triples."""
    truth: list[tuple[int, str]] = []
    if with_cells:
        write_masks(root / MASK_DIR, image_id, sample.cell_mask, sample.nuclei_mask)
        for cell_id, cell_labels in enumerate(sample.cell_labels, start=1):
            mask = encode_mask(sample.cell_mask == cell_id)
            truth += [(label, mask) for label in cell_labels]
    record = {"labels": sample.labels, "height": sample.cell_mask.shape[0], "width": sample.cell_mask.shape[1],
              "truth": truth}
    (root / _SCRATCH_DIR / f"{image_id}.json").write_text(json.dumps(record))


def prepare_folders(root: Path, with_cells: bool) -> None:
    (root / _SCRATCH_DIR).mkdir()
    if with_cells:
        (root / MASK_DIR).mkdir()


def write_cell_tables(root: Path, ids: Sequence[str], with_cells: bool) -> None:
    """`train.csv` (`ID,Label`, '|'-separated, sorted by ID) and, `with_cells`, `cell_truth.csv` (the submission
    format, confidence 1, one triple per (cell, label)) from the workers' records; the scratch folder is removed."""
    import csv

    scratch = root / _SCRATCH_DIR
    records = {image_id: json.loads((scratch / f"{image_id}.json").read_text()) for image_id in sorted(ids)}
    with open(root / LABEL_FILE, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["ID", "Label"])
        writer.writerows((image_id, "|".join(map(str, rec["labels"]))) for image_id, rec in records.items())
    if with_cells:
        write_submission(root / TRUTH_FILE, [
            ImageCells(image_id, rec["width"], rec["height"],
                       tuple(CellPrediction(label, 1.0, mask) for label, mask in rec["truth"]))
            for image_id, rec in records.items()])
    for image_id in records:
        (scratch / f"{image_id}.json").unlink()
    scratch.rmdir()

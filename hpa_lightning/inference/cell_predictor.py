"""`predict ... cells=MASKS|classical`: the HPA 2021 single-cell submission and `cells.csv` of an image folder
(usage: hpa_lightning/predict.py; the scores: inference/cell_scoring.py)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hpa_lightning.cells.scores import cells_table, submission_row
from hpa_lightning.cells.submission import CELL_CLASSES, submission_text
from hpa_lightning.classes import class_set
from hpa_lightning.data.sources import SIXTEEN_BIT_RULES, check_max_pixels
from hpa_lightning.errors import InferenceError
from hpa_lightning.files import atomic_path
from hpa_lightning.inference.cell_scoring import (
    CELL_SCORES,
    CellImageDataset,
    Segmenter,
    needs_cell_model,
    needs_image_model,
    score_cells,
)
from hpa_lightning.inference.load import InferenceModel, load_model
from hpa_lightning.inference.predictor import default_workers, resolve_device, resolve_input
from hpa_lightning.inference.tta import tta_views
from hpa_lightning.targets import trust_in_this_process

CLASSICAL = "classical"


def cells_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_cells.csv")


def skipped_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_skipped.csv")


def _classical(image: np.ndarray, scale: float) -> np.ndarray:  # module level: worker processes take it by reference
    """The cell mask of a uint8 (4, H, W) RGBY image by classical segmentation (cells/segmentation.py)."""
    from hpa_lightning.cells.segmentation import SegmentationParams, segment_image

    red, _, blue, yellow = image
    return segment_image(blue, red, yellow, SegmentationParams(scale=scale))[0]


def _models(args: dict[str, object], method: str) -> tuple[InferenceModel | None, InferenceModel | None]:
    """The image model (`ckpt`) and the cell model (`cell_ckpt`, or `ckpt` for `cell_score=crop` alone)."""
    for key in ("ckpt", "cell_ckpt"):
        if "," in str(args.get(key) or ""):
            raise InferenceError(f"{key}={args[key]}: per-cell prediction takes one model, not an ensemble")
    image_ckpt, cell_ckpt = str(args.get("ckpt") or ""), str(args.get("cell_ckpt") or "")
    if method == "crop" and not cell_ckpt:
        image_ckpt, cell_ckpt = "", image_ckpt
    if needs_image_model(method) and not image_ckpt:
        raise InferenceError(f"cell_score={method}: needs an image model, ckpt=RUN_DIR|CKPT|EXPORT_DIR")
    if needs_cell_model(method) and not cell_ckpt:
        raise InferenceError(f"cell_score={method}: needs a cell model (trained with data=hpa2021_cells), "
                             f"cell_ckpt=RUN_DIR|CKPT|EXPORT_DIR")
    image_model = load_model(image_ckpt) if needs_image_model(method) else None
    cell_model = load_model(cell_ckpt) if needs_cell_model(method) else None
    expected = list(class_set(CELL_CLASSES).names)
    for model in (image_model, cell_model):
        if model is not None and model.class_names != expected:
            raise InferenceError(f"{model.source}: trained on {model.num_classes} classes ({model.class_names[0]}, "
                                 f"...); per-cell prediction writes the {CELL_CLASSES} classes (data=hpa2021 or "
                                 f"data=hpa2021_cells)")
        if model is not None and not model.image_size:
            raise InferenceError(f"{model.source}: training image size unknown (no results.json in its run folder)")
    return image_model, cell_model


def mask_source(cells: str, scale: float) -> tuple[Path | None, Segmenter | None]:
    """`cells=`: a folder of masks (folder, None), or `classical`: segmentation at `scale` (None, segmenter)."""
    if cells == CLASSICAL:
        if not 0.0 < scale <= 1.0:
            raise InferenceError(f"segment_scale={scale}: must be in (0, 1]")
        return None, functools.partial(_classical, scale=scale)
    folder = Path(cells)
    if not folder.is_dir():
        raise InferenceError(f"cells={cells}: not a folder of cell masks (or `{CLASSICAL}` to segment here)")
    return folder, None


def run(args: dict[str, object]) -> dict[str, object]:
    """Score every cell of `input` by `cell_score` and write `out` (the 2021 submission), `<out>_cells.csv` (one row
    per cell: box, area, a probability per class) and, when images were skipped, `<out>_skipped.csv`."""
    method = str(args.get("cell_score") or "cam")
    if method not in CELL_SCORES:
        raise InferenceError(f"cell_score={method}: expected one of {', '.join(CELL_SCORES)}")
    if not args.get("input"):
        raise InferenceError("input=DIR is required")
    out = Path(str(args["out"]))
    if out.is_dir():
        raise InferenceError(f"out={out}: is a folder; give the submission file name (e.g. submission.csv)")
    cell_weight, min_confidence = float(args["cell_weight"]), float(args["min_confidence"])
    if not 0.0 <= cell_weight <= 1.0:
        raise InferenceError(f"cell_weight={cell_weight}: must be in [0, 1]")
    if not 0.0 <= min_confidence <= 1.0:
        raise InferenceError(f"min_confidence={min_confidence}: must be in [0, 1]")
    if args["on_bad_sample"] not in ("error", "skip"):
        raise InferenceError(f"on_bad_sample={args['on_bad_sample']}: expected error or skip")
    if args["sixteen_bit"] and args["sixteen_bit"] not in SIXTEEN_BIT_RULES:
        raise InferenceError(f"sixteen_bit={args['sixteen_bit']}: expected one of {', '.join(SIXTEEN_BIT_RULES)}")
    tta = int(args["tta"])
    tta_views(tta)
    max_pixels = check_max_pixels(args["max_image_pixels"], "max_image_pixels")
    device = resolve_device(str(args["device"]))
    workers = int(args["workers"]) if int(args["workers"]) >= 0 else default_workers()
    data = resolve_input(str(args["input"]), str(args["image_dir"]))
    masks, segment = mask_source(str(args["cells"]), float(args["segment_scale"]))
    trust_in_this_process(str(args.get("trust", "")))
    image_model, cell_model = _models(args, method)
    first = image_model or cell_model
    rule = str(args["sixteen_bit"]) or first.extra.get("sixteen_bit", "divide")
    dataset = CellImageDataset(data.image_dir, data.ids, masks, segment,
                               image_model.image_size if image_model else None,
                               cell_model.image_size if cell_model else None, rule, max_pixels)
    started = time.perf_counter()
    scored, skipped = score_cells(dataset, method, image_model, cell_model, cell_weight=cell_weight, tta=tta,
                                  batch_size=int(args["batch_size"]), workers=workers, device=device,
                                  channels_last=bool(args["channels_last"]), progress=bool(args["progress"]),
                                  on_bad_sample=str(args["on_bad_sample"]))
    elapsed = time.perf_counter() - started
    rows = [submission_row(image, min_confidence) for image in scored]
    table = cells_table(scored, first.class_names)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # both written before either is renamed: a failure leaves neither
        with atomic_path(cells_path(out)) as cells_tmp, atomic_path(out) as out_tmp:
            cells_tmp.write_text(table)
            out_tmp.write_text(submission_text(rows))
    except OSError as err:
        raise InferenceError(f"out={out}: cannot write ({err.strerror or type(err).__name__})") from None
    skipped_file = skipped_path(out)
    skipped_file.unlink(missing_ok=True)  # never leave an earlier run's list beside this run's outputs
    if skipped:
        pd.DataFrame({"ID": list(skipped), "error": list(skipped.values())}).to_csv(skipped_file, index=False)
    n_cells = int(sum(len(image.boxes) for image in scored))
    return {"out": out, "cells_csv": cells_path(out), "images": len(scored), "cells": n_cells, "seconds": elapsed,
            "method": method, "device": device, "image_model": image_model, "cell_model": cell_model,
            "skipped": skipped_file if skipped else None, "n_skipped": len(skipped), "ids_from": data.source,
            "triples": int(sum(len(row.cells) for row in rows)),
            "mean_cells": float(np.mean([len(image.boxes) for image in scored])) if scored else 0.0}

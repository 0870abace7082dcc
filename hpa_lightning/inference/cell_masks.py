"""Cell masks for a folder of images (usage: hpa_lightning/segment.py): which images, their channels read at full
size, segmented by the classical method (worker processes) or HPA-Cell-Segmentation (one process), the two mask files
of each image written atomically, and a rerun skipping the images whose masks exist."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpa_lightning.cells.masks import cell_mask_path, nuclei_mask_path, write_masks
from hpa_lightning.cells.segmentation import SegmentationParams, segment_image
from hpa_lightning.data.image_folder import SAMPLE_SUBMISSION, PredictInput, resolve_input
from hpa_lightning.data.sources import (
    KAGGLE_IMAGE_DIR,
    SIXTEEN_BIT_RULES,
    channel_path,
    check_max_pixels,
    decode_channel,
)
from hpa_lightning.errors import DataError, UsageError
from hpa_lightning.files import write_text_atomic
from hpa_lightning.machine import available_cpus

METHODS = ("classical", "hpacellseg")
BAD_SAMPLE_RULES = ("error", "skip")
SEGMENT_CHANNELS = ("blue", "red", "yellow")  # green (the protein) plays no part in finding cells
SKIPPED_FILE = "segment_skipped.csv"
Segmenter = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ImageTask:
    image_dir: Path
    image_id: str
    out: Path
    sixteen_bit: str
    max_pixels: int


def read_channels(task: ImageTask) -> tuple[np.ndarray, ...]:
    """Blue, red and yellow of one image at full size (uint8 by data.sources' rules); files of differing sizes are
    one line naming them."""
    paths = [channel_path(task.image_dir, task.image_id, channel) for channel in SEGMENT_CHANNELS]
    arrays = [decode_channel(path, channel, task.sixteen_bit, None, task.max_pixels)
              for path, channel in zip(paths, SEGMENT_CHANNELS, strict=True)]
    for path, array in zip(paths[1:], arrays[1:], strict=True):
        if array.shape != arrays[0].shape:
            raise DataError(f"{path}: size {array.shape[1]}x{array.shape[0]} differs from {paths[0].name} "
                            f"({arrays[0].shape[1]}x{arrays[0].shape[0]})")
    return tuple(arrays)


def segment_one(task: ImageTask, segmenter: Segmenter) -> dict[str, object]:
    """Segment one image and write its two masks; a bad file or an image without cells comes back as `error`."""
    started = time.perf_counter()
    try:
        blue, red, yellow = read_channels(task)
        cells, nuclei = segmenter(blue, red, yellow)
        count = int(len(np.unique(cells))) - int((cells == 0).any())
        if count == 0:
            raise DataError(f"{channel_path(task.image_dir, task.image_id, 'blue')}: no cell found in image "
                            f"{task.image_id}")
        if count > np.iinfo(np.uint16).max:
            raise DataError(f"{task.image_id}: {count} cells, more than a uint16 mask holds")
        write_masks(task.out, task.image_id, cells, nuclei)
    except DataError as err:
        return {"id": task.image_id, "error": str(err)}
    return {"id": task.image_id, "cells": count, "seconds": time.perf_counter() - started,
            "size": list(cells.shape)}


def _classical(params: SegmentationParams) -> Segmenter:
    return lambda blue, red, yellow: segment_image(blue, red, yellow, params)


def _segment_classical(task: ImageTask, params: SegmentationParams) -> dict[str, object]:
    return segment_one(task, _classical(params))  # a top-level function: worker processes receive it by name


def _run_all(tasks: list[ImageTask], segmenter: Segmenter | None, params: SegmentationParams, workers: int,
             stop_on_error: bool) -> Iterator[dict[str, object]]:
    """Results in completion order; with `stop_on_error` nothing new starts after the first bad image."""
    if segmenter is not None or workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            result = segment_one(task, segmenter or _classical(params))
            yield result
            if stop_on_error and "error" in result:
                return
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        pending = {pool.submit(_segment_classical, task, params) for task in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                result = future.result()
                yield result
                if stop_on_error and "error" in result:
                    for other in pending:
                        other.cancel()
                    return


def find_images(root: str, image_dir: str) -> PredictInput:
    """The images of `root` as predict finds them; `image_dir=""`: `test/` (sample_submission.csv), else `train/`
    (train.csv), else `root` itself (either CSV, else every Id whose blue, red and yellow files are there)."""
    base = Path(root)
    if not image_dir:
        image_dir = next((name for name in (KAGGLE_IMAGE_DIR, "train") if (base / name).is_dir()), KAGGLE_IMAGE_DIR)
    in_root = not (base / image_dir).is_dir()
    id_csvs = ("train.csv",) if image_dir == "train" else (SAMPLE_SUBMISSION, "train.csv") if in_root \
        else (SAMPLE_SUBMISSION,)
    return resolve_input(root, image_dir, id_csvs, SEGMENT_CHANNELS)


def _check_args(args: dict[str, object]) -> None:
    if not args["input"] or not args["out"]:
        raise UsageError("hpa_lightning.segment: input=DIR and out=MASKS are required")
    if args["method"] not in METHODS:
        raise UsageError(f"method={args['method']}: choose {' or '.join(METHODS)}")
    if args["on_bad_sample"] not in BAD_SAMPLE_RULES:
        raise UsageError(f"on_bad_sample={args['on_bad_sample']}: choose {' or '.join(BAD_SAMPLE_RULES)}")
    if args["sixteen_bit"] not in SIXTEEN_BIT_RULES:
        raise UsageError(f"sixteen_bit={args['sixteen_bit']}: choose {' or '.join(SIXTEEN_BIT_RULES)}")
    check_max_pixels(args["max_image_pixels"], "max_image_pixels")


def run(args: dict[str, object]) -> dict[str, object]:
    """Segment every image of `input` that has no masks in `out` yet; returns the summary."""
    _check_args(args)
    try:
        params = SegmentationParams(scale=float(args["scale"]))  # type: ignore[arg-type]
    except ValueError as err:
        raise UsageError(str(err)) from None
    data = find_images(str(args["input"]), str(args["image_dir"]))
    out = Path(str(args["out"]))
    segmenter = None
    if args["method"] == "hpacellseg":  # checked and loaded before any image is read
        from hpa_lightning.cells.hpacellseg import load_segmenter

        segmenter = load_segmenter(str(args["nuclei_model"]), str(args["cell_model"]), str(args["trust_weights"]),
                                   params.scale, str(args["device"]))
    done = [i for i in data.ids if cell_mask_path(out, i).is_file() and nuclei_mask_path(out, i).is_file()]
    tasks = [ImageTask(data.image_dir, i, out, str(args["sixteen_bit"]), int(args["max_image_pixels"]))  # type: ignore[arg-type]
             for i in data.ids if i not in set(done)]
    workers = int(args["workers"]) or available_cpus()  # type: ignore[arg-type]
    skip = args["on_bad_sample"] == "skip"
    started = time.perf_counter()
    results = list(_run_all(tasks, segmenter, params, workers, stop_on_error=not skip))
    seconds = time.perf_counter() - started
    bad = [r for r in results if "error" in r]
    if bad and not skip:
        raise DataError(f"{bad[0]['error']} (on_bad_sample=skip leaves such images out)")
    if bad:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / SKIPPED_FILE, "ID,reason\n" + "".join(
            f"{r['id']},\"{str(r['error']).replace(chr(34), chr(39))}\"\n" for r in bad))
    good = [r for r in results if "error" not in r]
    return {"method": args["method"], "scale": params.scale, "ids_from": data.source, "out": str(out),
            "images": len(good), "already_done": len(done), "cells": sum(int(r["cells"]) for r in good),  # type: ignore[call-overload]
            "seconds": seconds, "seconds_per_image": seconds / max(len(good), 1),
            "cpu_seconds_per_image": float(np.mean([r["seconds"] for r in good])) if good else 0.0,
            "workers": 1 if segmenter is not None else min(workers, max(len(tasks), 1)),
            "skipped": [(r["id"], r["error"]) for r in bad], "skipped_file": str(out / SKIPPED_FILE) if bad else "",
            "incomplete": data.incomplete}

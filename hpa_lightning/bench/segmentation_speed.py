"""Section 8: classical cell segmentation (hpa_lightning.cells.segmentation) per HPA 2021-sized image at scale 0.25 on
one core: synthetic images with the simulator's cells at HPA 2021 geometry (2048 px, cells 200-300 px across), the
process pinned to one CPU and its thread pools to one thread, median seconds per image over alternating rounds.
The issue's goal: at most 0.5 s per 2048 px image per core."""

from __future__ import annotations

import os
import time

import numpy as np

from hpa_lightning.bench.common import Profile, median, note
from hpa_lightning.cells.segmentation import SegmentationParams, segment_image
from hpa_lightning.data.simulator.dataset import render_sample

SEGMENT_ZOOM_AT_2048 = 0.3  # the simulator's cells are ~0.42 x zoom x size across: 210-310 px at 2048 px
BLUE, RED, YELLOW = 2, 0, 3  # channel order of render_sample: red, green, blue, yellow


def bench_segmentation(prof: Profile, seed: int) -> dict:
    """Seconds per image of `segment_image` at scale 0.25, one core, over `prof.segment_images` rendered images."""
    size = prof.segment_px
    zoom = SEGMENT_ZOOM_AT_2048 * 2048 / size  # cells as large in pixels as at 2048 px
    note(f"segment: rendering {prof.segment_images} images of {size} px")
    rng = np.random.default_rng(seed)
    images = [render_sample([0], size, rng, zoom=zoom) for _ in range(prof.segment_images)]
    params = SegmentationParams(scale=0.25)
    from threadpoolctl import threadpool_limits

    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        with threadpool_limits(1):
            segment_image(images[0][BLUE], images[0][RED], images[0][YELLOW], params)  # untimed first call
            per_image, cells = [], []
            for _ in range(prof.segment_rounds):
                for image in images:
                    started = time.perf_counter()
                    labels, _ = segment_image(image[BLUE], image[RED], image[YELLOW], params)
                    per_image.append(time.perf_counter() - started)
                    cells.append(int(labels.max()))
    finally:
        os.sched_setaffinity(0, affinity)
    seconds = median(per_image)
    return {"ratio": seconds / 0.5, "seconds_per_image": seconds, "max_seconds": max(per_image), "image_px": size,
            "scale": params.scale, "images": len(images), "rounds": prof.segment_rounds,
            "mean_cells": float(np.mean(cells))}

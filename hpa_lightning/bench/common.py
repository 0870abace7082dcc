"""Shared by the benchmark's sections: profiles, targets, timing helpers."""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from hpa_lightning import SOURCE_ROOT

TARGETS = {"loading_speedup": (">=", 30.0), "framework_overhead": ("<=", 1.05), "pack_peak_rss_mb": ("<", 1536.0),
           "gpu_images_per_s": (">=", 900.0), "jpeg_draft_speedup": (">=", 2.5), "threshold_tuning_ms": ("<", 500.0),
           "segment_s_per_image": ("<=", 0.5), "stream_local_ratio": (">=", 0.8),
           "stream_object_store_ratio": (">=", 0.5)}


REPO = SOURCE_ROOT


@dataclass(frozen=True)
class Profile:
    n: int  # samples of the 512 px data set (loading, packing)
    unique: int  # of which rendered; the rest are hard links under new ids
    size: int
    texture_noise: float
    load_batch: int
    load_png_samples: int  # the per-sample PNG loader runs over this many train samples
    load_min_seconds: float
    pack_rate_n: int  # the 1-worker vs all-cores rate comparison packs this many samples (both runs)
    ovh_n: int  # samples of the small data set of sections 3-4 (rendered at ovh_size)
    ovh_size: int
    ovh_batch: int
    ovh_model: str
    repeats: int
    warmup_steps: int
    aug_iters: int
    gpu_model: str
    gpu_size: int
    gpu_batch: int
    gpu_warmup: int  # untimed steps (compilation, cuDNN autotuning)
    gpu_steps: int  # each timed window holds at least this many steps ...
    gpu_compile: bool
    gpu_window_s: float = 5.0  # ... and lasts at least this long
    gpu_windows: int = 3  # median and spread over this many windows
    jpeg_samples: int = 16  # section 6: samples of 4x-size RGB JPGs, each decoded by every path in every round
    jpeg_rounds: int = 3
    thr_iters: int = 20  # timed calls of each threshold search (section 7, 3107 x 28 either way)
    segment_px: int = 2048  # section 8: synthetic images of this size (cells as large as at 2048 px)
    segment_images: int = 4
    segment_rounds: int = 3
    cells_px: int = 1024  # section 9: synthetic HPA 2021 images of this size, their cells as large as at 2048 px
    cells_images: int = 6
    cells_image_size: int = 256  # the image model's side
    cells_crop_size: int = 128  # the cell model's side
    cells_rounds: int = 2


PROFILES = {
    "full": Profile(n=2000, unique=500, size=512, texture_noise=1.0, load_batch=32, load_png_samples=448,
                    load_min_seconds=3.0, pack_rate_n=400, ovh_n=600, ovh_size=64, ovh_batch=32, ovh_model="resnet18",
                    repeats=3, warmup_steps=3, aug_iters=5, gpu_model="resnet50", gpu_size=512, gpu_batch=64,
                    gpu_warmup=15, gpu_steps=20, gpu_compile=True, gpu_window_s=5.0, jpeg_samples=16,
                    jpeg_rounds=5, thr_iters=20, segment_px=2048, segment_images=4,
                    segment_rounds=3),
    "quick": Profile(n=48, unique=16, size=128, texture_noise=1.0, load_batch=8, load_png_samples=32,
                     load_min_seconds=0.3, pack_rate_n=24, ovh_n=120, ovh_size=32, ovh_batch=16, ovh_model="resnet18",
                     repeats=1, warmup_steps=1, aug_iters=2, gpu_model="resnet18", gpu_size=128, gpu_batch=16,
                     gpu_warmup=3, gpu_steps=5, gpu_compile=False, gpu_window_s=0.2, jpeg_samples=4,
                     jpeg_rounds=2, thr_iters=3, segment_px=1024, segment_images=1,
                     segment_rounds=1, cells_px=256, cells_images=2, cells_image_size=64, cells_crop_size=32,
                     cells_rounds=1),
}


log = logging.getLogger("hpa_lightning.bench")


def note(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def seed_all(seed: int) -> None:
    import lightning as L

    L.seed_everything(seed, verbose=False)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median seconds of `fn` over `iters` calls after one untimed call."""
    fn()
    sync_device(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return median(times)

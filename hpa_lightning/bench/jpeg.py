"""Section 6: JPEG draft decoding. HPAv18-like channel files (RGB JPGs, the channel in its colour plane, 4x the
store's size: 2048 px for a 512 px store in the full mode) decoded per sample as the packer and predict decode them
(`load_sample`: DCT scaling straight to the store's size, area-averaged where it lands above it) against a plain
full-decode loop (every channel file decoded in full into an array, nothing else) and against the rule before
(`draft-x2`: drafted to twice the size, then the triangle resize), alternating in one process pinned to one core,
same files, same sizes. Closeness is judged against the ideal downsample: the box-filtered (area-average) full
decode, in float."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from hpa_lightning.bench.common import Profile, median, note
from hpa_lightning.classes import CHANNELS
from hpa_lightning.data.sources import (
    CHANNEL_PLANES,
    channel_path,
    channel_plane,
    load_sample,
    read_label_table,
    resize_square,
)
from hpa_lightning.files import atomic_folder, write_text_atomic

# HPAv18 external images are 2048 px where Kaggle's are 512 px. Quality 90: a common default of JPEG writers (the HPA
# website's own quality is not stated); the report gives the files' mean size.
JPEG_SCALE = 4
JPEG_QUALITY = 90


def jpeg_dataset(source: Path, cache: Path, samples: int, scale: int = JPEG_SCALE,
                 quality: int = JPEG_QUALITY) -> Path:
    """The first `samples` samples of the Kaggle-layout PNG folder `source` as HPAv18 files: each channel in its
    colour plane(s) of an RGB JPG `scale` times as large (bicubic), in a folder of the same layout."""
    target = cache / f"jpg-{source.name}-first{samples}-x{scale}-q{quality}"
    if (target / "train.csv").is_file():
        return target
    note(f"jpeg: writing {samples} samples as {scale}x RGB JPGs (quality {quality}) into {target}")
    lines = (source / "train.csv").read_text().splitlines(keepends=True)[: samples + 1]
    ids = read_label_table(source / "train.csv").ids[:samples]
    with atomic_folder(target, marker="train.csv") as tmp:
        (tmp / "train").mkdir()
        for sample_id in ids:
            for channel in CHANNELS:
                grey = np.asarray(Image.open(channel_path(source / "train", sample_id, channel)).convert("L"))
                rgb = np.zeros((*grey.shape, 3), dtype=np.uint8)
                rgb[..., list(CHANNEL_PLANES[channel])] = grey[..., None]
                big = Image.fromarray(rgb).resize((grey.shape[1] * scale, grey.shape[0] * scale),
                                                  Image.Resampling.BICUBIC)
                big.save(tmp / "train" / f"{sample_id}_{channel}.jpg", quality=quality)
        write_text_atomic(tmp / "train.csv", "".join(lines))
    return target


def full_decode_sample(image_dir: Path, sample_id: str) -> list[np.ndarray]:
    """The plain full-decode loop: every channel file decoded at its full size into an array, and nothing else (no
    plane taken, no resize): the least any decoding without DCT scaling costs."""
    return [np.asarray(Image.open(channel_path(image_dir, sample_id, channel))) for channel in CHANNELS]


def draft_x2_sample(image_dir: Path, sample_id: str, size: int) -> np.ndarray:
    """The rule before issue 36 (store decoder `draft-x2`): drafted to at least twice `size` from four times it, its
    plane taken (as today), resized by resize_square's triangle filter."""
    channels = []
    for channel in CHANNELS:
        path = channel_path(image_dir, sample_id, channel)
        with Image.open(path) as img:
            if 4 * size <= min(img.size):
                img.draft(img.mode, (2 * size, 2 * size))
            img.load()
            channels.append(resize_square(channel_plane(img, path, channel), size))
    return np.stack(channels)


def box_reference(image_dir: Path, sample_id: str, size: int) -> np.ndarray:
    """The ideal downsample: each channel file decoded in full, its plane(s) area-averaged to `size`, in float."""
    planes = []
    for channel in CHANNELS:
        rgb = np.asarray(Image.open(channel_path(image_dir, sample_id, channel)).convert("RGB"), dtype=np.float32)
        plane = rgb[..., list(CHANNEL_PLANES[channel])].mean(axis=-1)
        factor = plane.shape[0] // size
        planes.append(plane.reshape(size, factor, size, factor).mean(axis=(1, 3)))
    return np.stack(planes)


def closeness(decode, ids: list[str], reference: dict[str, np.ndarray]) -> dict:
    difference = np.concatenate([np.abs(decode(i) - reference[i]).ravel() for i in ids])
    return {"mean_abs_diff": float(difference.mean()), "p99_abs_diff": float(np.percentile(difference, 99)),
            "max_abs_diff": float(difference.max())}


@contextlib.contextmanager
def one_core() -> Iterator[bool]:
    """This process pinned to one CPU (where the OS allows; yields whether it did) and its thread pools to one
    thread, restored after."""
    from threadpoolctl import threadpool_limits

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    if affinity is not None:
        os.sched_setaffinity(0, {min(affinity)})
    try:
        with threadpool_limits(1):
            yield affinity is not None
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def bench_jpeg(root: Path, cache: Path, prof: Profile) -> dict:
    """Median per-sample seconds, on one core, of load_sample (the draft rule), the plain full-decode loop and the
    rule before (`draft-x2`) over `prof.jpeg_rounds` alternating rounds of `prof.jpeg_samples` samples, and how far
    the two rules' results are from the box-filtered full decode (grey levels)."""
    data = jpeg_dataset(root, cache, prof.jpeg_samples)
    image_dir = data / "train"
    ids = read_label_table(data / "train.csv").ids
    size = prof.size
    decoders = {"draft": functools.partial(load_sample, image_dir, size=size),
                "full": functools.partial(full_decode_sample, image_dir),
                "draft_x2": functools.partial(draft_x2_sample, image_dir, size=size)}
    with one_core() as pinned:
        for decode in decoders.values():  # untimed: the files into the page cache, first-call costs
            decode(ids[0])
        per_sample: dict[str, list[float]] = {name: [] for name in decoders}
        note(f"jpeg: {len(ids)} samples of {size * JPEG_SCALE} px JPGs to {size} px, {prof.jpeg_rounds} alternating "
             f"rounds on one core")
        for round_ in range(prof.jpeg_rounds):
            order = list(decoders) if round_ % 2 == 0 else list(reversed(decoders))  # no side always goes first
            for name in order:
                started = time.perf_counter()
                for sample_id in ids:
                    decoders[name](sample_id)
                per_sample[name].append((time.perf_counter() - started) / len(ids))
    reference = {i: box_reference(image_dir, i, size) for i in ids}
    draft_s, full_s, x2_s = (median(per_sample[name]) for name in ("draft", "full", "draft_x2"))
    files = list(image_dir.glob("*.jpg"))
    return {"ratio": full_s / draft_s, "draft_ms": draft_s * 1e3, "full_ms": full_s * 1e3,
            "draft_x2_ms": x2_s * 1e3, "draft_x2_ratio": full_s / x2_s, "one_core": pinned,
            "samples": len(ids), "rounds": prof.jpeg_rounds, "image_size": size, "jpg_px": size * JPEG_SCALE,
            "quality": JPEG_QUALITY, "mean_jpg_kb": float(np.mean([f.stat().st_size for f in files]) / 1024),
            **closeness(decoders["draft"], ids, reference),
            "draft_x2": closeness(decoders["draft_x2"], ids, reference)}

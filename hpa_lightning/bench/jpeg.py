"""Section 6: JPEG draft decoding. HPAv18-like channel files (RGB JPGs, the channel in its colour plane, 4x the
store's size: 2048 px for a 512 px store in the full mode) decoded per sample as the packer and predict decode them
(`load_sample`: DCT scaling, then the usual resize) against the full decode + resize that it replaced, alternating in
one process, same files, same sizes."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hpa_lightning.bench.common import Profile, median, note
from hpa_lightning.classes import CHANNELS
from hpa_lightning.data.sources import (
    CHANNEL_PLANES,
    channel_path,
    decode_channel,
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


def full_decode_sample(image_dir: Path, sample_id: str, size: int) -> np.ndarray:
    """The decoding the draft replaced: every channel file decoded at its full size, then resized to `size`."""
    return np.stack([resize_square(decode_channel(channel_path(image_dir, sample_id, channel), channel), size)
                     for channel in CHANNELS])


def bench_jpeg(root: Path, cache: Path, prof: Profile) -> dict:
    """Median per-sample seconds of load_sample (draft) and of the full decode over `prof.jpeg_rounds` alternating
    rounds of `prof.jpeg_samples` samples, and how far the two results are apart (grey levels)."""
    data = jpeg_dataset(root, cache, prof.jpeg_samples)
    image_dir = data / "train"
    ids = read_label_table(data / "train.csv").ids
    size = prof.size
    decoders = {"draft": functools.partial(load_sample, image_dir, size=size),
                "full": functools.partial(full_decode_sample, image_dir, size=size)}
    for decode in decoders.values():  # untimed: the files into the page cache, first-call costs
        decode(ids[0])
    per_sample: dict[str, list[float]] = {name: [] for name in decoders}
    note(f"jpeg: {len(ids)} samples of {size * JPEG_SCALE} px JPGs to {size} px, {prof.jpeg_rounds} alternating rounds")
    for round_ in range(prof.jpeg_rounds):
        order = list(decoders) if round_ % 2 == 0 else list(reversed(decoders))  # neither side always goes first
        for name in order:
            started = time.perf_counter()
            for sample_id in ids:
                decoders[name](sample_id)
            per_sample[name].append((time.perf_counter() - started) / len(ids))
    difference = np.concatenate([np.abs(decoders["draft"](i).astype(np.int16) - decoders["full"](i).astype(np.int16))
                                 .ravel() for i in ids])
    draft_s, full_s = median(per_sample["draft"]), median(per_sample["full"])
    files = list(image_dir.glob("*.jpg"))
    return {"ratio": full_s / draft_s, "draft_ms": draft_s * 1e3, "full_ms": full_s * 1e3,
            "samples": len(ids), "rounds": prof.jpeg_rounds, "image_size": size, "jpg_px": size * JPEG_SCALE,
            "quality": JPEG_QUALITY, "mean_jpg_kb": float(np.mean([f.stat().st_size for f in files]) / 1024),
            "mean_abs_diff": float(difference.mean()), "p99_abs_diff": float(np.percentile(difference, 99)),
            "max_abs_diff": int(difference.max())}

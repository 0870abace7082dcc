"""The benchmark's data: rendered once, tiled by hard links up to the profile's size."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np

from hpa_lightning.bench.common import note
from hpa_lightning.classes import CHANNELS
from hpa_lightning.data.sources import read_label_table
from hpa_lightning.files import atomic_folder, write_text_atomic


def tiled_dataset(cache: Path, n: int, unique: int, size: int, texture_noise: float, workers: int) -> Path:
    """`n` samples at `size` px: `unique` rendered by hpa_lightning.synth, repeated as hard links under new ids."""
    from hpa_lightning.data.simulator.dataset import generate

    unique = min(unique, n)
    rendered = cache / f"synth-n{unique}-px{size}-noise{texture_noise:g}"
    if not (rendered / "train.csv").is_file():
        note(f"rendering {unique} synthetic samples at {size} px (texture_noise={texture_noise:g}) into {rendered}")
        try:
            generate(rendered, n=unique, seed=0, size=size, workers=workers, texture_noise=texture_noise)
        except FileExistsError:
            pass  # a concurrent bench rendered it first
    if n == unique:
        return rendered
    target = cache / f"tiled-n{n}-{rendered.name}"
    if (target / "train.csv").is_file():
        return target
    with atomic_folder(target, marker="train.csv") as tmp:
        (tmp / "train").mkdir()
        table = read_label_table(rendered / "train.csv")
        rows = []
        for i in range(n):
            k, copy = i % unique, i // unique
            src_id = table.ids[k]
            new_id = src_id if copy == 0 else f"{src_id}-r{copy}"
            for channel in CHANNELS:
                src = rendered / "train" / f"{src_id}_{channel}.png"
                dst = tmp / "train" / f"{new_id}_{channel}.png"
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            rows.append((new_id, table.targets[k]))
        with open(tmp / "train.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["Id", "Target"])
            writer.writerows(rows)
    return target


def png_sizes(root: Path) -> dict[str, float]:
    sizes = {}
    for path in (root / "train").iterdir():
        stat = path.stat()
        sizes[stat.st_ino] = stat.st_size  # hard links counted once
    values = np.array(list(sizes.values()), dtype=np.float64) / 1024.0
    return {"files": int(len(values)), "mean_kb": float(values.mean()), "min_kb": float(values.min()),
            "max_kb": float(values.max())}


def subset_dataset(root: Path, n: int, parent: Path) -> Path:
    """A Kaggle folder holding the first `n` rows of `root` (its image folder linked, not copied)."""
    target = parent / f"{root.name}-first{n}"
    if (target / "train.csv").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    lines = (root / "train.csv").read_text().splitlines(keepends=True)
    link = target / "train"
    if not link.exists():
        link.symlink_to((root / "train").resolve(), target_is_directory=True)
    write_text_atomic(target / "train.csv", "".join(lines[: n + 1]))
    return target

"""The train/val/test split of a packed store and its train-only channel statistics, both kept in the store
(`splits/<key>/split.csv, stats.json`) and created once per (seed, fractions).

Multilabel-stratified (iterative stratification, `iterstrat`); copies of one image kept from several sources stay
in one part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hpa_lightning.classes import CHANNELS
from hpa_lightning.data.store import PackedStore
from hpa_lightning.errors import DataError
from hpa_lightning.files import atomic_folder, remove_stale_temporaries, write_json_atomic

SPLIT_NAMES = ("train", "val", "test")


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                     knob_prefix: str = "data.split.", groups: np.ndarray | None = None) -> np.ndarray:
    """Multilabel-stratified train/val/test assignment (array of split names, store order).

    Sizes are round(N * fraction) for val and test (3107/3107/24858 on the 31072 Kaggle samples). An empty split is
    refused with the command's own knobs (`knob_prefix`: `data.split.` for train, empty for the pack CLI's
    `val_fraction=`) and the smallest values that work.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    grouped = _group_labels(labels, groups)
    if grouped is not None:
        group_labels, inverse = grouped
        return stratified_split(group_labels, val_fraction, test_fraction, seed, knob_prefix)[inverse]
    n = len(labels)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if min(n_val, n_test) < 1 or n - n_val - n_test < 1:
        val_knob, test_knob = f"{knob_prefix}val_fraction", f"{knob_prefix}test_fraction"
        fix = (f"with {n} samples use {val_knob}>={1 / n:.3g} and {test_knob}>={1 / n:.3g}, summing to at most "
               f"{(n - 1) / n:.3g}" if n >= 3 else "add samples: a split needs at least 3")
        raise DataError(f"{val_knob}={val_fraction} and {test_knob}={test_fraction} give {n_val} val, {n_test} test "
                        f"and {n - n_val - n_test} train samples of {n}; every split needs one: {fix}")
    rng = np.random.default_rng(seed)
    assignment = np.full(n, "train", dtype=object)
    outer = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_val + n_test, random_state=seed)
    _, holdout = _exact_size(*next(outer.split(np.zeros(n), labels)), n_val + n_test, rng)
    inner = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_test, random_state=seed + 1)
    val_pos, test_pos = _exact_size(*next(inner.split(np.zeros(len(holdout)), labels[holdout])), n_test, rng)
    assignment[holdout[val_pos]] = "val"
    assignment[holdout[test_pos]] = "test"
    return assignment


def _group_labels(labels: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Copies of one image (kept duplicates) go to one part: (labels of each group, their union; group of each row),
    or None when every row is its own group."""
    if groups is None or len(np.unique(groups)) == len(labels):
        return None
    _, inverse = np.unique(groups, return_inverse=True)
    group_labels = np.zeros_like(labels, shape=(inverse.max() + 1, labels.shape[1]))
    np.maximum.at(group_labels, inverse, labels)
    return group_labels, inverse


def fold_split(labels: np.ndarray, val_fraction: float, test_fraction: float, folds: int, fold: int, seed: int,
               knob_prefix: str = "data.split.", groups: np.ndarray | None = None) -> np.ndarray:
    """Fold `fold` of `folds` multilabel-stratified folds over everything but the test split: that fold is val, the
    others train. The test split is the one `stratified_split` holds out with the same seed and fractions, so it is
    the same for every fold and for the run without folds (val_fraction only shapes that test split)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise DataError(f"{knob_prefix}folds={folds!r}: expected a whole number >= 2 (or null: no folds)")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise DataError(f"{knob_prefix}fold={fold!r}: expected 0..{folds - 1} for {knob_prefix}folds={folds}")
    grouped = _group_labels(labels, groups)
    if grouped is not None:
        group_labels, inverse = grouped
        return fold_split(group_labels, val_fraction, test_fraction, folds, fold, seed, knob_prefix)[inverse]
    base = stratified_split(labels, val_fraction, test_fraction, seed, knob_prefix)
    pool = np.flatnonzero(base != "test")
    if len(pool) < folds:
        raise DataError(f"{knob_prefix}folds={folds}: only {len(pool)} samples outside the test split")
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, val = list(splitter.split(np.zeros(len(pool)), labels[pool]))[fold]
    assignment = np.where(base == "test", "test", "train").astype(object)
    assignment[pool[val]] = "val"
    return assignment


def _exact_size(keep: np.ndarray, take: np.ndarray, size: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Iterative stratification can miss the requested size by a few samples on small sets; move the difference."""
    if len(take) > size:
        moved = rng.choice(len(take), len(take) - size, replace=False)
        keep, take = np.concatenate([keep, take[moved]]), np.delete(take, moved)
    elif len(take) < size:
        moved = rng.choice(len(keep), size - len(take), replace=False)
        keep, take = np.delete(keep, moved), np.concatenate([take, keep[moved]])
    return np.sort(keep), np.sort(take)


def channel_stats(images: np.ndarray, indices: np.ndarray, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units over `indices`, streamed in chunks from the memory map."""
    total = np.zeros(images.shape[1])
    total_sq = np.zeros(images.shape[1])
    count = 0
    for start in range(0, len(indices), chunk):
        block = images[np.sort(indices[start:start + chunk])] / 255.0  # float64
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


@dataclass(frozen=True)
class Split:
    path: Path
    assignment: np.ndarray  # split name per store row
    mean: list[float]
    std: list[float]

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.assignment == name)


def split_key(seed: int, val_fraction: float, test_fraction: float, folds: int | None = None, fold: int = 0) -> str:
    """The split's folder name in a store (`splits/<key>`)."""
    return f"seed{seed}-val{val_fraction:g}-test{test_fraction:g}" + (f"-folds{folds}-fold{fold}" if folds else "")


def prepare_split(store: PackedStore, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 42,
                  knob_prefix: str = "data.split.", folds: int | None = None, fold: int = 0) -> Split:
    """Create (once) the split and the train statistics for `store`; both live in the store, keyed by the split.
    With `folds`, fold `fold` of a K-fold split of train+val (`fold_split`), the test split unchanged."""
    key = split_key(seed, val_fraction, test_fraction, folds, fold)
    folder = store.path / "splits" / key
    if not (folder / "stats.json").is_file():
        groups = store.groups()  # every row its own group unless copies of one image were kept
        assignment = (fold_split(store.labels, val_fraction, test_fraction, folds, fold, seed, knob_prefix, groups)
                      if folds else
                      stratified_split(store.labels, val_fraction, test_fraction, seed, knob_prefix, groups=groups))
        mean, std = channel_stats(store.images(), np.flatnonzero(assignment == "train"))
        folder.parent.mkdir(exist_ok=True)  # <store>/splits
        remove_stale_temporaries(folder)
        with atomic_folder(folder, marker="stats.json") as tmp:
            pd.DataFrame({"Id": store.ids, "split": assignment}).to_csv(tmp / "split.csv", index=False)
            counts = {name: int((assignment == name).sum()) for name in SPLIT_NAMES}
            write_json_atomic(tmp / "stats.json", {"mean": mean, "std": std, "channels": list(CHANNELS),
                                                   "units": "[0,1] (uint8 / 255)", "computed_on": "train",
                                                   "counts": counts, "seed": seed, "folds": folds,
                                                   "fold": fold if folds else None})
    return load_split(folder, store)


def load_split(folder: Path, store: PackedStore) -> Split:
    frame = pd.read_csv(folder / "split.csv", dtype=str, keep_default_na=False)
    if frame["Id"].tolist() != store.ids:
        raise DataError(f"{folder / 'split.csv'}: Ids do not match the store {store.path}")
    stats = json.loads((folder / "stats.json").read_text())
    return Split(path=folder, assignment=frame["split"].to_numpy(), mean=stats["mean"], std=stats["std"])

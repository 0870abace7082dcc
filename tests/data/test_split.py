"""The split and its statistics, exactly: sizes at their limits, the messages, what is written where, that a seed's
split never changes, and copies of one image kept together. Stores are made directly (a PackedStore over a saved
images.npy), without packing."""

# Mutation testing (`make mutation`, tests/mutation.py): the mutants of hpa_lightning/data/split.py these tests do
# not kill, judged equivalent:
# - `n_splits` of either MultilabelStratifiedShuffleSplit (2, or left out: 10): only the first split is used, and it
#   is drawn first whatever the count.
# - `_exact_size` with `>=` / `<=` for `>` / `<`: at the exact size 0 samples move, and rng.choice(n, 0,
#   replace=False) draws nothing (the generator's state is checked); `replace=None` is falsy, as False.
# - `channel_stats(..., chunk=257)` for 256: the chunk size changes only the order of the float sums.
# - `np.zeros_like(None, shape=...)` in _group_labels: object zeros instead of the labels' dtype; np.maximum.at and
#   iterative stratification treat the 0/1 values alike.
# - `to_csv(..., index=None)`: falsy, as False.
# - `shutil.rmtree(tmp, ignore_errors=None / False / left out)`: the clean-up succeeds; ignore_errors only keeps a
#   failing clean-up from hiding the error that brought it there.

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpa_lightning.classes import CHANNELS
from hpa_lightning.data import split as split_module
from hpa_lightning.data.split import (
    _exact_size,
    channel_stats,
    fold_split,
    load_split,
    prepare_split,
    stratified_split,
)
from hpa_lightning.data.store import PackedStore
from hpa_lightning.errors import DataError


def labels_of(n: int, seed: int = 0, classes: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, classes)) < [0.5, 0.3, 0.2, 0.1, 0.05][:classes]).astype(np.uint8)


def make_store(root: Path, n: int = 20, duplicate_of: list[str] | None = None, ids: list[str] | None = None,
               size: tuple[int, int] = (3, 2)) -> PackedStore:
    root.mkdir(parents=True)
    images = np.random.default_rng(1).integers(0, 256, (n, len(CHANNELS), *size), dtype=np.uint8)
    np.save(root / "images.npy", images)
    return PackedStore(path=root, ids=ids or [f"s{i:02d}" for i in range(n)], labels=labels_of(n),
                       image_size=size[0], duplicate_of=duplicate_of)


# ---------------------------------------------------------------------------------- sizes and messages


def test_the_smallest_split_is_one_sample_each() -> None:
    assignment = stratified_split(labels_of(3), 1 / 3, 1 / 3, seed=0)
    assert sorted(assignment.tolist()) == ["test", "train", "val"] and assignment.dtype == object
    assert fold_split(labels_of(12), 0.2, 0.2, 2, 0, seed=0).dtype == object  # as load_split reads them back


@pytest.mark.parametrize(("n", "val", "test", "prefix", "message"), [
    (10, 0.5, 0.5, "data.split.", "data.split.val_fraction=0.5 and data.split.test_fraction=0.5 give 5 val, 5 test "
     "and 0 train samples of 10; every split needs one: with 10 samples use data.split.val_fraction>=0.1 and "
     "data.split.test_fraction>=0.1, summing to at most 0.9"),
    (3, 0.1, 0.4, "", "val_fraction=0.1 and test_fraction=0.4 give 0 val, 1 test and 2 train samples of 3; every "
     "split needs one: with 3 samples use val_fraction>=0.333 and test_fraction>=0.333, summing to at most 0.667"),
    (2, 0.5, 0.5, "", "val_fraction=0.5 and test_fraction=0.5 give 1 val, 1 test and 0 train samples of 2; every "
     "split needs one: add samples: a split needs at least 3"),
])
def test_an_empty_split_is_refused_with_the_smallest_values_that_work(n: int, val: float, test: float, prefix: str,
                                                                     message: str) -> None:
    kwargs = {"knob_prefix": prefix} if prefix != "data.split." else {}  # the default names train's knobs
    with pytest.raises(DataError) as raised:
        stratified_split(labels_of(n), val, test, seed=0, **kwargs)
    assert str(raised.value) == message


def test_the_split_of_a_seed_never_changes() -> None:
    """A stored split is keyed by seed and fractions only: the same labels and seed must give the same split in
    every version, or runs compared across versions would be tested on different samples."""
    assignment = stratified_split(labels_of(30), 0.2, 0.2, seed=42)
    assert "".join(name[1] for name in assignment) == "arreerererrarerraarraerrrrarrr"  # t(r)ain, v(a)l, t(e)st
    folds = fold_split(labels_of(30), 0.2, 0.2, 3, 1, seed=42)
    assert "".join(name[1] for name in folds) == "rareerereraaaerrarrrrearrrraar"


def test_copies_of_one_image_go_to_one_part() -> None:
    labels = labels_of(12, seed=3)
    groups = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 9])  # rows 10 and 11 copy rows 0 and 9
    union = labels[:10].copy()
    union[0] |= labels[10]
    union[9] |= labels[11]
    expected = stratified_split(union, 0.2, 0.2, seed=5)[groups]  # one sample per image, its labels the union
    np.testing.assert_array_equal(stratified_split(labels, 0.2, 0.2, seed=5, groups=groups), expected)
    np.testing.assert_array_equal(fold_split(labels, 0.2, 0.2, 2, 1, seed=5, groups=groups),
                                  fold_split(union, 0.2, 0.2, 2, 1, seed=5)[groups])
    # every row its own group: the plain split
    np.testing.assert_array_equal(stratified_split(labels, 0.2, 0.2, seed=5, groups=np.arange(12)[::-1]),
                                  stratified_split(labels, 0.2, 0.2, seed=5))
    for split in (stratified_split, lambda *args, **kwargs: fold_split(*args[:3], 2, 0, *args[3:], **kwargs)):
        with pytest.raises(DataError) as raised:  # the knobs are named as the command names them, copies or not
            split(labels, 0.01, 0.2, 5, knob_prefix="", groups=groups)
        assert str(raised.value).startswith("val_fraction=0.01 and test_fraction=0.2 give 0 val, 2 test and 8 "
                                            "train samples of 10; every split needs one: with 10 samples use "
                                            "val_fraction>=0.1")
    with pytest.raises(DataError, match=r"^val_fraction=0\.01 and test_fraction=0\.2 give 0 val, 2 test and 10 "):
        fold_split(labels, 0.01, 0.2, 2, 0, seed=5, knob_prefix="")


@pytest.mark.parametrize(("folds", "fold", "message"), [
    (2.0, 0, "data.split.folds=2.0: expected a whole number >= 2 (or null: no folds)"),
    (True, 0, "data.split.folds=True: expected a whole number >= 2 (or null: no folds)"),
    (3, True, "data.split.fold=True: expected 0..2 for data.split.folds=3"),
    (3, 1.0, "data.split.fold=1.0: expected 0..2 for data.split.folds=3"),
    (5, 0, "data.split.folds=5: only 4 samples outside the test split"),
])
def test_bad_folds_are_refused_in_one_line(folds: object, fold: object, message: str) -> None:
    with pytest.raises(DataError) as raised:
        fold_split(labels_of(5), 0.2, 0.2, folds, fold, seed=0)
    assert str(raised.value) == message


def test_as_many_folds_as_samples_outside_the_test_split_and_two_folds_work() -> None:
    labels = labels_of(5)
    vals = [np.flatnonzero(fold_split(labels, 0.2, 0.2, 4, k, seed=0) == "val") for k in range(4)]
    assert sorted(np.concatenate(vals).tolist()) == np.flatnonzero(
        stratified_split(labels, 0.2, 0.2, seed=0) != "test").tolist()
    assert (fold_split(labels_of(10), 0.2, 0.2, 2, 1, seed=0) == "val").sum() == 4


@pytest.mark.parametrize("seed", range(4))
def test_exact_size_moves_the_difference_without_repeats(seed: int) -> None:
    rng = np.random.default_rng(seed)
    keep, take = _exact_size(np.array([0, 1, 2]), np.array([3, 4, 5, 6, 7]), 2, rng)  # 3 move to keep
    assert len(keep) == 6 and len(take) == 2 and sorted([*keep, *take]) == list(range(8))
    assert keep.tolist() == sorted(keep.tolist()) and set(take) <= {3, 4, 5, 6, 7}
    keep, take = _exact_size(np.array([7, 6, 5, 4, 3]), np.array([2, 1, 0]), 5, rng)  # 2 move to take
    assert len(keep) == 3 and len(take) == 5 and sorted([*keep, *take]) == list(range(8))
    assert take.tolist() == sorted(take.tolist()) and {0, 1, 2} <= set(take)
    state = rng.bit_generator.state
    keep, take = _exact_size(np.array([5, 1]), np.array([4, 0]), 2, rng)  # the right size: sorted, nothing drawn
    assert (keep.tolist(), take.tolist()) == ([1, 5], [0, 4]) and rng.bit_generator.state == state


def test_channel_stats_of_non_square_and_constant_images() -> None:
    images = np.random.default_rng(2).integers(0, 256, (7, 4, 3, 5), dtype=np.uint8)
    mean, std = channel_stats(images, np.arange(7), chunk=2)
    np.testing.assert_allclose(mean, images.mean(axis=(0, 2, 3)) / 255, rtol=1e-12)
    np.testing.assert_allclose(std, (images / 255).std(axis=(0, 2, 3)), rtol=1e-9)
    flat = np.full((3, 4, 2, 2), 51, dtype=np.uint8)
    mean, std = channel_stats(flat, np.arange(3))
    assert mean == pytest.approx([0.2] * 4) and std == [1e-6] * 4  # std floored: no division by 0 later


# ---------------------------------------------------------------------------------- what prepare_split writes


def test_prepare_split_writes_the_split_and_its_statistics_once(tmp_path: Path, monkeypatch) -> None:
    store = make_store(tmp_path / "store")
    split = prepare_split(store, 0.2, 0.3, seed=1)
    assert split.path == store.path / "splits" / "seed1-val0.2-test0.3"
    assert sorted(p.name for p in (store.path / "splits").iterdir()) == ["seed1-val0.2-test0.3"]  # no temporaries
    assignment = stratified_split(store.labels, 0.2, 0.3, seed=1)
    np.testing.assert_array_equal(split.assignment, assignment)
    assert (split.path / "split.csv").read_text().splitlines()[:2] == ["Id,split", f"s00,{assignment[0]}"]
    mean, std = channel_stats(store.images(), np.flatnonzero(assignment == "train"))
    assert json.loads((split.path / "stats.json").read_text()) == {
        "mean": mean, "std": std, "channels": list(CHANNELS), "units": "[0,1] (uint8 / 255)", "computed_on": "train",
        "counts": {"train": 10, "val": 4, "test": 6}, "seed": 1, "folds": None, "fold": None}
    assert (split.mean, split.std) == (mean, std)

    def no_second_split(*args, **kwargs):
        raise AssertionError("the stored split is read, not made again")

    monkeypatch.setattr(split_module, "stratified_split", no_second_split)
    again = prepare_split(store, 0.2, 0.3, seed=1)
    np.testing.assert_array_equal(again.assignment, split.assignment)


def test_prepare_split_defaults_and_folds(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", n=30)
    plain = prepare_split(store)
    assert plain.path.name == "seed42-val0.1-test0.1"
    np.testing.assert_array_equal(plain.assignment, stratified_split(store.labels, 0.1, 0.1, seed=42))
    folded = prepare_split(store, 0.2, 0.2, seed=3, folds=3, fold=2)
    assert folded.path.name == "seed3-val0.2-test0.2-folds3-fold2"
    np.testing.assert_array_equal(folded.assignment, fold_split(store.labels, 0.2, 0.2, 3, 2, seed=3))
    stats = json.loads((folded.path / "stats.json").read_text())
    assert (stats["folds"], stats["fold"], stats["seed"]) == (3, 2, 3)
    assert prepare_split(store, folds=2).path.name == "seed42-val0.1-test0.1-folds2-fold0"
    with pytest.raises(DataError) as raised:
        prepare_split(store, folds=1, knob_prefix="")
    assert str(raised.value) == "folds=1: expected a whole number >= 2 (or null: no folds)"


def test_prepare_split_keeps_copies_of_one_image_together(tmp_path: Path) -> None:
    duplicate_of = [""] * 16 + ["s00", "s01", "s02", "s03"]
    store = make_store(tmp_path / "store", duplicate_of=duplicate_of)
    expected = stratified_split(store.labels, 0.2, 0.2, seed=4, groups=store.groups())
    split = prepare_split(store, 0.2, 0.2, seed=4)
    np.testing.assert_array_equal(split.assignment, expected)
    np.testing.assert_array_equal(split.assignment[16:], split.assignment[:4])
    folded = prepare_split(store, 0.2, 0.2, seed=4, folds=2, fold=1)
    np.testing.assert_array_equal(folded.assignment,
                                  fold_split(store.labels, 0.2, 0.2, 2, 1, seed=4, groups=store.groups()))


def test_a_split_published_first_by_another_job_is_kept(tmp_path: Path, monkeypatch) -> None:
    """Two jobs preparing the same split at once: the one that publishes second finds the first one's complete folder,
    keeps it and leaves no temporary folder behind."""
    store = make_store(tmp_path / "store")
    other = tmp_path / "other"
    prepare_split(make_store(other, ids=store.ids), 0.2, 0.2, seed=1)  # the other job's result, same samples
    real_stats = split_module.channel_stats

    def other_job_publishes_meanwhile(*args, **kwargs):
        (store.path / "splits").mkdir()
        (other / "splits" / "seed1-val0.2-test0.2").rename(store.path / "splits" / "seed1-val0.2-test0.2")
        return real_stats(*args, **kwargs)

    monkeypatch.setattr(split_module, "channel_stats", other_job_publishes_meanwhile)
    split = prepare_split(store, 0.2, 0.2, seed=1)
    assert [p.name for p in (store.path / "splits").iterdir()] == ["seed1-val0.2-test0.2"]
    other_images = np.load(other / "images.npy")
    assert split.mean == channel_stats(other_images, split.indices("train"))[0]  # theirs, not ours


def test_a_failed_write_leaves_no_split_behind(tmp_path: Path, monkeypatch) -> None:
    store = make_store(tmp_path / "store")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(split_module, "write_json_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare_split(store, 0.2, 0.2, seed=1)
    assert list((store.path / "splits").iterdir()) == []


@pytest.mark.parametrize("ids", [["NA", "007", "nan", "x1"], ["007", "010", "3", "4"]])
def test_load_split_reads_ids_as_written_and_refuses_another_stores(tmp_path: Path, ids: list[str]) -> None:
    """Ids such as "NA" or "007" are read as the text they are (pandas would read NaN and 7)."""
    store = make_store(tmp_path / "store", n=4, ids=ids)
    folder = tmp_path / "split"
    folder.mkdir()
    pd.DataFrame({"Id": ids, "split": ["train", "val", "test", "train"]}).to_csv(folder / "split.csv", index=False)
    (folder / "stats.json").write_text(json.dumps({"mean": [0.1] * 4, "std": [0.2] * 4}))
    split = load_split(folder, store)
    assert split.assignment.tolist() == ["train", "val", "test", "train"] and split.indices("train").tolist() == [0, 3]
    assert (split.mean, split.std, split.path, split.assignment.dtype) == ([0.1] * 4, [0.2] * 4, folder, object)
    other = make_store(tmp_path / "other", n=4, ids=["a", "b", "c", "d"])
    with pytest.raises(DataError) as raised:
        load_split(folder, other)
    assert str(raised.value) == f"{folder / 'split.csv'}: Ids do not match the store {other.path}"

"""Packed store: content, re-use vs rebuild, atomicity, stratified split sizes, train-only statistics."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpa_lightning.classes import KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES
from hpa_lightning.data.sources import load_sample
from hpa_lightning.data.split import channel_stats, prepare_split, stratified_split
from hpa_lightning.data.store import PackedStore, build_store
from hpa_lightning.errors import DataError
from tests.conftest import REPO


def test_store_holds_every_sample_in_rgby_order(kaggle_folder: Path, tmp_path: Path) -> None:
    store = build_store(kaggle_folder, 12, tmp_path / "stores", workers=2)
    images = store.images()
    assert images.shape == (40, 4, 12, 12) and images.dtype == np.uint8
    for row in (0, 17, 39):
        np.testing.assert_array_equal(images[row], load_sample(kaggle_folder / "train", store.ids[row], 12))
    assert store.labels.shape == (40, 28)
    assert not list((tmp_path / "stores").glob("*.tmp-*"))


def test_store_is_reused_and_rebuilt_when_size_or_source_changes(kaggle_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "stores"
    first = build_store(kaggle_folder, 12, cache, workers=1)
    mtime = (first.path / "images.npy").stat().st_mtime_ns
    again = build_store(kaggle_folder, 12, cache, workers=1)
    assert again.path == first.path and (again.path / "images.npy").stat().st_mtime_ns == mtime
    other_size = build_store(kaggle_folder, 8, cache, workers=1)
    assert other_size.path != first.path and other_size.image_size == 8
    csv = kaggle_folder / "train.csv"
    csv.write_text(csv.read_text().replace("id000,", "id000,5 ", 1))
    changed = build_store(kaggle_folder, 12, cache, workers=1)
    assert changed.path != first.path
    assert changed.labels[0, 5] == 1


def test_half_written_store_is_never_used(kaggle_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "stores"
    store = build_store(kaggle_folder, 12, cache, workers=1)
    (kaggle_folder / "train" / "id005_green.png").unlink()
    (store.path / "meta.json").unlink()  # as if the process died before the store was complete
    with pytest.raises(DataError, match="id005_green.png: missing channel file"):
        build_store(kaggle_folder, 12, cache, workers=2)
    with pytest.raises(DataError, match="not a complete packed store"):
        PackedStore.open(store.path)
    leftovers = [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_stale_temporary_of_a_dead_process_of_this_host_is_removed_and_other_hosts_are_left(
        kaggle_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "stores"
    store = build_store(kaggle_folder, 12, cache, workers=1)
    dead_pid = 2**22 + 12345
    stale = store.path.with_name(f"{store.path.name}.tmp-{socket.gethostname()}-{dead_pid}-abcd")
    # a packer on another node (pid meaningless here) and one of the old pid-only form: both in progress elsewhere
    elsewhere = [store.path.with_name(f"{store.path.name}.tmp-other-node-7-{dead_pid}-abcd"),
                 store.path.with_name(f"{store.path.name}.tmp-{dead_pid}-abcd")]
    for folder in (stale, *elsewhere):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"partial")
    shutil.rmtree(store.path)
    rebuilt = build_store(kaggle_folder, 12, cache, workers=1)
    assert not stale.exists() and all(folder.is_dir() for folder in elsewhere)
    assert not [p for p in cache.iterdir() if p.name.startswith(f"{rebuilt.path.name}.tmp-{socket.gethostname()}")]


def test_replaced_image_file_packs_a_new_store(kaggle_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "stores"
    first = build_store(kaggle_folder, 12, cache, workers=1)
    row = first.ids.index("id007")
    old = first.images()[row].copy()
    path = kaggle_folder / "train" / "id007_green.png"
    Image.fromarray(np.full((16, 16), 201, dtype=np.uint8), mode="L").save(path)  # same size, new pixels
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # even within one mtime tick
    second = build_store(kaggle_folder, 12, cache, workers=1)
    assert second.path != first.path
    assert (second.images()[row][1] == 201).all() and (second.images()[row][0] == old[0]).all()


def test_full_disk_is_refused_before_decoding(kaggle_folder: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import hpa_lightning.data.store as pack

    store_bytes = 40 * 4 * 512 * 512
    monkeypatch.setattr(pack.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, store_bytes // 2))
    monkeypatch.setattr(pack, "load_sample", lambda *a: pytest.fail("decoded before the space check"))
    with pytest.raises(DataError) as raised:
        build_store(kaggle_folder, 512, tmp_path / "stores", workers=1)
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / "stores") in message
    assert "needs 0.04 GiB, only 0.02 GiB free" in message
    assert not list((tmp_path / "stores").iterdir())


def test_split_sizes_match_the_poster_on_kaggle_scale() -> None:
    rng = np.random.default_rng(0)
    frequencies = np.array(KAGGLE_TRAIN_COUNTS) / KAGGLE_TRAIN_SAMPLES
    labels = (rng.random((KAGGLE_TRAIN_SAMPLES, 28)) < frequencies).astype(np.uint8)
    assignment = stratified_split(labels, 0.1, 0.1, seed=42)
    counts = {name: int((assignment == name).sum()) for name in ("train", "val", "test")}
    assert counts == {"train": 24858, "val": 3107, "test": 3107}
    # stratified: every class's val share stays close to 10 %
    for c in np.flatnonzero(labels.sum(0) >= 500):
        share = labels[assignment == "val", c].sum() / labels[:, c].sum()
        assert abs(share - 0.1) < 0.02
    np.testing.assert_array_equal(assignment, stratified_split(labels, 0.1, 0.1, seed=42))


def test_statistics_are_computed_on_train_only(kaggle_folder: Path, tmp_path: Path) -> None:
    store = build_store(kaggle_folder, 12, tmp_path / "stores", workers=1)
    split = prepare_split(store, 0.2, 0.2, seed=1)
    train_rows = split.indices("train")
    pixels = store.images()[train_rows].astype(np.float64) / 255
    np.testing.assert_allclose(split.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(split.std, pixels.std(axis=(0, 2, 3)), rtol=1e-6)
    everything = store.images().astype(np.float64).mean(axis=(0, 2, 3)) / 255
    assert not np.allclose(split.mean, everything, rtol=1e-9)
    assert (split.path / "split.csv").is_file()
    assert sorted(split.assignment.tolist()).count("val") == 8


def test_channel_stats_chunking_is_exact() -> None:
    images = np.random.default_rng(3).integers(0, 256, (50, 4, 5, 5), dtype=np.uint8)
    rows = np.arange(3, 50, 2)
    mean, std = channel_stats(images, rows, chunk=7)
    block = images[rows].astype(np.float64) / 255
    np.testing.assert_allclose(mean, block.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(std, block.std(axis=(0, 2, 3)), rtol=1e-6)


def test_pack_cli(kaggle_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hpa_lightning.pack import main

    main([f"root={kaggle_folder}", "size=8", f"cache_dir={tmp_path / 'c'}", "workers=1"])
    assert "40 samples at 8px" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["bogus=1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: hpa_lightning.pack: unknown argument 'bogus=1'; expected "
                                               "key=value with key in root, size, cache_dir, image_dir, workers, "
                                               "val_fraction, test_fraction, seed, sixteen_bit, "
                                               "duplicates, classes, max_image_pixels, out")


def test_skip_bad_samples_lists_them_and_keeps_the_rest(kaggle_folder: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    (kaggle_folder / "train" / "id003_red.png").write_bytes(b"\x89PNG broken")
    (kaggle_folder / "train" / "id007_blue.png").unlink()
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"id003_red.png: cannot decode|id007_blue.png"):
            build_store(kaggle_folder, 12, tmp_path / "strict", workers=workers)
        assert not list((tmp_path / "strict").glob("*"))  # nothing half-written left behind
    with pytest.raises(DataError, match=r"2 of 40 samples are unreadable, more than data.max_bad_fraction=0.01"):
        build_store(kaggle_folder, 12, tmp_path / "s", workers=1, on_bad_sample="skip")
    with caplog.at_level("WARNING"):
        store = build_store(kaggle_folder, 12, tmp_path / "s", workers=2, on_bad_sample="skip", max_bad_fraction=0.1)
    assert len(store) == 38 and "id003" not in store.ids and "id007" not in store.ids
    assert store.images().shape == (38, 4, 12, 12)
    for row, sample_id in enumerate(store.ids):  # rows after a skipped one moved down over it
        np.testing.assert_array_equal(store.images()[row], load_sample(kaggle_folder / "train", sample_id, 12))
    assert "id003_red.png" in caplog.text and "id007_blue.png" in caplog.text
    import pandas as pd

    assert pd.read_csv(store.path / "skipped.csv")["Id"].tolist() == ["id003", "id007"]
    assert store.path.name.endswith("-skipbad")


def test_a_bad_sample_stops_the_workers_without_killing_them(kaggle_folder: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed by Pool.terminate() while it holds the result queue's lock leaves the pool's shutdown waiting for
    ever: on a bad sample the workers pass over the tasks left and exit on their own instead."""
    import multiprocessing.pool

    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", lambda pool: pytest.fail("workers terminated"))
    (kaggle_folder / "train" / "id003_red.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"id003_red.png: cannot decode"):
        build_store(kaggle_folder, 12, tmp_path / "c", workers=2)
    assert not list((tmp_path / "c").glob("*"))


def test_packing_finishes_when_the_job_ignores_sigterm(kaggle_folder: Path, tmp_path: Path) -> None:
    """submitit's job handler bypasses SIGTERM and forked workers inherit it: the pool must still close and join."""
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda signum, frame: print('Bypassing signal SIGTERM', file=sys.stderr))\n"
        "from hpa_lightning.pack import build_store\n"
        f"store = build_store({str(kaggle_folder)!r}, 12, {str(tmp_path / 'stores')!r}, workers=2)\n"
        "print(len(store))\n")
    for attempt in range(3):  # the hang it guards against was not every time on two workers
        shutil.rmtree(tmp_path / "stores", ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == "40", (attempt, proc.stderr[-2000:])


def test_jobs_that_need_the_same_store_at_once_pack_it_once(kaggle_folder: Path, tmp_path: Path) -> None:
    """Parallel sweep jobs on a fresh cache all need the same store at the same moment: one packs it, the others wait
    for it and open it, instead of every job decoding the whole dataset at once."""
    go = tmp_path / "go"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from hpa_lightning.data import store\n"
        "write_all = store._write_all\n"
        "def counted(*args, **kwargs):\n"
        "    print('packing', flush=True)\n"
        "    return write_all(*args, **kwargs)\n"
        "store._write_all = counted\n"
        "print('ready', flush=True)\n"
        f"while not Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        f"packed = store.build_store({str(kaggle_folder)!r}, 64, {str(tmp_path / 'stores')!r}, workers=1)\n"
        "print(packed.path, len(packed), flush=True)\n")
    jobs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(3)]
    for job in jobs:
        assert job.stdout.readline().strip() == "ready", job.stderr.read()[-2000:]
    go.touch()
    outputs = [job.communicate(timeout=120) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [err[-2000:] for _, err in outputs]
    lines = [out.split() for out, _ in outputs]
    assert sum(words.count("packing") for words in lines) == 1, lines
    assert len({tuple(words[-2:]) for words in lines}) == 1  # the same store, whole, for every job
    assert lines[0][-1] == "40"


def test_a_filesystem_without_locks_still_packs(kaggle_folder: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from hpa_lightning import files

    def no_locks(*args: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    store = build_store(kaggle_folder, 12, tmp_path / "stores", workers=1)
    assert len(store) == 40
    assert [p.name for p in (tmp_path / "stores").iterdir()] == [store.path.name]


def test_available_cpus_follow_the_affinity_mask_and_the_slurm_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpa_lightning.machine import available_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert available_cpus() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert available_cpus() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert available_cpus() == 1


def test_an_empty_split_names_the_commands_own_knobs_and_the_smallest_values(kaggle_folder: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    from hpa_lightning.pack import main

    store = build_store(kaggle_folder, 8, tmp_path / "c", workers=1)
    with pytest.raises(DataError) as raised:
        prepare_split(store, val_fraction=0.01)
    assert str(raised.value) == ("data.split.val_fraction=0.01 and data.split.test_fraction=0.1 give 0 val, 4 test "
                                 "and 36 train samples of 40; every split needs one: with 40 samples use "
                                 "data.split.val_fraction>=0.025 and data.split.test_fraction>=0.025, summing to at "
                                 "most 0.975")
    split = prepare_split(store, val_fraction=0.025, test_fraction=0.025)  # the smallest values named do work
    assert [len(split.indices(name)) for name in ("train", "val", "test")] == [38, 1, 1]
    with pytest.raises(SystemExit) as exited:
        main([f"root={kaggle_folder}", "size=8", f"cache_dir={tmp_path / 'c'}", "test_fraction=0.99"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: val_fraction=0.1 and test_fraction=0.99 give") and "data.split" not in err

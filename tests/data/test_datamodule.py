"""DataModule loaders: thread and process readers deliver the same batches, buffers are recycled only when free."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hpa_lightning.data.datamodule import HPADataModule
from hpa_lightning.data.loader import BatchBuffers, PackedDataset, ThreadedDataLoader, collate_batch
from hpa_lightning.errors import DataError


def datamodule(root: Path, cache: Path, worker_type: str, num_workers: int) -> HPADataModule:
    dm = HPADataModule(root=str(root), image_size=16, cache_dir=str(cache), batch_size=6, eval_batch_size=5,
                       num_workers=num_workers, worker_type=worker_type, persistent_workers=False,
                       split={"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def epoch(loader) -> list[dict[str, np.ndarray]]:
    torch.manual_seed(123)  # the shuffling sampler draws from the global generator
    return [{key: value.numpy().copy() for key, value in batch.items()} for batch in loader]


@pytest.mark.parametrize(("worker_type", "num_workers"), [("thread", 2), ("thread", 1), ("process", 2)])
def test_readers_deliver_the_plain_loaders_batches(kaggle_folder: Path, tmp_path: Path, worker_type: str,
                                                   num_workers: int) -> None:
    plain = datamodule(kaggle_folder, tmp_path / "stores", "thread", 0)
    other = datamodule(kaggle_folder, tmp_path / "stores", worker_type, num_workers)
    images = np.load(plain.store.path / "images.npy")
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        expected, got = epoch(getattr(plain, name)()), epoch(getattr(other, name)())
        assert len(got) == len(expected) > 1
        for want, batch in zip(expected, got, strict=True):
            assert batch["image"].dtype == np.uint8
            np.testing.assert_array_equal(batch["index"], want["index"])
            np.testing.assert_array_equal(batch["image"], want["image"])
            np.testing.assert_array_equal(batch["image"], images[batch["index"]])
            np.testing.assert_array_equal(batch["target"], plain.store.labels[batch["index"]].astype(np.float32))


def test_buffers_are_recycled_only_once_nothing_refers_to_them() -> None:
    buffers = BatchBuffers(capacity=2)
    first = buffers.take((2, 3))
    view = first[1:]
    address = first.data_ptr()
    del first
    second = buffers.take((2, 3))
    assert second.data_ptr() != address  # the view still holds the first buffer
    del view
    third = buffers.take((2, 3))
    assert third.data_ptr() == address
    as_numpy = third.numpy()
    del third
    assert buffers.take((2, 3)).data_ptr() != address  # a numpy view holds it too
    del as_numpy
    assert buffers.take((4, 3)).shape == (4, 3)  # another shape gets its own buffer


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hpa-read")]


class FailingDataset(PackedDataset):
    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        if 7 in positions:
            raise OSError("disk gone")
        return super().__getitems__(positions)


def test_reader_errors_reach_the_loop_and_threads_stop(kaggle_folder: Path, tmp_path: Path) -> None:
    dm = datamodule(kaggle_folder, tmp_path / "stores", "thread", 0)
    dataset = FailingDataset(dm.store, np.arange(len(dm.store)))
    loader = ThreadedDataLoader(dataset, batch_size=4, collate_fn=collate_batch, read_threads=2)
    with pytest.raises(OSError, match="disk gone"):
        list(loader)
    assert not reader_threads()

    loader = ThreadedDataLoader(PackedDataset(dm.store, np.arange(len(dm.store))), batch_size=4,
                                collate_fn=collate_batch, read_threads=2, read_ahead=3)
    batches = iter(loader)
    next(batches)
    assert reader_threads()
    batches.close()  # a loop left early (break, exception in the training step) stops its readers
    assert not reader_threads()


def test_unknown_worker_type_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.worker_type: 'fibers' is not one of thread, process"):
        HPADataModule(root=str(tmp_path), worker_type="fibers")

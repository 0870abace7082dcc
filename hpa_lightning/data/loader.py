"""Reading the packed store: the Dataset over its rows and the thread-fed DataLoader with pinned batch buffers."""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpa_lightning.data.store import PackedStore


class PackedDataset(Dataset):
    """Rows of the packed store. The memory map is opened lazily so each DataLoader worker maps it itself.

    Args:
        store: the packed store.
        indices: store rows of this split.
        pin_memory: allocate batches in pinned memory (CUDA's caching host allocator recycles the blocks once their
            non-blocking copies to the GPU are done), so the one read per batch lands where the transfer starts.
    """

    def __init__(self, store: PackedStore, indices: np.ndarray, pin_memory: bool = False):
        self.store_path = store.path
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.from_numpy(store.labels[self.indices].astype(np.float32))
        self.pin_memory = pin_memory
        self._images: np.ndarray | None = None
        self._buffers: BatchBuffers | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_buffers": None}  # worker processes map and allocate their own

    def _map(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.store_path / "images.npy", mmap_mode="r")
        return self._images

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.indices[i]
        return {"image": torch.from_numpy(np.array(self._map()[row])), "target": self.labels[i],
                "index": torch.tensor(row)}

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch in one read: rows in ascending store order, copied once from the page cache into the batch.

        The batch comes out already collated (use `collate_batch`); its order within the batch is the store order,
        which does not matter to training (the sampler already chose which samples form the batch). Safe to call
        from several threads at once.
        """
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.indices[positions]
        order = np.argsort(rows, kind="stable")
        rows, positions = rows[order], positions[order]
        images = self._map()
        batch = self._batch_tensor((len(rows), *images.shape[1:]))
        np.take(images, rows, axis=0, out=batch.numpy(), mode="clip")  # mode="clip" writes straight into `out`
        return {"image": batch, "target": self.labels[torch.from_numpy(positions)], "index": torch.from_numpy(rows)}

    def _batch_tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        if torch.utils.data.get_worker_info() is not None:
            # In a DataLoader worker process the batch goes to the main process through shared memory: allocating
            # it there directly saves the copy default_collate would otherwise make (it does the same).
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
            return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
        if self.pin_memory:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        if self._buffers is None:
            self._buffers = BatchBuffers()
        return self._buffers.take(shape)


class BatchBuffers:
    """Host buffers for batches, recycled once nothing refers to them any more.

    A fresh 32 MB batch costs as much in page faults as the copy into it (a 512 px batch of 32 reads at ~1.8 GB/s
    into new memory and ~5 GB/s into memory touched before, on this project's 2-core CPU). A buffer handed out as
    a tensor is a numpy array shared with `torch.from_numpy`: every tensor, view or numpy view of it keeps the array
    referenced, so an array whose reference count is back to the pool's own is free to overwrite.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            for array in self._arrays:
                # references: the pool's list, the loop variable and getrefcount's argument
                if array.shape == shape and sys.getrefcount(array) == 3:
                    return torch.from_numpy(array)
            array = np.empty(shape, dtype=np.uint8)
            if len(self._arrays) < self.capacity:
                self._arrays.append(array)
            return torch.from_numpy(array)


def collate_batch(batch):
    """`PackedDataset.__getitems__` already returns a collated batch."""
    return batch


class ThreadedDataLoader(DataLoader):
    """A DataLoader that reads batches with `read_threads` threads of this process instead of worker processes.

    Reading a packed batch is one memcpy out of the page cache that releases the GIL, so threads run it in parallel
    while the training loop goes on, without the per-batch shared-memory segment and inter-process hand-over that
    worker processes need. `read_ahead` batches are in flight, delivered in sampler order. Sampling, DDP samplers
    (Lightning re-creates this class with a DistributedSampler) and `len` are the DataLoader's own; with
    `read_threads=0` it is a plain single-process DataLoader.
    """

    def __init__(self, *args, read_threads: int = 2, read_ahead: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_threads = read_threads
        self.read_ahead = read_ahead

    def __iter__(self) -> Iterator:
        if self.num_workers > 0 or self.read_threads <= 0:
            return super().__iter__()
        # The DataLoader's own iterator draws a base seed for its workers from the global generator before the
        # sampler draws its own: drawn here too, the shuffled order is the same whatever the worker_type.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        batches = self.batch_sampler if self.batch_sampler is not None else self.sampler
        return _read_batches(self.dataset, batches, self.collate_fn, self.read_threads,
                             self.read_ahead or 2 * self.read_threads)


def _read_batches(dataset: Dataset, batches, collate_fn, threads: int, depth: int) -> Iterator:
    def read(indices) -> object:
        if hasattr(dataset, "__getitems__"):
            return collate_fn(dataset.__getitems__(list(indices)))
        return collate_fn([dataset[i] for i in indices])

    in_flight: deque[Future] = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="hpa-read")
    try:
        for indices in batches:
            in_flight.append(pool.submit(read, indices if isinstance(indices, list | tuple) else [indices]))
            if len(in_flight) >= depth:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        for future in in_flight:
            future.cancel()
        pool.shutdown(wait=True)

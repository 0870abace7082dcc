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
from hpa_lightning.errors import ConfigError


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
    """A DataLoader that reads batches with `read_threads` threads of this process instead of worker processes, and
    that can be stopped mid-epoch and resumed to exactly where it was.

    Reading a packed batch is one memcpy out of the page cache that releases the GIL, so threads run it in parallel
    while the training loop goes on, without the per-batch shared-memory segment and inter-process hand-over that
    worker processes need. `read_ahead` batches are in flight, delivered in sampler order. Sampling, DDP samplers
    (Lightning re-creates this class with a DistributedSampler) and `len` are the DataLoader's own; with
    `read_threads=0` it is a plain single-process DataLoader (or a multi-process one with `num_workers`).

    Resuming: an epoch's batches are drawn from the sampler when its first batch is asked for, after Lightning has
    set the sampler's epoch. `state_dict` holds the random state the draw started from and how many batches were
    delivered; Lightning saves it in every checkpoint and hands it back to `load_state_dict` when a run restarts
    mid-epoch. The next epoch then draws the same batches again from the saved state, without advancing the
    process's generators (they were restored to the moment of the checkpoint), and skips the delivered ones
    unread. Any sampler whose order comes from the global torch generator, the loader's `generator` or its epoch
    (Random, WeightedRandom, Distributed and Lightning's DistributedSamplerWrapper) is resumed exactly; the
    samples themselves draw nothing (augmentation runs on the device, after the loader).
    """

    def __init__(self, *args, read_threads: int = 2, read_ahead: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_threads = read_threads
        self.read_ahead = read_ahead
        self._epoch = _EpochBatches(self)
        self._resume_from: dict | None = None

    @property
    def _index_sampler(self):
        # what every DataLoader iterator (single- or multi-process, persistent workers too) draws indices from
        return self._epoch

    def __iter__(self) -> Iterator:
        return self._delivering()

    def _delivering(self) -> Iterator:
        """This epoch's batches, counted as they are delivered. A generator: nothing is drawn before the first
        batch is asked for (Lightning creates the first epoch's iterator before it restores a checkpoint)."""
        resume, self._resume_from = self._resume_from, None
        self._epoch.draw(resume)
        if self.num_workers > 0 or self.read_threads <= 0:
            with torch.random.fork_rng(devices=[]):  # the iterator's seed for its workers, who draw nothing
                batches = super().__iter__()
        else:
            batches = _read_batches(self.dataset, self._epoch, self.collate_fn, self.read_threads,
                                    self.read_ahead or 2 * self.read_threads)
        for batch in batches:
            self._epoch.delivered += 1
            yield batch

    def state_dict(self) -> dict:
        """Where the current epoch is: the random state its batches were drawn from and the batches delivered (plain
        tensors and numbers, so checkpoints load with `weights_only=True`)."""
        return self._epoch.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the epoch `state_dict` describes at the next `iter`; a finished or unstarted epoch (a checkpoint of
        an epoch's end) leaves the next epoch to be drawn afresh."""
        unfinished = state_dict.get("rng") is not None and state_dict.get("delivered", 0) < state_dict.get(
            "batches", 0)
        self._resume_from = dict(state_dict) if unfinished else None


class _EpochBatches:
    """One epoch of a `ThreadedDataLoader`: its batches of indices (what its iterators take as their sampler), drawn
    once when the epoch starts, the random state they were drawn from and how many were delivered."""

    def __init__(self, loader: ThreadedDataLoader):
        self.loader = loader
        self.batches: list = []
        self.rng: dict | None = None
        self.delivered = 0
        self.skipped = 0

    def _sampler(self):
        return DataLoader._index_sampler.fget(self.loader)  # the batch sampler (or sampler) the loader was built with

    def __len__(self) -> int:
        return len(self._sampler())

    def __iter__(self) -> Iterator:
        return iter(self.batches[self.skipped:])

    def _random_state(self) -> dict:
        generator = self.loader.generator
        return {"torch": torch.get_rng_state(), "generator": None if generator is None else generator.get_state()}

    def _draw(self) -> list:
        # as the DataLoader's own iterator: first its workers' base seed, then the sampler's order
        torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)
        return list(self._sampler())

    def draw(self, resume: dict | None) -> None:
        if resume is None:
            self.rng, self.delivered = self._random_state(), 0
            self.batches = self._draw()
        else:
            self.rng, self.delivered = resume["rng"], int(resume["delivered"])
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.rng["torch"])
                if self.rng.get("generator") is not None and self.loader.generator is not None:
                    self.loader.generator.set_state(self.rng["generator"])  # left after the draw, as it was then
                self.batches = self._draw()
            if len(self.batches) != int(resume["batches"]):
                raise ConfigError(f"resuming mid-epoch: the checkpoint's epoch had {resume['batches']} batches, this "
                                  f"loader draws {len(self.batches)}; resume with the run's data.batch_size, "
                                  f"data.oversample and trainer.devices / trainer.num_nodes")
        self.skipped = self.delivered

    def state_dict(self) -> dict:
        if self.rng is None:
            return {}
        return {"rng": self.rng, "delivered": self.delivered, "batches": len(self.batches)}


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

"""LightningDataModule over the packed store: yields uint8 RGBY tensors, float multi-hot targets and row indices."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from hpa_lightning.pack import PackedStore, build_store, store_path
from hpa_lightning.sources import DataError, parse_sources
from hpa_lightning.split import Split, prepare_split

log = logging.getLogger(__name__)


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


def repeat_factors(labels: np.ndarray, threshold: float) -> np.ndarray:
    """Per-sample repeat factors for rare-class oversampling (repeat factor sampling, Gupta et al., LVIS 2019).

    A class seen in a fraction f of training samples gets r_c = max(1, sqrt(threshold / f)); a sample is repeated as
    often as its rarest class asks, r_i = max over its classes of r_c.
    """
    frequency = labels.mean(axis=0)
    with np.errstate(divide="ignore"):
        class_factor = np.where(frequency > 0, np.sqrt(threshold / np.maximum(frequency, 1e-12)), 1.0)
    class_factor = np.maximum(1.0, class_factor)
    return np.max(np.where(labels > 0, class_factor[None, :], 1.0), axis=1)


class HPADataModule(L.LightningDataModule):
    """Kaggle-layout folder (or the built-in synthetic generator) -> packed store + stratified split -> loaders.

    Args:
        root: folder with `train.csv` and the image folder. With `synthetic` set, the generator fills it once.
        synthetic: generator settings `{n, seed, size}`, or None for real data.
        image_size: side of the packed square images (the training resolution).
        cache_dir: where packed stores live.
        split: `{seed, val_fraction, test_fraction}` of the multilabel-stratified split.
        num_workers: threads (worker_type=thread, the default: batches read into recycled or pinned buffers by
            threads of this process) or DataLoader worker processes (worker_type=process) that read batches.
        oversample: draw training samples with replacement in proportion to `repeat_factors(oversample_threshold)`,
            so an epoch holds about sum(r_i) samples and rare classes are seen r_c times as often.
    """

    def __init__(self, root: object, image_size: int = 512, cache_dir: str = ".cache/stores", image_dir: str = "train",
                 synthetic: dict | None = None, split: dict | None = None, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 2, worker_type: str = "thread",
                 pin_memory: bool = True, persistent_workers: bool = True, pack_workers: int | None = None,
                 max_samples: int | None = None, oversample: bool = False, oversample_threshold: float = 0.05,
                 on_bad_sample: str = "error", max_bad_fraction: float = 0.01, sixteen_bit: str = "divide",
                 duplicates: str = "drop", duplicate_distance: int = 3):
        super().__init__()
        if not isinstance(root, (str, Path)):  # several sources (a Hydra ListConfig): plain containers
            from omegaconf import OmegaConf

            root = OmegaConf.to_container(root) if OmegaConf.is_config(root) else list(root)
        self.sources = parse_sources(root, image_dir)
        self.root_spec = root
        self.root = self.sources[0].root  # the synthetic data's folder, and the first source
        self.image_size = int(image_size)
        self.cache_dir = Path(cache_dir)
        self.image_dir = image_dir
        self.synthetic = dict(synthetic) if synthetic else None
        self.split_cfg = {"seed": 42, "val_fraction": 0.1, "test_fraction": 0.1, **(split or {})}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        if worker_type not in ("thread", "process"):
            raise DataError(f"data.worker_type: {worker_type!r} is not one of thread, process")
        self.num_workers = num_workers
        self.worker_type = worker_type
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.persistent_workers = persistent_workers and num_workers > 0
        self.pack_workers = pack_workers
        self.max_samples = max_samples
        self.oversample = oversample
        self.oversample_threshold = oversample_threshold
        self.on_bad_sample = on_bad_sample
        self.max_bad_fraction = max_bad_fraction
        self.sixteen_bit = sixteen_bit
        self.duplicates, self.duplicate_distance = duplicates, duplicate_distance
        self.store: PackedStore | None = None
        self.split: Split | None = None
        self.datasets: dict[str, PackedDataset] = {}

    def prepare_data(self) -> None:
        if self.synthetic and not (self.root / "train.csv").is_file():
            from hpa_lightning.synth import generate

            log.info("generating synthetic HPA data (%s) into %s", self.synthetic, self.root)
            try:
                generate(self.root, **self.synthetic)
            except FileExistsError:
                pass  # a concurrent job generated it first
        store = build_store(self.root_spec, self.image_size, self.cache_dir, self.image_dir,
                            workers=self.pack_workers, progress=True, on_bad_sample=self.on_bad_sample,
                            max_bad_fraction=self.max_bad_fraction, sixteen_bit=self.sixteen_bit,
                            duplicates=self.duplicates, duplicate_distance=self.duplicate_distance)
        prepare_split(store, **self.split_cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        self.store = PackedStore.open(store_path(self.root_spec, self.image_size, self.cache_dir, self.image_dir,
                                                 self.on_bad_sample, sixteen_bit=self.sixteen_bit,
                                                 duplicates=self.duplicates))
        self.split = prepare_split(self.store, **self.split_cfg)
        for name in ("train", "val", "test"):
            indices = self.split.indices(name)
            if self.max_samples:  # quick experiments: a deterministic subset of each split
                indices = indices[: max(1, int(self.max_samples * len(indices) / len(self.store)))]
            self.datasets[name] = PackedDataset(self.store, indices,
                                                pin_memory=self.pin_memory and self.worker_type == "thread")

    def sources_summary(self) -> dict:
        """The store's sources (folders, samples read, samples kept) and its duplicates, for results.json."""
        assert self.store is not None, "setup() first"
        meta = json.loads((self.store.path / "meta.json").read_text())
        return {"sources": meta.get("sources", [{"root": str(self.root), "samples": len(self.store),
                                                 "kept": len(self.store)}]),
                "duplicates": {key: meta.get("duplicates", {}).get(key, 0 if key == "pairs" else self.duplicates)
                               for key in ("policy", "pairs")}}

    @property
    def stats(self) -> tuple[list[float], list[float]]:
        assert self.split is not None, "setup() first"
        return self.split.mean, self.split.std

    def ids(self, rows: np.ndarray) -> list[str]:
        assert self.store is not None, "setup() first"
        return [self.store.ids[r] for r in rows]

    def train_labels(self) -> np.ndarray:
        assert self.store is not None, "setup() first"
        return self.store.labels[self.datasets["train"].indices]

    def train_sampler(self) -> WeightedRandomSampler | None:
        if not self.oversample:
            return None
        factors = repeat_factors(self.train_labels(), self.oversample_threshold)
        # Lightning wraps this in a DistributedSamplerWrapper under DDP; the global seed makes the draws repeatable.
        return WeightedRandomSampler(torch.from_numpy(factors), num_samples=int(round(factors.sum())),
                                     replacement=True)

    def _loader(self, name: str, train: bool) -> DataLoader:
        sampler = self.train_sampler() if train else None
        threads = self.worker_type == "thread"
        return ThreadedDataLoader(
            self.datasets[name], batch_size=self.batch_size if train else self.eval_batch_size,
            collate_fn=collate_batch, shuffle=train and sampler is None, sampler=sampler,
            drop_last=train and len(self.datasets[name]) > self.batch_size,
            read_threads=self.num_workers if threads else 0, num_workers=0 if threads else self.num_workers,
            pin_memory=self.pin_memory and not threads,  # threads read into pinned memory directly
            persistent_workers=self.persistent_workers and not threads)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

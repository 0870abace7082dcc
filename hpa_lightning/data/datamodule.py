"""LightningDataModule over the packed store: yields uint8 RGBY tensors, float multi-hot targets and row indices."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from hpa_lightning.classes import DEFAULT_CLASSES, NUM_CLASSES, class_set
from hpa_lightning.data.loader import PackedDataset, ThreadedDataLoader, collate_batch
from hpa_lightning.data.sources import DEFAULT_MAX_IMAGE_PIXELS, parse_sources
from hpa_lightning.data.split import Split, prepare_split, split_key
from hpa_lightning.data.store import PackedStore, build_store, store_path
from hpa_lightning.data.stream_store import StreamStore, open_stream, stream_dataset, stream_loader
from hpa_lightning.errors import ConfigError, DataError
from hpa_lightning.files import exclusive

log = logging.getLogger(__name__)


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
            threads of this process) or DataLoader worker processes (worker_type=process) that read batches. A
            streaming store (`store`) read with worker_type=thread uses litdata's own prefetch thread instead.
        oversample: draw training samples with replacement in proportion to `repeat_factors(oversample_threshold)`,
            so an epoch holds about sum(r_i) samples and rare classes are seen r_c times as often.
        classes: the label space (`hpa2018`, `hpa2021` or a CSV `id,name`; hpa_lightning.classes): the labels are
            its ids, and the model's head, metrics and outputs take their size and names from it.
        max_image_pixels: a channel file whose header declares more pixels is refused before it is decoded (an
            image bomb); with `on_bad_sample="skip"` its sample is skipped like any other unreadable one.
    """

    def __init__(self, root: object, image_size: int = 512, cache_dir: str = ".cache/stores", image_dir: str = "train",
                 synthetic: dict | None = None, split: dict | None = None, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 2, worker_type: str = "thread",
                 pin_memory: bool = True, persistent_workers: bool = True, pack_workers: int | None = None,
                 max_samples: int | None = None, oversample: bool = False, oversample_threshold: float = 0.05,
                 on_bad_sample: str = "error", max_bad_fraction: float = 0.01, sixteen_bit: str = "divide",
                 duplicates: str = "drop", duplicate_distance: int = 3, classes: str = DEFAULT_CLASSES,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, store: str | None = None,
                 storage_options: dict | None = None, max_cache_size: int | str = "50GB", shuffle: bool = True):
        super().__init__()
        self.class_set = class_set(classes)
        self.stream_url = str(store) if store else None
        if self.stream_url:  # a streaming store replaces the sources; what a stream cannot do is refused here
            if oversample:
                raise ConfigError(f"data.oversample=true: per-sample repeat weights need random access; a streaming "
                                  f"store (data.store={self.stream_url}) is read in chunks: set data.oversample=false")
            if max_samples:
                raise ConfigError(f"data.max_samples={max_samples}: not supported with a streaming store "
                                  f"(data.store={self.stream_url}); pack a smaller store instead")
            if (split or {}).get("folds"):
                raise ConfigError(f"data.split.folds={split['folds']}: a streaming store holds the one split it was "
                                  f"packed with (data.store={self.stream_url}); K folds need the memmap store")
            synthetic, root = None, root if root not in (None, "", "???") else "."
        self.storage_options, self.max_cache_size, self.shuffle = storage_options, max_cache_size, bool(shuffle)
        self.stream: StreamStore | None = None
        if synthetic and self.class_set.name != DEFAULT_CLASSES:
            raise DataError(f"data.classes={classes}: the synthetic generator paints the {NUM_CLASSES} classes of "
                            f"{DEFAULT_CLASSES}; use real data (data.root) for another class set")
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
        self.max_image_pixels = max_image_pixels
        self.store: PackedStore | None = None
        self.split: Split | None = None
        self.datasets: dict[str, PackedDataset] = {}

    def prepare_data(self) -> None:
        if self.stream_url:
            self.open_stream()  # the metadata fetched once, errors before any process group exists
            return
        if self.synthetic and not (self.root / "train.csv").is_file():
            from hpa_lightning.data.simulator.dataset import generate

            self.root.parent.mkdir(parents=True, exist_ok=True)
            with exclusive(self.root):  # parallel jobs wait for the one generating it
                if not (self.root / "train.csv").is_file():
                    log.info("generating synthetic HPA data (%s) into %s", self.synthetic, self.root)
                    try:
                        generate(self.root, **self.synthetic)
                    except FileExistsError:
                        pass  # generated by a process that does not take the lock (python -m hpa_lightning.synth)
        prepare_split(self.build_store(), **self.split_cfg)

    def build_store(self) -> PackedStore:
        """Pack the store unless it exists (one sample per image; data/cell_store.py's subclass: one per cell)."""
        return build_store(self.root_spec, self.image_size, self.cache_dir, self.image_dir,
                           workers=self.pack_workers, progress=True, on_bad_sample=self.on_bad_sample,
                           max_bad_fraction=self.max_bad_fraction, sixteen_bit=self.sixteen_bit,
                           duplicates=self.duplicates, duplicate_distance=self.duplicate_distance,
                           classes=self.class_set, max_image_pixels=self.max_image_pixels)

    def store_path(self) -> Path:
        """Where build_store put the store."""
        return store_path(self.root_spec, self.image_size, self.cache_dir, self.image_dir, self.on_bad_sample,
                          sixteen_bit=self.sixteen_bit, duplicates=self.duplicates, classes=self.class_set,
                          max_image_pixels=self.max_image_pixels)

    def open_stream(self) -> StreamStore:
        """The streaming store at data.store, checked against this run's size, classes and split."""
        if self.stream is None:
            stream = open_stream(self.stream_url, self.cache_dir, self.storage_options)
            where = f"data.store={self.stream_url}"
            if stream.store.image_size != self.image_size:
                raise ConfigError(f"data.image_size={self.image_size}: {where} holds {stream.store.image_size}px "
                                  f"samples; set data.image_size={stream.store.image_size} or pack it at "
                                  f"{self.image_size}px")
            stored = json.loads((stream.store.path / "meta.json").read_text()).get("classes")
            if stored and stored != self.class_set.name:
                raise ConfigError(f"data.classes={self.class_set.name}: {where} holds the classes {stored}")
            key = split_key(self.split_cfg["seed"], self.split_cfg["val_fraction"], self.split_cfg["test_fraction"])
            if stream.split_key() != key:
                raise ConfigError(f"data.split: {where} was packed with the split {stream.split_key()}, this run asks "
                                  f"for {key}; set data.split.* to it or pack with that split")
            self.stream = stream
        return self.stream

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        if self.stream_url:
            stream = self.open_stream()
            self.store, self.split = stream.store, stream.split
            for name in ("train", "val", "test"):
                self.datasets[name] = self._stream_dataset(name)
            return
        self.store = PackedStore.open(self.store_path())
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
    def class_names(self) -> list[str]:
        return list(self.class_set.names)

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

    def split_counts(self) -> dict[str, int]:
        """Samples in each split (all ranks together)."""
        assert self.split is not None, "setup() first"
        if self.stream_url:  # a StreamingDataset's len is this rank's share
            return {name: len(self.split.indices(name)) for name in ("train", "val", "test")}
        return {name: len(self.datasets[name]) for name in ("train", "val", "test")}

    def train_samples_per_epoch(self) -> int:
        """Samples one epoch of training draws (on this rank under DDP for a stream; oversampled: sum of repeats)."""
        if self.stream_url:
            return len(self.datasets["train"])
        return len(self.train_dataloader().sampler)

    def _stream_dataset(self, name: str):
        """Split `name` of the stream. Training is shuffled (litdata: chunks, then samples within a window, anew each
        epoch from the seed) with drop_last, so every rank draws the same number of full batches: floor(floor(N / B) /
        ranks) each, the rest of the epoch (fewer than ranks x B samples, other ones each epoch) left out. Evaluation
        under DDP: each rank reads its share of the split (every sample on one rank), or the whole split when it is
        too small for every rank to get a batch (stream_store.stream_dataset)."""
        train = name == "train"
        workers = 0 if self.worker_type == "thread" else self.num_workers
        return stream_dataset(self.stream, name, shuffle=train and self.shuffle, drop_last=train,
                              seed=int(self.split_cfg["seed"]), max_cache_size=self.max_cache_size,
                              eval_batch_size=None if train else self.eval_batch_size, workers=workers)

    def _loader(self, name: str, train: bool) -> DataLoader:
        if self.stream_url:
            # made anew here: a StreamingDataset takes the DDP ranks from the process group when it is created, which
            # exists only once Lightning asks for the loaders (setup() runs before the Trainer starts it)
            self.datasets[name] = self._stream_dataset(name)
            return stream_loader(self.datasets[name], self.batch_size if train else self.eval_batch_size,
                                 num_workers=self.num_workers, pin_memory=self.pin_memory,
                                 persistent_workers=self.persistent_workers, worker_type=self.worker_type)
        sampler = self.train_sampler() if train else None
        threads = self.worker_type == "thread"
        return ThreadedDataLoader(
            self.datasets[name], batch_size=self.batch_size if train else self.eval_batch_size,
            collate_fn=collate_batch, shuffle=train and sampler is None and self.shuffle, sampler=sampler,
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


def datamodule_from_config(data) -> HPADataModule:
    """`instantiate(cfg.data)`, with a value the config leaves open (`???`) said in one line naming the key: the
    sources (`data.root`) are needed unless `data.store` names a streaming store, which replaces them (then `data.root`
    is set to null, in place, so the saved config says what was read)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    if OmegaConf.is_missing(data, "root") and data.get("store"):
        data.root = None
    try:
        return instantiate(data)
    except MissingMandatoryValue as err:
        key = err.full_key or "data"
        if key == "data.root":
            raise ConfigError("data.root: not set; give data.root=DIR (a folder holding train.csv and train/) or "
                              "data.store=URL (a streaming store)") from None
        raise ConfigError(f"{key}: not set; give {key}=...") from None

"""Section 1: the packed store's loader against a per-sample PNG loader."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpa_lightning.bench.common import Profile, note
from hpa_lightning.data.sources import load_sample


class PngDataset(Dataset):
    """The per-sample baseline: every item decodes its four PNGs (what most Kaggle kernels did)."""

    def __init__(self, image_dir: Path, ids: list[str], labels: np.ndarray, size: int):
        self.image_dir, self.ids, self.size = image_dir, ids, size
        self.labels = torch.from_numpy(labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = torch.from_numpy(load_sample(self.image_dir, self.ids[i], self.size))
        return {"image": image, "target": self.labels[i], "index": torch.tensor(i)}


def shutdown_workers(loader: Iterable) -> None:
    """Stop a loader's persistent workers now rather than at garbage collection."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def loader_rate(loader: DataLoader, warmup_batches: int, min_batches: int, min_seconds: float,
                max_epochs: int = 50) -> dict[str, float]:
    """Samples/s after `warmup_batches` (worker start-up, page cache), over at least `min_batches` and `min_seconds`.

    Epochs are chained (persistent workers) until both minima are reached.
    """
    started = time.perf_counter()
    first_batch_s = None
    batches = timed_batches = timed_samples = 0
    t0 = None
    for _ in range(max_epochs):
        for batch in loader:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - started
                if batch["image"].dtype != torch.uint8:
                    raise TypeError(f"expected uint8 batches, got {batch['image'].dtype}")
            batches += 1
            if t0 is None:
                if batches >= warmup_batches:
                    t0 = time.perf_counter()
                continue
            timed_batches += 1
            timed_samples += len(batch["image"])
            if timed_batches >= min_batches and time.perf_counter() - t0 >= min_seconds:
                break
        else:
            continue
        break
    elapsed = time.perf_counter() - t0 if t0 is not None else float("nan")
    return {"samples_per_s": timed_samples / elapsed if timed_samples else float("nan"), "timed_samples": timed_samples,
            "timed_batches": timed_batches, "seconds": elapsed, "first_batch_s": first_batch_s or float("nan")}


def bench_loading(root: Path, cache: Path, prof: Profile, workers: int) -> dict:
    from hpa_lightning.data.datamodule import HPADataModule

    def datamodule(worker_type: str) -> HPADataModule:
        dm = HPADataModule(root=str(root), image_size=prof.size, cache_dir=str(cache / "stores"),
                           batch_size=prof.load_batch, num_workers=workers, worker_type=worker_type,
                           persistent_workers=workers > 0)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    dm = datamodule("thread")
    train_rows = dm.datasets["train"].indices
    png_rows = train_rows[: prof.load_png_samples]
    png_set = PngDataset(root / dm.image_dir, dm.ids(png_rows), dm.store.labels[png_rows], prof.size)
    png_loader = DataLoader(png_set, batch_size=prof.load_batch, shuffle=True, drop_last=True, num_workers=workers,
                            pin_memory=dm.pin_memory, persistent_workers=workers > 0)
    warm = max(2, 2 * workers)
    note(f"loading: per-sample PNG loader over {len(png_set)} samples, {workers} worker processes")
    png = loader_rate(png_loader, warm, min_batches=max(2, len(png_loader) - warm), min_seconds=0.0)
    shutdown_workers(png_loader)
    rates = {}
    for worker_type, module in (("thread", dm), ("process", datamodule("process"))):
        loader = module.train_dataloader()
        note(f"loading: packed DataModule loader over {len(module.datasets['train'])} train samples, "
             f"{workers} {worker_type} workers")
        rates[worker_type] = loader_rate(loader, warm, min_batches=max(4, len(loader)),
                                         min_seconds=prof.load_min_seconds)
        shutdown_workers(loader)
    packed = rates["thread"]
    return {"ratio": packed["samples_per_s"] / png["samples_per_s"], "packed": packed, "png": png,
            "packed_process_workers": rates["process"],
            "process_ratio": rates["process"]["samples_per_s"] / png["samples_per_s"],
            "batch_size": prof.load_batch, "workers": workers, "image_size": prof.size,
            "store": str(dm.store.path), "train_samples": len(dm.datasets["train"]),
            "png_baseline_samples": len(png_set)}


class TimedIterable:
    """Wraps a DataLoader; records how long each `next()` blocked (the training loop waiting for data)."""

    def __init__(self, loader: DataLoader, waits: list[float]):
        self.loader, self.waits = loader, waits

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - t0)
            yield batch


def dm_loader_of(trainer) -> DataLoader | None:
    combined = trainer.fit_loop._combined_loader
    if combined is None:
        return None
    loader = combined.flattened[0]
    return loader.loader if isinstance(loader, TimedIterable) else loader

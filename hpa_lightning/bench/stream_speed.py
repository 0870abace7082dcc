"""Section 10: the streaming store (data/stream_store.py, litdata) against what it replaces or rides on, side by side.

- `local`: the training loader of a local streaming folder against the memmap store's (HPADataModule), same samples
  (the memmap store packed to chunks), batch size and worker setting (data.worker_type=thread, training's default:
  both read in the training process, the memmap loader with `workers` read threads, the stream with litdata's own
  prefetch thread); samples/s each, the ratio stream / memmap (goal >= 0.8).
- `object store`: one epoch of the training split streamed from a loopback S3 server (moto's, on 127.0.0.1; a
  fresh local cache, so every chunk is downloaded) against a plain GET loop fetching the very same chunk objects one
  after another with boto3; each as samples/s, the ratio stream / GET loop (goal >= 0.5). Skipped, and said so,
  without `moto[server]` (the dev extra).
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hpa_lightning.bench.common import Profile, median, note
from hpa_lightning.bench.loading import loader_rate, shutdown_workers
from hpa_lightning.bench.loopback_s3 import loopback_s3

BUCKET = "hpa-bench"
# the object-store comparison streams one epoch of the training split (what training streams; 1600 samples, 1.6 GB
# in the full profile): an epoch's fixed costs (the index, the client, the first chunk's wait) weigh on it as on a
# real epoch, not on a 200-sample one
OBJECT_STORE_SPLIT = "train"


def _epoch_rate(loader) -> dict[str, float]:
    """Samples/s of one whole epoch (from the first batch asked for: downloads and cache fills included)."""
    started = time.perf_counter()
    samples = sum(len(batch["image"]) for batch in loader)
    seconds = time.perf_counter() - started
    return {"samples_per_s": samples / seconds, "samples": samples, "seconds": seconds}


def _get_loop(endpoint: str, prefix: str, samples: int) -> dict[str, float]:
    """Every object under `prefix` fetched whole with boto3, one after another: the bytes the stream downloads."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for item in page.get("Contents", [])]
    started = time.perf_counter()
    size = sum(len(client.get_object(Bucket=BUCKET, Key=key)["Body"].read()) for key in keys)
    seconds = time.perf_counter() - started
    return {"samples_per_s": samples / seconds, "objects": len(keys), "mb": size / 2**20, "seconds": seconds}


def _image_offset(folder: Path) -> tuple[int, list[str]]:
    """Where a sample's image bytes start within its litdata item, and the chunk files, from the split's index.json.

    An item (litdata's PyTree layout) is one uint32 size per leaf, then the leaves: the image first, as litdata's
    "tensor" (a big-endian uint32 dtype code and rank, the shape: 3 uint32 for (4, S, S), the bytes)."""
    config = json.loads((folder / "index.json").read_text())
    formats = config["config"]["data_format"]
    if formats[0] != "tensor":
        raise ValueError(f"{folder}: first leaf is {formats[0]}, not the image tensor")
    return 4 * len(formats) + 8 + 4 * 3, [str(folder / chunk["filename"]) for chunk in config["chunks"]]


def _copy_chunk(path: str, offset: int, nbytes: int, batch_size: int, buffers, seed: int) -> int:
    """Copy every sample of one chunk file into batches, in shuffled order; returns the samples copied."""
    with open(path, "rb") as handle:
        chunk = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(chunk, dtype=np.uint8)
    try:
        count = struct.unpack_from("<I", chunk, 0)[0]
        starts = np.frombuffer(chunk, dtype=np.uint32, count=count, offset=4).astype(np.int64) + offset
        order = np.random.default_rng(seed).permutation(count)
        for first in range(0, count, batch_size):
            rows = order[first:first + batch_size]
            batch = buffers.take((len(rows), nbytes)).numpy()
            for slot, row in enumerate(rows):
                np.copyto(batch[slot], data[starts[row]:starts[row] + nbytes])
        return count
    finally:
        data = None  # the last view of the mapping, dropped so that closing it cannot fail over an error of the copy
        chunk.close()


def _chunk_copy_rate(folder: Path, nbytes: int, batch_size: int, threads: int, seconds: float) -> float:
    """Samples/s of copying split `folder`'s images out of its chunk files with `threads` threads (passes over the
    split repeated for at least `seconds`, after one pass to warm the page cache)."""
    from hpa_lightning.data.loader import BatchBuffers

    offset, chunks = _image_offset(folder)
    buffers = BatchBuffers()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        def one_pass(seed: int) -> int:
            return sum(pool.map(lambda job: _copy_chunk(job[1], offset, nbytes, batch_size, buffers, seed + job[0]),
                                enumerate(chunks)))

        one_pass(0)
        samples, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or samples == 0:
            samples += one_pass(samples)
        return samples / (time.perf_counter() - started)


def bench_stream(root: Path, cache: Path, prof: Profile, workers: int) -> dict:
    from hpa_lightning.data import stream_store as streams
    from hpa_lightning.data.datamodule import HPADataModule
    from hpa_lightning.data.stream_pack import pack_stream

    dm = HPADataModule(root=str(root), image_size=prof.size, cache_dir=str(cache / "stores"),
                       batch_size=prof.load_batch, num_workers=workers, persistent_workers=workers > 0)
    dm.prepare_data()
    dm.setup("fit")
    folder = cache / "streams" / f"{dm.store.path.name}-{dm.split.path.name}"
    if not folder.is_dir():
        note(f"stream: packing the memmap store to chunks in {folder}")
        pack_stream(dm.store, dm.split, str(folder), workers=workers, progress=False)
    stream_cache = cache / "stream-cache"
    warm = max(2, 2 * workers)
    rates: dict[str, list[float]] = {"memmap": [], "local": [], "chunk_copy": []}
    sample_bytes = 4 * prof.size * prof.size
    for _ in range(prof.repeats):  # alternating rounds over the same samples
        memmap = dm.train_dataloader()
        note(f"stream: memmap store's loader, {len(dm.datasets['train'])} samples, {workers} workers")
        rates["memmap"].append(loader_rate(memmap, warm, max(4, len(memmap)), prof.load_min_seconds)["samples_per_s"])
        shutdown_workers(memmap)
        dataset = streams.stream_dataset(streams.open_stream(str(folder), stream_cache), "train", shuffle=True)
        local = streams.stream_loader(dataset, prof.load_batch, workers, worker_type="thread")
        note("stream: local streaming folder's loader, read in this process")
        rates["local"].append(loader_rate(local, warm, max(4, len(local)), prof.load_min_seconds)["samples_per_s"])
        shutdown_workers(local)
        note("stream: the same samples copied out of the chunk files without litdata")
        rates["chunk_copy"].append(_chunk_copy_rate(folder / "train", sample_bytes, prof.load_batch, workers,
                                                    prof.load_min_seconds))
    result = {"ratio": median(rates["local"]) / median(rates["memmap"]),
              "memmap_samples_per_s": median(rates["memmap"]), "local_samples_per_s": median(rates["local"]),
              "chunk_copy_ratio": median(rates["chunk_copy"]) / median(rates["memmap"]),
              "chunk_copy_samples_per_s": median(rates["chunk_copy"]),
              "batch_size": prof.load_batch, "workers": workers, "image_size": prof.size,
              "train_samples": len(dm.datasets["train"]), "rounds": prof.repeats}
    try:
        import moto.server  # noqa: F401  (the dev extra)
    except ImportError:
        result["object_store"] = {"skipped": "moto[server] is not installed (pip install -e '.[dev]')"}
        return result
    with loopback_s3(BUCKET) as endpoint:
        url = f"s3://{BUCKET}/bench"
        note("stream: packing to the loopback object store")
        pack_stream(dm.store, dm.split, url, workers=workers, progress=False)
        streamed, fetched = [], []
        for round_ in range(prof.repeats):
            shutil.rmtree(stream_cache, ignore_errors=True)  # every chunk downloaded again
            loader = streams.open_stream_loader(url, OBJECT_STORE_SPLIT, prof.load_batch, workers,
                                                cache_dir=stream_cache, shuffle=False)
            note(f"stream: one epoch from the object store, round {round_ + 1}")
            streamed.append(_epoch_rate(loader))
            fetched.append(_get_loop(endpoint, f"bench/{OBJECT_STORE_SPLIT}/", streamed[-1]["samples"]))
    shutil.rmtree(stream_cache, ignore_errors=True)
    stream_rate = median([r["samples_per_s"] for r in streamed])
    get_rate = median([r["samples_per_s"] for r in fetched])
    result["object_store"] = {"ratio": stream_rate / get_rate, "stream_samples_per_s": stream_rate,
                              "get_loop_samples_per_s": get_rate, "objects": fetched[0]["objects"],
                              "mb": fetched[0]["mb"], "samples": streamed[0]["samples"], "endpoint": "moto, loopback"}
    return result

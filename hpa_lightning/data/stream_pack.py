"""Packing the streaming store (data/stream_store.py has its layout and its reading):
`python -m hpa_lightning.pack root=DIR size=S out=URL` builds or reuses the memmap store first, so its policies (bad
samples, duplicates, the split and its statistics) are the memmap store's and every sample's bytes are its row's;
then `litdata.optimize` writes each split's rows, in parallel over processes and, with `DATA_OPTIMIZER_NUM_NODES` /
`DATA_OPTIMIZER_NODE_RANK` (litdata's own multi-machine mechanism: each machine a share, the last one merges the
index), over machines. Chunks hold at most CHUNK_BYTES.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np

from hpa_lightning.data.split import SPLIT_NAMES, Split
from hpa_lightning.data.store import PackedStore
from hpa_lightning.data.stream_store import MARKER, STREAM_FORMAT, StoreObjects, allow_http, storage_options_for
from hpa_lightning.errors import ConfigError, DataError
from hpa_lightning.files import write_json_atomic

# At most 64 MB per chunk: 16 samples of 4 x 1024 x 1024 (4 MiB each), 64 at 512 px, 16384 at 32 px. A chunk is the
# unit litdata downloads, caches and evicts, and what each DDP rank / worker is handed: tens of MB amortise a GET's
# latency (object stores serve ~50-100 MB/s per connection after ~10-50 ms to the first byte), keep a worker's
# read-ahead (a few chunks) and the cache's eviction granularity small beside `data.max_cache_size`, and give a
# 30,000-sample set at 512 px ~500 chunks, enough for every rank and worker to get many (the share is by chunks).
CHUNK_BYTES = 64 * 2**20


def _stream_files(store: PackedStore, split: Split) -> list[str]:
    """The packed store's small files a streaming store carries (everything but images.npy)."""
    names = [name for name in ("meta.json", "index.csv", "labels.npy", "duplicates.csv", "skipped.csv")
             if (store.path / name).is_file()]
    return names + [f"splits/{split.path.name}/{name}" for name in ("split.csv", "stats.json")]


def _write_split_rows(args: tuple) -> dict:
    """litdata's per-sample function: one store row as the sample (module-level, so worker processes import it)."""
    store_path, row, target = args[0], args[1], args[2]
    import torch

    images = _mapped(store_path)
    return {"image": torch.from_numpy(np.array(images[row])), "target": torch.from_numpy(np.asarray(target)),
            "index": int(row)}


_MAPS: dict[str, np.ndarray] = {}


def _mapped(store_path: str) -> np.ndarray:
    if store_path not in _MAPS:
        _MAPS[store_path] = np.load(Path(store_path) / "images.npy", mmap_mode="r")
    return _MAPS[store_path]


OPTIMIZER_CACHE_VARIABLES = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")


@contextlib.contextmanager
def private_optimizer_cache() -> Iterator[Path]:
    """litdata's `optimize` stages chunks bound for object storage in one fixed folder per machine (`/tmp/chunks`,
    `/tmp/data`) and clears it: two packs on one machine at once (two users, two jobs) would delete each other's
    chunks. Each pack gets its own staging folders (inherited by the forked workers), removed after; a folder the user
    set through those variables is kept."""
    with tempfile.TemporaryDirectory(prefix="hpa-pack-") as tmp:
        staging = {name: str(Path(tmp) / sub) for name, sub in zip(OPTIMIZER_CACHE_VARIABLES, ("chunks", "data"),
                                                                    strict=True) if not os.environ.get(name)}
        with mock.patch.dict(os.environ, staging):
            yield Path(tmp)


def pack_stream(store: PackedStore, split: Split, out: str, workers: int | None = None,
                storage_options: dict | None = None, progress: bool = True) -> str:
    """Write `store`'s samples as one litdata dataset per split under `out` (a folder or s3://bucket/prefix), its
    metadata beside them, and the marker last; returns `out`. An `out` holding this very store (same fingerprint and
    split) is left as it is; one holding another is refused. Several machines: set `DATA_OPTIMIZER_NUM_NODES` and
    `DATA_OPTIMIZER_NODE_RANK` (or run under SLURM's srun, which sets them from SLURM_NNODES / SLURM_NODEID); each
    writes its share, the last one merges and writes the metadata."""
    import litdata

    from hpa_lightning.machine import available_cpus

    options = storage_options_for(storage_options)
    objects = StoreObjects(out, options, key="out")
    meta = json.loads((store.path / "meta.json").read_text())
    existing = objects.read(MARKER)
    if existing is not None:
        marker = json.loads(existing)
        if marker.get("fingerprint") == meta["fingerprint"] and marker.get("split") == split.path.name and \
                marker.get("image_size") == store.image_size:
            return objects.url
        raise DataError(f"out={objects.url}: holds another streaming store ({marker.get('image_size')}px, split "
                        f"{marker.get('split')}); choose another prefix or delete it")
    nodes = int(os.environ.get("DATA_OPTIMIZER_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    rank = int(os.environ.get("DATA_OPTIMIZER_NODE_RANK") or os.environ.get("SLURM_NODEID") or 0)
    if nodes > 1:
        _check_machines(objects, rank, workers)
    if not objects.remote:
        Path(objects.url).mkdir(parents=True, exist_ok=True)
    allow_http()
    counts = {}
    machine = {"DATA_OPTIMIZER_NUM_NODES": str(nodes), "DATA_OPTIMIZER_NODE_RANK": str(rank)}  # litdata's names
    with private_optimizer_cache(), mock.patch.dict(os.environ, machine):
        for name in SPLIT_NAMES:
            rows = split.indices(name)
            counts[name] = len(rows)
            inputs = [(str(store.path), int(row), store.labels[row]) for row in rows]
            # fork: workers inherit allow_http and need no re-import of torch; store order kept (keep_data_ordered,
            # no reordering), so a stream read without shuffling yields the split's rows as the memmap store holds.
            # Several machines: litdata deals the inputs by (machine, worker), so every machine must run as many
            # workers (pass the same workers=); and each must only add its share, since "overwrite" empties the
            # prefix, peers' finished shares included, when a machine starts
            litdata.optimize(_write_split_rows, inputs, output_dir=f"{objects.url}/{name}", chunk_bytes=CHUNK_BYTES,
                             num_workers=max(1, min(workers or available_cpus(), max(1, len(rows) // nodes))),
                             keep_data_ordered=True, reorder_files=False, mode="append" if nodes > 1 else "overwrite",
                             start_method="fork", storage_options=options, verbose=progress)
    if rank != nodes - 1:
        return objects.url  # the last machine merges the index and writes the metadata once every share is in
    for name in SPLIT_NAMES:
        _check_merged_count(objects, name, counts[name])
    files = _stream_files(store, split)
    for name in files:
        objects.write(name, store.path / name)
    marker_path = store.path / f".{MARKER}.tmp-{os.getpid()}"
    write_json_atomic(marker_path, {"format": STREAM_FORMAT, "fingerprint": meta["fingerprint"],
                                    "image_size": store.image_size, "split": split.path.name, "counts": counts,
                                    "classes": meta.get("classes"), "files": files, "chunk_bytes": CHUNK_BYTES})
    try:
        objects.write(MARKER, marker_path)
    finally:
        marker_path.unlink(missing_ok=True)
    return objects.url


def _check_machines(objects: StoreObjects, rank: int, workers: int | None) -> None:
    """What packing on several machines needs, said in one line before anything is written:
    - object storage: litdata's last machine waits for the others' share indexes only there (into a folder it merges
      what is there when it finishes, and each machine's merge clears the folder's worker indexes);
    - `workers=N`, the same on every machine: litdata deals the samples and names the chunks by machine x workers +
      worker, so machines with other core counts would skip samples or overwrite each other's chunks;
    - no leftover of an interrupted pack: this machine's own share index (no peer writes it) or a split's merged
      index (merged only once every machine has started) would be taken for this pack's."""
    if not objects.remote:
        raise ConfigError(f"out={objects.url}: packing on several machines (DATA_OPTIMIZER_NUM_NODES) needs object "
                          f"storage (s3://bucket/prefix), where litdata merges the machines' shares")
    if not workers:
        raise ConfigError("workers: packing on several machines needs workers=N, the same on every machine (litdata "
                          "deals the samples by machine and worker)")
    for name in SPLIT_NAMES:
        present = objects.names(name)
        for leftover in (f"{rank}-index.json", "index.json"):
            if leftover in present:
                raise DataError(f"out={objects.url}: holds an interrupted pack ({name}/{leftover}, no {MARKER}); "
                                f"delete the prefix and pack again")


def _check_merged_count(objects: StoreObjects, name: str, expected: int) -> None:
    """The merged index of split `name` holds exactly its rows: shares from another pack (a leftover index of a peer)
    or a missing share stop the pack before the marker, so no reader trusts it."""
    raw = objects.read(f"{name}/index.json")
    chunks = json.loads(raw)["chunks"] if raw else []
    counted = sum(int(chunk.get("chunk_size", 0)) for chunk in chunks)
    if counted != expected:
        raise DataError(f"out={objects.url}: the merged {name}/index.json holds {counted} samples, the split "
                        f"{expected}; another pack's shares were in the prefix? delete it and pack again")
    names = [chunk.get("filename") for chunk in chunks]
    if len(set(names)) != len(names):  # two machines wrote one chunk name: one overwrote the other's samples
        raise DataError(f"out={objects.url}: the merged {name}/index.json lists a chunk twice; pack with the same "
                        f"workers= on every machine")

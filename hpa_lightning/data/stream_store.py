"""The streaming store: the packed store's samples as litdata chunks in a local folder or S3-compatible object storage,
streamed to every node (`data.store=s3://bucket/prefix`), for data beyond one machine's disk.

Layout of a streaming store (the packed store's own small files beside one litdata dataset per split):
    train/ val/ test/          litdata chunks (`litdata.optimize`): each sample {"image": uint8 tensor (4, S, S),
                               "target": uint8 tensor (C,), "index": its row in the packed store}, in store order
    meta.json index.csv labels.npy [duplicates.csv skipped.csv]   the packed store's (data/store.py)
    splits/<key>/split.csv stats.json                             the split it was packed with, train-only statistics
    hpa_stream.json            written last: the files above, the split key, the sample counts. A prefix without it
                               (a pack still running or interrupted) is refused on read.

Packing (`python -m hpa_lightning.pack ... out=URL`) is data/stream_pack.py's.

Reading (`open_stream`, `stream_loader`): the small files are fetched once into a local folder and opened as a
`PackedStore` and `Split` without images (so ids, labels, class set, statistics and split come from the one reader);
the samples come from `litdata.StreamingDataset` + `StreamingDataLoader` (DDP shares, workers, resumable state, a
bounded chunk cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from hpa_lightning.data.split import Split, load_split
from hpa_lightning.data.store import PackedStore
from hpa_lightning.errors import ConfigError, DataError
from hpa_lightning.files import atomic_folder, remove_stale_temporaries

MARKER = "hpa_stream.json"
STREAM_FORMAT = 1
REMOTE_SCHEMES = ("s3",)


def is_remote(url: str) -> bool:
    return urlparse(str(url)).scheme in REMOTE_SCHEMES


def storage_options_for(options: object = None) -> dict:
    """`data.storage_options` as litdata and boto3 take them (client keywords: endpoint_url, region_name,
    aws_access_key_id, ...); the endpoint defaults to `AWS_ENDPOINT_URL`, which boto3 also reads itself."""
    if options is not None and not isinstance(options, dict):
        from omegaconf import OmegaConf

        options = OmegaConf.to_container(options) if OmegaConf.is_config(options) else dict(options)
    options = dict(options or {})
    if not options.get("endpoint_url") and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return options


def allow_http() -> None:
    """Let litdata's obstore client talk to plain http:// endpoints (an on-premises MinIO, a loopback test server).

    litdata 0.2.76 builds its obstore S3Store with fixed client options and no `allow_http`, so an http endpoint fails
    with "builder error" (BadScheme); https endpoints are unaffected by the option. Set in this process before any
    worker is started (DataLoader workers and `optimize(start_method="fork")` inherit it)."""
    try:
        from litdata.streaming import downloader
    except ImportError:
        return
    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options["allow_http"] = "true"


class StoreObjects:
    """The store's small files at `url` (a folder or s3://bucket/prefix): read, written, listed."""

    def __init__(self, url: str, storage_options: dict, key: str = "data.store"):
        self.url, self.key = str(url).rstrip("/"), key
        self.remote = is_remote(self.url)
        self.endpoint = storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        if self.remote:
            import boto3
            from botocore.config import Config

            parsed = urlparse(self.url)
            self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
            # few retries and short timeouts: an unreachable endpoint is one line within seconds, not litdata's
            # 1000 adaptive retries
            config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
            self.client = boto3.client("s3", config=config, **storage_options)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _fail(self, err: Exception, what: str) -> DataError:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return DataError(f"{self.key}={self.url}: not a complete streaming store (no {what}; a pack still "
                                 f"running or interrupted? pack it with python -m hpa_lightning.pack out=...)")
            if code == "NoSuchBucket":
                return DataError(f"{self.key}={self.url}: bucket {self.bucket} does not exist at {self.endpoint}")
            return DataError(f"{self.key}={self.url}: {code or 'error'} reading {what} from {self.endpoint}: "
                             f"{err.response.get('Error', {}).get('Message', err)}")
        if isinstance(err, BotoCoreError):
            return DataError(f"{self.key}={self.url}: endpoint {self.endpoint} unreachable ({err}); set "
                             f"AWS_ENDPOINT_URL or data.storage_options.endpoint_url")
        raise err

    def read(self, name: str) -> bytes | None:
        if not self.remote:
            path = Path(self.url) / name
            return path.read_bytes() if path.is_file() else None
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except (BotoCoreError, ClientError) as err:
            failure = self._fail(err, name)
            if "not a complete" in str(failure):
                return None
            raise failure from None

    def names(self, folder: str) -> list[str]:
        """The names of the objects (files) directly under `folder`."""
        if not self.remote:
            path = Path(self.url) / folder
            return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = self._key(folder).rstrip("/") + "/"
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                          Delimiter="/")
            return sorted(item["Key"][len(prefix):] for page in pages for item in page.get("Contents", []))
        except (BotoCoreError, ClientError) as err:
            raise self._fail(err, folder) from None

    def write(self, name: str, local: Path) -> None:
        if not self.remote:
            target = Path(self.url) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target.with_name(target.name + ".tmp"))
            os.replace(target.with_name(target.name + ".tmp"), target)
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_file(str(local), self.bucket, self._key(name))
        except (BotoCoreError, ClientError) as err:
            raise self._fail(err, name) from None


@dataclass(frozen=True)
class StreamStore:
    """An opened streaming store: its URL, the packed store's metadata (no images) and its split."""

    url: str
    store: PackedStore
    split: Split
    storage_options: dict
    cache_dir: Path  # where litdata caches chunks, one folder per split

    def split_key(self) -> str:
        return self.split.path.name


def open_stream(url: str, cache_dir: str | Path, storage_options: object = None) -> StreamStore:
    """Fetch (once) the streaming store's metadata at `url` into `cache_dir` and open it; one line naming
    `data.store` when the prefix is incomplete, the bucket missing or the endpoint unreachable."""
    options = storage_options_for(storage_options)
    url = str(url).rstrip("/")
    if not is_remote(url):
        if "://" in url:
            raise ConfigError(f"data.store={url}: expected a local folder or s3://bucket/prefix")
        if not Path(url).is_dir():
            raise DataError(f"data.store={url}: folder not found")
    objects = StoreObjects(url, options)
    raw = objects.read(MARKER)
    if raw is None:
        raise DataError(f"data.store={url}: not a complete streaming store (no {MARKER}; a pack still running or "
                        f"interrupted? pack it with python -m hpa_lightning.pack out=...)")
    marker = json.loads(raw)
    if marker.get("format") != STREAM_FORMAT:
        raise DataError(f"data.store={url}: streaming store format {marker.get('format')} != {STREAM_FORMAT}; pack "
                        f"it anew")
    # the endpoint is part of the key: the same bucket and prefix on two servers are two stores, and litdata clears
    # versions of a dataset it does not know from its cache folder (two test workers, each with its own server)
    endpoint = str(options.get("endpoint_url") or "") if is_remote(url) else ""
    key = f"{endpoint}\0{url}\0{raw!r}"
    local_root = Path(cache_dir) / "streaming" / hashlib.sha256(key.encode()).hexdigest()[:16]
    meta_dir = local_root / "meta"
    if not (meta_dir / MARKER).is_file():
        meta_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(meta_dir)
        with atomic_folder(meta_dir, marker=MARKER) as tmp:
            for name in marker["files"]:
                data = objects.read(name)
                if data is None:
                    raise DataError(f"data.store={url}: {name} listed in {MARKER} is missing")
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            (tmp / MARKER).write_bytes(raw)
    store = PackedStore.open(meta_dir)
    split = load_split(meta_dir / "splits" / marker["split"], store)
    return StreamStore(url=url, store=store, split=split, storage_options=options, cache_dir=local_root / "chunks")


def stream_dataset(stream: StreamStore, name: str, shuffle: bool = False, drop_last: bool = False, seed: int = 42,
                   max_cache_size: int | str = "50GB", eval_batch_size: int | None = None, workers: int = 0):
    """The litdata StreamingDataset of split `name`; `.indices` holds its store rows (store order). Under DDP each rank
    reads its share (litdata's: disjoint, together the whole split, unless `drop_last` leaves the remainder out).

    Evaluation (`eval_batch_size` given, the loader's batch size and `workers` its worker processes, 0 for reading in
    this process): the ranks' shares may differ in size, which evaluation allows (the outputs are gathered by row,
    models/epoch_metrics.py; Lightning's epoch mean of the loss weighs each rank by its samples). A split too small for
    every rank to get a batch at that size (litdata deals it in whole batches) is read whole by every rank instead and
    de-duplicated by row: a rank without a batch would skip the evaluation the others wait in."""
    from litdata import StreamingDataset

    allow_http()
    cache = stream.cache_dir / name
    cache.mkdir(parents=True, exist_ok=True)
    source = f"{stream.url}/{name}" if is_remote(stream.url) else str(Path(stream.url).resolve() / name)
    kwargs = {"cache_dir": str(cache), "max_cache_size": max_cache_size} if is_remote(stream.url) else {}
    dataset = StreamingDataset(source, shuffle=shuffle, drop_last=drop_last, seed=seed,
                               storage_options=stream.storage_options, **kwargs)
    if eval_batch_size is not None and min(samples_per_rank(dataset, eval_batch_size, workers)) == 0:
        from litdata.utilities.env import _DistributedEnv

        dataset.distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
    dataset.indices = stream.split.indices(name)
    return dataset


def samples_per_rank(dataset, batch_size: int, workers: int = 0) -> list[int]:
    """How many samples of `dataset` (a StreamingDataset) each DDP rank reads per epoch, as litdata deals them for this
    batch size and number of worker processes (0: read in the training process, which litdata counts as one)."""
    from litdata.utilities.env import _DistributedEnv

    env = dataset.distributed_env
    dataset.get_len(max(1, workers), batch_size)  # builds litdata's shuffler, which deals the samples
    return [dataset.shuffler.get_len(_DistributedEnv(env.world_size, rank, env.num_nodes), max(1, workers), batch_size,
                                     dataset.current_epoch) for rank in range(env.world_size)]


def collate_stream(samples: list[dict]) -> dict:
    """Stream samples to the memmap loader's batch: image uint8 (B, 4, S, S), target float32 (B, C), index int64.
    In a worker process the stack lands in shared memory (default_collate's way), the batch's hand-over."""
    import torch

    return {"image": torch.stack([s["image"] for s in samples]),
            "target": torch.stack([s["target"] for s in samples]).float(),
            "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64)}


class InProcessCollate:
    """`collate_stream` for a loader read in this process (data.worker_type=thread): the images are copied from
    litdata's views of the chunk (a memory map of a local or cached chunk) into a recycled batch buffer, or a pinned
    one (torch's copy runs on its intra-op threads).

    Why: a 512 px batch is 32 MB; stacking into fresh memory pays a page fault per 4 kB and ran at ~1 GB/s here, against
    ~12 GB/s into memory touched before (the memmap loader's BatchBuffers); a worker process adds a shared-memory
    segment and a hand-over per batch on top, and starting workers takes seconds per epoch."""

    def __init__(self, pin_memory: bool = False):
        self.pin_memory = pin_memory
        self._buffers = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_buffers": None}

    def _batch(self, shape: tuple[int, ...]):
        import torch

        from hpa_lightning.data.loader import BatchBuffers

        if self.pin_memory:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        if self._buffers is None:
            self._buffers = BatchBuffers()
        return self._buffers.take(shape)

    def __call__(self, samples: list[dict]) -> dict:
        import torch

        images = [s["image"] for s in samples]
        batch = torch.stack(images, out=self._batch((len(images), *images[0].shape)))
        return {"image": batch, "target": torch.stack([s["target"] for s in samples]).float(),
                "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64)}


def stream_loader(dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                  persistent_workers: bool = False, worker_type: str = "process"):
    """A StreamingDataLoader over `dataset` yielding the memmap loader's batches (`state_dict` resumes mid-epoch).

    `worker_type="thread"` (the data config's default) reads in this process: litdata's own threads prefetch (and
    for object storage download) chunks, and each batch is copied out of the mapped chunks into a recycled buffer
    (InProcessCollate); `num_workers` is then unused. `"process"` starts `num_workers` DataLoader worker processes,
    each reading its share of the chunks (a sample here is bytes to copy, not to decode, so processes only add
    hand-overs: measured in docs/performance.md)."""
    from litdata import StreamingDataLoader

    if worker_type == "thread":
        return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=0,
                                   collate_fn=InProcessCollate(pin_memory))
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_stream,
                               pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0)


def open_stream_loader(url: str, split: str = "train", batch_size: int = 32, num_workers: int = 2,
                       cache_dir: str | Path = ".cache/stores", storage_options: object = None, shuffle: bool = True,
                       max_cache_size: int | str = "50GB", worker_type: str = "thread"):
    """One call for a benchmark or a notebook: the StreamingDataLoader of split `split` of the streaming store at `url`
    (its batches are what training reads: dicts of image, target, index)."""
    stream = open_stream(url, cache_dir, storage_options)
    dataset = stream_dataset(stream, split, shuffle=shuffle, drop_last=False, max_cache_size=max_cache_size)
    return stream_loader(dataset, batch_size, num_workers, worker_type=worker_type)

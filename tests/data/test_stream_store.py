"""The streaming store (data/stream_store.py) against the memmap store it is packed from, in a local folder and in a
real S3-compatible server on loopback (moto, plain http): lossless, resumable, and bad input as one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpa_lightning.data.datamodule import HPADataModule
from hpa_lightning.data.split import prepare_split
from hpa_lightning.data.store import build_store
from hpa_lightning.data.stream_pack import pack_stream
from hpa_lightning.data.stream_store import MARKER, open_stream, stream_dataset, stream_loader
from hpa_lightning.errors import ConfigError, DataError
from tests.conftest import write_kaggle_folder
from tests.data.s3_server import s3_server  # noqa: F401 - the fixture

SIZE = 16
# every test here needs the loopback S3 server and packs with worker processes: `make test-s3` (CI), beside make test
pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, s3_server):  # noqa: F811
    """One memmap store (40 samples, 16 px), packed to a local streaming folder and to the loopback object store."""
    base = tmp_path_factory.mktemp("stream")
    targets = {f"id{i:03d}": " ".join(str(c) for c in {i % 28, (i * 7) % 28}) for i in range(40)}
    root = write_kaggle_folder(base / "kaggle", targets, size=SIZE)
    store = build_store(root, SIZE, base / "stores", workers=1)
    split = prepare_split(store)
    local = pack_stream(store, split, str(base / "local"), workers=2, progress=False)
    remote = pack_stream(store, split, s3_server.url("packed"), workers=2, progress=False)
    return {"store": store, "split": split, "local": local, "remote": remote, "cache": base / "cache", "root": root,
            "stores": base / "stores"}


def digests(url: str, cache: Path, worker_type: str = "process") -> dict[int, tuple[str, tuple[int, ...], str]]:
    """Row -> (sha256 of the sample's bytes, its label ids, its split), read through the streaming loader (one worker
    process, or in this process). Every batch is kept until the split is read: a batch buffer recycled while its batch
    is still held would show as wrong bytes."""
    stream = open_stream(url, cache)
    out = {}
    for name in ("train", "val", "test"):
        workers = 1 if worker_type == "process" else 0
        batches = list(stream_loader(stream_dataset(stream, name), batch_size=7, num_workers=workers,
                                     worker_type=worker_type))
        for batch in batches:
            for image, target, row in zip(batch["image"], batch["target"], batch["index"].tolist(), strict=True):
                assert image.dtype == torch.uint8 and image.shape == (4, SIZE, SIZE)
                assert row not in out
                out[row] = (hashlib.sha256(image.numpy().tobytes()).hexdigest(),
                            tuple(np.flatnonzero(target.numpy()).tolist()), name)
    return out


def memmap_digests(packed) -> dict[int, tuple[str, tuple[int, ...], str]]:
    """`digests` of the memmap store the streams were packed from."""
    store, split = packed["store"], packed["split"]
    images = store.images()
    return {row: (hashlib.sha256(np.ascontiguousarray(images[row]).tobytes()).hexdigest(),
                  tuple(np.flatnonzero(store.labels[row]).tolist()), str(split.assignment[row]))
            for row in range(len(store))}


def test_every_sample_label_and_split_equal_across_memmap_local_folder_and_object_store(packed) -> None:
    store, split = packed["store"], packed["split"]
    expected = memmap_digests(packed)
    assert digests(packed["local"], packed["cache"]) == expected
    assert digests(packed["remote"], packed["cache"]) == expected
    assert digests(packed["local"], packed["cache"], worker_type="thread") == expected
    assert digests(packed["remote"], packed["cache"], worker_type="thread") == expected
    stream = open_stream(packed["remote"], packed["cache"])  # ids, statistics and split key are the store's
    assert stream.store.ids == store.ids and stream.split.mean == split.mean and stream.split.std == split.std
    assert stream.split_key() == split.path.name


def test_the_benchmarks_chunk_copy_reads_every_training_image_byte_for_byte(packed) -> None:
    """Bench section 10's reader without litdata (the chunk format's ceiling) must copy the very samples litdata
    serves, or its row compares other work: every training image once, equal to the memmap store's."""
    from hpa_lightning.bench.stream_speed import _copy_chunk, _image_offset

    class KeepEveryBatch:
        def __init__(self) -> None:
            self.batches: list[torch.Tensor] = []

        def take(self, shape: tuple[int, ...]) -> torch.Tensor:
            self.batches.append(torch.empty(shape, dtype=torch.uint8))
            return self.batches[-1]

    offset, chunks = _image_offset(Path(packed["local"]) / "train")
    kept = KeepEveryBatch()
    copied = sum(_copy_chunk(chunk, offset, 4 * SIZE * SIZE, 3, kept, seed) for seed, chunk in enumerate(chunks))
    got = sorted(hashlib.sha256(row.numpy().tobytes()).hexdigest() for batch in kept.batches for row in batch)
    expected = sorted(digest for digest, _, name in memmap_digests(packed).values() if name == "train")
    assert copied == len(expected) and got == expected


def test_packing_again_keeps_the_store_and_another_store_is_refused(packed, tmp_path: Path) -> None:
    assert pack_stream(packed["store"], packed["split"], packed["remote"], progress=False) == packed["remote"]
    other = build_store(write_kaggle_folder(tmp_path / "k", {"a": "1", "b": "2", "c": "3", "d": "0"}, size=SIZE), 8,
                        tmp_path / "stores", workers=1)
    with pytest.raises(DataError, match=r"^out=s3://hpa-test/packed: holds another streaming store"):
        pack_stream(other, prepare_split(other, 0.25, 0.25), packed["remote"], progress=False)


def test_stream_resumes_after_any_batch(packed) -> None:
    """StreamingDataLoader's own state: stopped after 2 batches and restored into a fresh loader, it delivers the rest
    of the epoch the uninterrupted loader delivered."""
    stream = open_stream(packed["local"], packed["cache"])

    def loader():
        return stream_loader(stream_dataset(stream, "train", shuffle=True, drop_last=True, seed=3), batch_size=4)

    straight = [b["index"].tolist() for b in loader()]
    interrupted, seen = loader(), []
    for batch in interrupted:
        seen.append(batch["index"].tolist())
        if len(seen) == 2:
            break
    state = interrupted.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert seen + [b["index"].tolist() for b in resumed] == straight


def test_an_incomplete_prefix_is_one_line(packed, s3_server) -> None:  # noqa: F811
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    for obj in client.list_objects_v2(Bucket=s3_server.bucket, Prefix="packed/")["Contents"]:
        if not obj["Key"].endswith(MARKER):
            client.copy_object(Bucket=s3_server.bucket, Key=obj["Key"].replace("packed/", "partial/", 1),
                               CopySource={"Bucket": s3_server.bucket, "Key": obj["Key"]})
    with pytest.raises(DataError, match=rf"^data.store=s3://hpa-test/partial: not a complete streaming store \(no "
                                        rf"{MARKER}"):
        open_stream(s3_server.url("partial"), packed["cache"])
    with pytest.raises(DataError, match=r"^data.store=s3://no-such-bucket/x: bucket no-such-bucket does not exist"):
        open_stream("s3://no-such-bucket/x", packed["cache"])


def test_an_unreachable_endpoint_is_one_line(packed) -> None:
    with pytest.raises(DataError, match=r"^data.store=s3://hpa-test/packed: endpoint http://127.0.0.1:9 unreachable"):
        open_stream(packed["remote"], packed["cache"], {"endpoint_url": "http://127.0.0.1:9"})


def test_what_a_stream_cannot_do_is_one_line_naming_the_key(packed) -> None:
    common = {"root": None, "store": packed["remote"], "cache_dir": str(packed["cache"])}
    with pytest.raises(ConfigError, match=r"^data.oversample=true: "):
        HPADataModule(**common, oversample=True)
    with pytest.raises(ConfigError, match=r"^data.max_samples=10: "):
        HPADataModule(**common, max_samples=10)
    with pytest.raises(ConfigError, match=r"^data.split.folds=5: "):
        HPADataModule(**common, split={"folds": 5})
    with pytest.raises(ConfigError, match=rf"^data.image_size=32: data.store=s3://hpa-test/packed holds {SIZE}px"):
        HPADataModule(**common, image_size=32).prepare_data()
    with pytest.raises(ConfigError, match=r"^data.split: data.store=s3://hpa-test/packed was packed with the split "):
        HPADataModule(**common, image_size=SIZE, split={"seed": 1}).prepare_data()
    with pytest.raises(DataError, match=r"^data.store=/no/such/folder: folder not found"):
        HPADataModule(**{**common, "store": "/no/such/folder"}, image_size=SIZE).prepare_data()


def rows_read_by_each_rank(packed, monkeypatch: pytest.MonkeyPatch, name: str, batch_size: int,
                           workers: int) -> list[list[int]]:
    """The store rows each of two DDP ranks reads of split `name` as an evaluation (litdata takes the ranks from
    `_DistributedEnv.detect`, here each rank's in turn), with every batch's size checked."""
    from litdata.utilities.env import _DistributedEnv

    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(_DistributedEnv, "detect", classmethod(lambda cls, rank=rank: _DistributedEnv(2, rank, 1)))
        stream = open_stream(packed["local"], packed["cache"])
        loader = stream_loader(stream_dataset(stream, name, eval_batch_size=batch_size, workers=workers), batch_size,
                               num_workers=workers, worker_type="process" if workers else "thread")
        batches = [batch["index"].tolist() for batch in loader]
        assert all(0 < len(rows) <= batch_size for rows in batches)
        shares.append([row for rows in batches for row in rows])
    return shares


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 0), (4, 0), (7, 0), (16, 0), (40, 0), (3, 2), (40, 2)])
def test_evaluation_under_ddp_reads_each_sample_on_one_rank_and_never_leaves_a_rank_without_a_batch(
        packed, monkeypatch: pytest.MonkeyPatch, batch_size: int, workers: int) -> None:
    """Each rank reads its share (disjoint, together the split) when litdata's dealing gives every rank a batch at
    this size, else the whole split (then de-duplicated by row): never a rank without a batch, which would skip the
    evaluation the other rank waits in."""
    split = sorted(packed["split"].indices("train").tolist())  # the largest split of the 40 samples: 32
    shares = rows_read_by_each_rank(packed, monkeypatch, "train", batch_size, workers)
    assert all(shares), f"a rank without a batch: {[len(share) for share in shares]}"
    whole = [sorted(share) == split for share in shares]
    if not all(whole):
        assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == split
    if batch_size <= 4:  # small batches: the work is shared
        assert not any(whole) and max(len(share) for share in shares) <= len(split) // 2 + batch_size
    if batch_size >= len(split):  # one batch holds the split: only one rank could get it
        assert all(whole)


def test_datamodule_batches_have_the_memmap_loaders_format(packed) -> None:
    kwargs = {"root": None, "cache_dir": str(packed["cache"]), "image_size": SIZE, "batch_size": 8, "num_workers": 0}
    module = HPADataModule(store=packed["remote"], **kwargs)
    module.prepare_data()
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert {k: (v.dtype, v.shape[1:]) for k, v in batch.items()} == {
        "image": (torch.uint8, (4, SIZE, SIZE)), "target": (torch.float32, (28,)), "index": (torch.int64, ())}
    assert module.split_counts() == {n: len(packed["split"].indices(n)) for n in ("train", "val", "test")}
    assert module.ids(batch["index"].numpy()) == [packed["store"].ids[r] for r in batch["index"].tolist()]
    assert module.stats == (packed["split"].mean, packed["split"].std)


def test_two_packs_at_once_on_one_machine_stage_their_chunks_apart(packed, s3_server, tmp_path: Path,  # noqa: F811
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """litdata stages chunks bound for object storage in one folder per machine (/tmp/chunks) and clears it; two
    packs at once (two jobs, or two test workers) deleted each other's chunks. Two packs to S3 in two processes at the
    same time both complete and are lossless."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    env = s3_server.env()
    targets = [s3_server.url(f"twice{i}") for i in range(2)]
    processes = [context.Process(target=_pack_in_child, args=(str(packed["store"].path), url, env)) for url in targets]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0
    expected = digests(packed["local"], tmp_path / "local")
    for i, url in enumerate(targets):
        assert digests(url, tmp_path / f"cache{i}") == expected
    monkeypatch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(tmp_path / "mine"))  # the user's own staging folder is kept
    from hpa_lightning.data.stream_pack import private_optimizer_cache

    with private_optimizer_cache() as staging:
        import os

        assert os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] == str(tmp_path / "mine")
        assert os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] == str(staging / "data")
    assert not staging.exists()


def _pack_in_child(store_path: str, url: str, env: dict[str, str]) -> None:
    import os

    from hpa_lightning.data.store import PackedStore

    os.environ.update(env)
    store = PackedStore.open(store_path)
    pack_stream(store, prepare_split(store), url, workers=2, progress=False)


def test_two_machines_pack_one_store_each_its_share(packed, s3_server, tmp_path: Path) -> None:  # noqa: F811
    """litdata's multi-machine packing, two `pack` processes as two machines (DATA_OPTIMIZER_NUM_NODES=2, each its
    DATA_OPTIMIZER_NODE_RANK) started apart as srun may start them: the last machine (which merges) first, the first
    one only once the last one's share is in the bucket. Every sample arrives once, as the memmap store holds it."""
    import boto3

    url, prefix = s3_server.url("two-machines"), "two-machines/"
    env = {**os.environ, **s3_server.env(), "DATA_OPTIMIZER_NUM_NODES": "2"}
    command = [sys.executable, "-m", "hpa_lightning.pack", f"root={packed['root']}", f"size={SIZE}",
               f"cache_dir={packed['stores']}", "workers=2", f"out={url}"]
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)

    def keys() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
        return [item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])]

    log = tmp_path / "last-machine.log"  # a file, not a pipe: nobody reads it while the machine runs
    with log.open("w") as sink:
        last = subprocess.Popen(command, env={**env, "DATA_OPTIMIZER_NODE_RANK": "1"}, stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "train/1-index.json" not in keys() and last.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "train/1-index.json" in keys(), "the last machine did not put its share up"
        first = subprocess.run(command, env={**env, "DATA_OPTIMIZER_NODE_RANK": "0"}, capture_output=True,
                               text=True, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        last.wait(timeout=120)
    finally:
        last.kill()
    assert last.returncode == 0, log.read_text()[-3000:]
    assert MARKER in keys()
    writers = {int(key.split("/")[1].split("-")[1]) for key in keys() if key.startswith("train/chunk-")}
    assert min(writers) < 2 <= max(writers)  # chunks of machine 0's workers (0, 1) and machine 1's (2, 3)
    assert digests(url, packed["cache"]) == memmap_digests(packed)


def test_what_packing_on_several_machines_needs_is_one_line(packed, s3_server, monkeypatch,  # noqa: F811
                                                             tmp_path: Path) -> None:
    """Object storage, the same workers= everywhere, no leftover of an interrupted pack (this machine's own share index,
    or a split's merged index): each refused in one line before anything is written; and the merge is checked."""
    import boto3

    from hpa_lightning.data.stream_pack import _check_merged_count
    from hpa_lightning.data.stream_store import StoreObjects

    store, split = packed["store"], packed["split"]
    monkeypatch.setenv("DATA_OPTIMIZER_NUM_NODES", "2")
    monkeypatch.setenv("DATA_OPTIMIZER_NODE_RANK", "0")
    with pytest.raises(ConfigError, match=rf"^out={tmp_path / 'folder'}: packing on several machines "):
        pack_stream(store, split, str(tmp_path / "folder"), workers=2, progress=False)
    with pytest.raises(ConfigError, match=r"^workers: packing on several machines needs workers=N"):
        pack_stream(store, split, s3_server.url("no-workers"), progress=False)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    for prefix, leftover in (("own-share", "val/0-index.json"), ("merged", "train/index.json")):
        client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{leftover}", Body=b"{}")
        with pytest.raises(DataError, match=rf"^out=s3://hpa-test/{prefix}: holds an interrupted pack \({leftover}, "
                                            rf"no hpa_stream.json\)"):
            pack_stream(store, split, s3_server.url(prefix), workers=2, progress=False)
        assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/")["Contents"]] \
            == [f"{prefix}/{leftover}"]  # nothing written
    folder = tmp_path / "merged"
    (folder / "train").mkdir(parents=True)
    index = folder / "train" / "index.json"
    index.write_text('{"chunks": [{"chunk_size": 3, "filename": "chunk-0-0.bin"}], "config": {}}')
    with pytest.raises(DataError, match=rf"^out={folder}: the merged train/index.json holds 3 samples, the split 32"):
        _check_merged_count(StoreObjects(str(folder), {}, key="out"), "train", 32)
    index.write_text('{"chunks": [{"chunk_size": 3, "filename": "chunk-2-0.bin"}, {"chunk_size": 3, "filename": '
                     '"chunk-2-0.bin"}], "config": {}}')
    with pytest.raises(DataError, match=rf"^out={folder}: the merged train/index.json lists a chunk twice"):
        _check_merged_count(StoreObjects(str(folder), {}, key="out"), "train", 6)

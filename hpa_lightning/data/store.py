"""The packed store: every sample decoded once into a memory-mapped uint8 array (N, 4, S, S), R,G,B,Y order.

Layout of a store folder (named by source and size, so a new size or a changed train.csv packs anew):
    images.npy   uint8 (N, 4, S, S), opened with mmap_mode="r" by every reader
    index.csv    Id,Target in store order (+ source, duplicate_of when several sources are packed together)
    labels.npy   uint8 (N, 28) multi-hot
    meta.json    sources, fingerprint, image size, counts, decoding and duplicate policies
    duplicates.csv, skipped.csv   copies found across sources; unreadable samples left out
    splits/<key>/split.csv, stats.json   the stratified split and its train-only statistics (hpa_lightning.split)

A store is built under a temporary name and renamed when complete: a folder with the final name is always whole.
The module is long because it holds the packing machinery (parallel decode-and-write workers, compaction of skipped
rows, the fingerprint) that the image store and the cell store (data/cell_store.py: many rows per image) share.

CLI: python -m hpa_lightning.pack root=DIR[,DIR2,...] size=512 [cache_dir=.cache/stores] [image_dir=train]
     [workers=N] [sixteen_bit=divide|percentile] [duplicates=drop|keep|error] [max_image_pixels=268435456]
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from hpa_lightning.classes import CHANNELS, HPA2018, ClassSet
from hpa_lightning.data.duplicates import DUPLICATE_POLICIES, find_duplicates, green_hash
from hpa_lightning.data.sources import (
    DEFAULT_MAX_IMAGE_PIXELS,
    JPEG_DRAFT_OVERSAMPLING,
    SIXTEEN_BIT_RULES,
    DataSource,
    LabelTable,
    check_max_pixels,
    load_sample,
    parse_sources,
    read_sources,
)
from hpa_lightning.errors import DataError
from hpa_lightning.files import atomic_folder, exclusive, remove_stale_temporaries, write_json_atomic
from hpa_lightning.machine import available_cpus

log = logging.getLogger(__name__)


STORE_FORMAT = 1
# How JPG channel files are decoded: since issue 26 a large JPG is decoded at a reduced DCT scale; since issue 36 at the
# scale that keeps at least JPEG_DRAFT_OVERSAMPLING (1) x the store's size (`draft-x1`; before: twice the size,
# `draft-x2`; before issue 26, the full decode, `full`). Part of the fingerprint of sources holding JPGs, and only of
# those: a store of JPGs packed by another decoder is packed anew rather than reused as if its pixels were what this
# code makes (runs compared across the change would otherwise differ for no visible reason), while PNG and TIFF
# stores, whose pixels did not change, stay valid.
JPEG_DECODER = f"draft-x{JPEG_DRAFT_OVERSAMPLING}"
JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class PackedStore:
    path: Path
    ids: list[str]
    labels: np.ndarray
    image_size: int
    # the Id of the earlier copy of the same image (kept duplicates, data.duplicates=keep), "" for the others
    duplicate_of: list[str] | None = None
    # the source image of each row when a row is one of its cells (data/cell_store.py), else None
    image_ids: list[str] | None = None

    @classmethod
    def open(cls, path: str | Path) -> PackedStore:
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{path}: not a complete packed store (no meta.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != STORE_FORMAT:
            raise DataError(f"{meta_path}: store format {meta.get('format')} != {STORE_FORMAT}, delete it to re-pack")
        index = pd.read_csv(path / "index.csv", dtype=str, keep_default_na=False)
        return cls(path=path, ids=index["Id"].tolist(), labels=np.load(path / "labels.npy"),
                   image_size=int(meta["image_size"]),
                   duplicate_of=index["duplicate_of"].tolist() if "duplicate_of" in index else None,
                   image_ids=index["image_id"].tolist() if "image_id" in index else None)

    def groups(self) -> np.ndarray:
        """A group number per row: copies of one image share theirs, and so do the cells of one image, so a split keeps
        them together."""
        if self.image_ids is not None:
            return np.unique(self.image_ids, return_inverse=True)[1]
        row = {sample_id: i for i, sample_id in enumerate(self.ids)}
        groups = np.arange(len(self.ids))
        for i, original in enumerate(self.duplicate_of or []):
            if original:
                groups[i] = groups[row[original]]
        return groups

    def images(self) -> np.ndarray:
        return np.load(self.path / "images.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.ids)


def source_fingerprint(csv_path: Path, image_dir: Path) -> str:
    """What the store is a function of: train.csv's bytes, the image folder's path, and the name, size and
    modification time of every file in that folder (a stat each, about a second for the 124288 Kaggle files), so
    that a replaced, added or removed channel file packs a new store instead of reusing old pixels; for a folder
    holding JPGs, also how they are decoded (JPEG_DECODER)."""
    digest = hashlib.sha256()
    digest.update(str(image_dir.resolve()).encode())
    digest.update(csv_path.read_bytes())
    if any(name.lower().endswith(JPEG_SUFFIXES) for name in hash_folder(digest, image_dir)):
        digest.update(f"jpeg decoder {JPEG_DECODER}\n".encode())
    return digest.hexdigest()


def hash_folder(digest, folder: Path) -> list[str]:
    """Add the name, size and modification time of every file in `folder` (if it exists) to `digest`; their names."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        files = sorted((entry.name, entry.stat()) for entry in entries if entry.is_file())
    for name, stat in files:
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return [name for name, _ in files]


def check_free_space(folder: Path, samples: int, size: int) -> None:
    """Refuse before decoding anything when the store cannot fit: it is written sparse, so a full disk would
    otherwise surface hours later as a traceback from a worker."""
    needed = samples * len(CHANNELS) * size * size + 2**20
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataError(f"{folder}: packing {samples} samples at {size}px needs {needed / 2**30:.2f} GiB, only "
                        f"{free / 2**30:.2f} GiB free there; free space or set data.cache_dir (pack: cache_dir=)")


def sources_fingerprint(sources: list[DataSource]) -> str:
    if len(sources) == 1:  # as before several sources existed, so existing stores stay valid
        return source_fingerprint(sources[0].csv, sources[0].image_dir)
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source_fingerprint(source.csv, source.image_dir).encode())
    return digest.hexdigest()


def store_path(root: object, size: int, cache_dir: str | Path, image_dir: str = "train",
               on_bad_sample: str = "error", fingerprint: str | None = None, sixteen_bit: str = "divide",
               duplicates: str = "drop", classes: ClassSet = HPA2018,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Path:
    sources = parse_sources(root, image_dir)
    fingerprint = fingerprint or sources_fingerprint(sources)
    # a store that skipped bad samples holds fewer rows: never reuse it for a strict run, or the other way round
    policy = "-skipbad" if on_bad_sample == "skip" else ""
    policy += "" if sixteen_bit == "divide" else f"-16bit{sixteen_bit}"  # another 8-bit mapping, other pixels
    policy += classes.store_tag  # other label columns
    if on_bad_sample == "skip" and max_image_pixels != DEFAULT_MAX_IMAGE_PIXELS:
        policy += f"-maxpx{max_image_pixels}"  # another bound skips other samples (a strict run stops instead)
    name = sources[0].name
    if len(sources) > 1:
        name += f"+{len(sources) - 1}"
        policy += "" if duplicates == "drop" else f"-dup{duplicates}"  # other rows
    return Path(cache_dir) / f"{name}-{size}px-{fingerprint[:16]}{policy}"


class _RowWriter:
    """Decodes samples and writes each into its row of the store file (positional writes, so any order works).

    Each decode worker opens the file itself: only a status travels back to the packer, not the 1 MB sample (a
    512 px sample pickled through a pipe per result made two workers no faster than one on two cores).
    Plain writes, not a writable memmap: a mapping keeps every written page resident, so memory would grow with the
    dataset; written through the file it stays at one decoded sample per worker.
    """

    def __init__(self, path: Path, header_bytes: int, size: int, skip_bad: bool, sixteen_bit: str = "divide",
                 hash_green: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 decode: Callable[[str, str], np.ndarray] | None = None):
        self.path, self.header_bytes, self.size, self.skip_bad = path, header_bytes, size, skip_bad
        self.sixteen_bit, self.hash_green, self.max_pixels = sixteen_bit, hash_green, max_pixels
        # (image folder, Id) -> uint8 (k, 4, size, size): a task that fills k consecutive rows (the cells of an image)
        self.decode = decode
        self.row_bytes = len(CHANNELS) * size * size
        self._fd: int | None = None

    def __call__(self, task: tuple[int, str, str]) -> tuple[int, str | None, int | None]:
        """(row, image folder, Id) -> (row, None, green hash or None) when written, (row, reason, None) when skipped
        as unreadable."""
        row, image_dir, sample_id = task
        try:
            sample = (self.decode(image_dir, sample_id) if self.decode is not None else
                      load_sample(image_dir, sample_id, self.size, self.sixteen_bit, self.max_pixels))
        except DataError as err:
            if not self.skip_bad:
                raise
            return row, str(err), None
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY)
        data = np.ascontiguousarray(sample, dtype=np.uint8).data
        offset = self.header_bytes + row * self.row_bytes
        written = 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], offset + written)
        return row, None, green_hash(sample) if self.hash_green else None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_worker_writer: _RowWriter | None = None
_worker_stop: EventType | None = None
_STOPPED = "stopped: another sample failed"  # what a worker returns for the tasks left when the packing failed


def _init_worker(writer: _RowWriter, stop: EventType | None = None) -> None:
    global _worker_writer, _worker_stop
    _worker_writer, _worker_stop = writer, stop
    # Forked workers inherit the parent's handlers; submitit's job handler ignores SIGTERM, and a worker that ignores
    # it would make the pool's shutdown wait for ever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops the pool


def _write_in_worker(task: tuple[int, str, str]) -> tuple[int, str | None, int | None]:
    assert _worker_writer is not None
    if _worker_stop is not None and _worker_stop.is_set():
        return task[0], _STOPPED, None
    return _worker_writer(task)


def _write_all(writer: _RowWriter, tasks: list[tuple[int, str, str]],
               workers: int) -> Iterator[tuple[int, str | None, int | None]]:
    if workers <= 1:
        try:
            yield from map(writer, tasks)
        finally:
            writer.close()
        return
    # fork: the workers only need numpy/PIL, and fork starts them without re-importing torch.
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    stop = context.Event()
    pool = context.Pool(workers, initializer=_init_worker, initargs=(writer, stop))
    try:
        yield from pool.imap_unordered(_write_in_worker, tasks, chunksize=4)
        pool.close()  # all work done: let the workers exit on their own rather than signalling them
    except DataError:
        # A bad sample (on_bad_sample=error): the workers pass over the tasks left and exit on their own. Terminating
        # them instead can kill one while it holds the result queue's lock, and the pool's shutdown then waits for
        # ever for that lock (a pack test on a loaded machine waited 24 minutes in that shutdown).
        stop.set()
        pool.close()
        raise
    except BaseException:  # interrupted: stop at once
        pool.terminate()
        raise
    finally:
        pool.join()


def _compact_rows(path: Path, header_bytes: int, row_bytes: int, kept: list[int]) -> None:
    """Move the kept rows (ascending) down over the skipped ones, one row at a time."""
    with path.open("r+b") as handle:
        for new_row, old_row in enumerate(kept):
            if new_row != old_row:
                handle.seek(header_bytes + old_row * row_bytes)
                data = handle.read(row_bytes)
                handle.seek(header_bytes + new_row * row_bytes)
                handle.write(data)


def check_pack_options(size: int, on_bad_sample: str, sixteen_bit: str, duplicates: str,
                       max_image_pixels: object) -> int:
    """One line naming the data.* key of a bad packing option; returns the checked pixel bound."""
    if size < 8:
        raise DataError(f"data.image_size={size}: must be at least 8")
    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"data.on_bad_sample={on_bad_sample!r}: expected 'error' or 'skip'")
    if sixteen_bit not in SIXTEEN_BIT_RULES:
        raise DataError(f"data.sixteen_bit={sixteen_bit!r}: expected one of {', '.join(SIXTEEN_BIT_RULES)}")
    if duplicates not in DUPLICATE_POLICIES:
        raise DataError(f"data.duplicates={duplicates!r}: expected one of {', '.join(DUPLICATE_POLICIES)}")
    return check_max_pixels(max_image_pixels)


def build_store(root: object, size: int, cache_dir: str | Path, image_dir: str = "train",
                workers: int | None = None, progress: bool = False, on_bad_sample: str = "error",
                max_bad_fraction: float = 0.01, sixteen_bit: str = "divide", duplicates: str = "drop",
                duplicate_distance: int = 3, classes: ClassSet = HPA2018,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> PackedStore:
    """Pack `root` at `size` px unless a complete store for it exists; returns the opened store. Labels are read as
    ids of `classes` (hpa_lightning.classes).

    `root` is a Kaggle-layout folder or several (`sources.parse_sources`: e.g. Kaggle train + HPAv18), packed into
    one store in that order; Ids must be unique across them. Between sources, copies of one image (perceptual hash
    of the green channel within `duplicate_distance` bits, `hpa_lightning.duplicates`) are handled by `duplicates`:
    `drop` keeps the earlier source's sample, `keep` keeps both (the split then keeps them together), `error`
    stops; the store's duplicates.csv lists them. `on_bad_sample="skip"` leaves out samples whose images cannot be
    read, warns with every skipped file (also written to the store's skipped.csv), and still fails when more than
    `max_bad_fraction` of them are bad. A channel file whose header declares more than `max_image_pixels` pixels
    is such a bad file, refused before it is decoded (an image bomb, or not a microscopy image).
    """
    max_image_pixels = check_pack_options(size, on_bad_sample, sixteen_bit, duplicates, max_image_pixels)
    sources = parse_sources(root, image_dir)
    table, source_of = read_sources(sources, classes)
    for source in sources:
        if not source.image_dir.is_dir():
            raise DataError(f"{source.image_dir}: image folder not found")
    fingerprint = sources_fingerprint(sources)
    target = store_path(root, size, cache_dir, image_dir, on_bad_sample, fingerprint, sixteen_bit, duplicates, classes,
                        max_image_pixels)
    if not (target / "meta.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(target):
            if not (target / "meta.json").is_file():  # else packed by the job we waited for
                _pack(sources, table, source_of, target, size, fingerprint, classes, workers=workers,
                      progress=progress, on_bad_sample=on_bad_sample, max_bad_fraction=max_bad_fraction,
                      sixteen_bit=sixteen_bit, duplicates=duplicates, duplicate_distance=duplicate_distance,
                      image_dir=image_dir, max_image_pixels=max_image_pixels)
    return PackedStore.open(target)


def _pack(sources: list[DataSource], table: LabelTable, source_of: np.ndarray, target: Path, size: int,
          fingerprint: str, classes: ClassSet, *, workers: int | None, progress: bool, on_bad_sample: str,
          max_bad_fraction: float, sixteen_bit: str, duplicates: str, duplicate_distance: int, image_dir: str,
          max_image_pixels: int) -> None:
    """Decode every sample into `<target>.tmp-...` and publish it as `target` when complete."""
    remove_stale_temporaries(target)
    check_free_space(target.parent, len(table), size)
    with atomic_folder(target, marker="meta.json") as tmp:
        shape = (len(table), len(CHANNELS), size, size)
        header_bytes = open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=shape).offset
        writer = _RowWriter(tmp / "images.npy", header_bytes, size, skip_bad=on_bad_sample == "skip",
                            sixteen_bit=sixteen_bit, hash_green=len(sources) > 1, max_pixels=max_image_pixels)
        tasks = [(row, str(sources[source_of[row]].image_dir), sample_id) for row, sample_id in enumerate(table.ids)]
        written = _write_all(writer, tasks, workers or available_cpus())
        bar = None
        if progress:
            from tqdm import tqdm

            names = "+".join(source.name for source in sources)
            written = bar = tqdm(written, total=len(table), desc=f"packing {names} at {size}px", unit="sample")
        failures: dict[int, str] = {}
        hashes: list[int | None] = [None] * len(table)
        try:
            for row, reason, digest in written:
                if reason is not None:
                    failures[row] = reason
                hashes[row] = digest
        except BaseException:
            if bar is not None:  # clear the bar: the error (one line naming the file) stays the only line
                bar.leave = False
                bar.close()
            raise
        skipped = [(table.ids[row], failures[row]) for row in sorted(failures)]
        if skipped:
            _check_skipped(skipped, len(table), max_bad_fraction)
        pairs = find_duplicates(hashes, source_of, duplicate_distance) if len(sources) > 1 else []
        if pairs and duplicates == "error":
            pair = pairs[0]
            raise DataError(f"{sources[source_of[pair.second]].csv}: Id {table.ids[pair.second]} is the same image as "
                            f"Id {table.ids[pair.first]} of {sources[source_of[pair.first]].csv} (green-channel hashes "
                            f"{pair.distance} bits apart; {len(pairs)} such pairs); set data.duplicates=drop or keep")
        dropped = {pair.second for pair in pairs} if duplicates == "drop" else set()
        kept = [row for row in range(len(table)) if row not in failures and row not in dropped]
        if len(kept) < len(table):
            _compact_rows(tmp / "images.npy", header_bytes, writer.row_bytes, kept)
            _truncate_rows(tmp / "images.npy", len(kept))
        if skipped:
            pd.DataFrame(skipped, columns=["Id", "error"]).to_csv(tmp / "skipped.csv", index=False)
        if pairs:
            pd.DataFrame([{"Id": table.ids[p.second], "source": sources[source_of[p.second]].name,
                           "duplicate_of": table.ids[p.first], "duplicate_source": sources[source_of[p.first]].name,
                           "hash_distance": p.distance, "action": "dropped" if duplicates == "drop" else "kept"}
                          for p in pairs]).to_csv(tmp / "duplicates.csv", index=False)
        index = {"Id": [table.ids[i] for i in kept], "Target": [table.targets[i] for i in kept]}
        if len(sources) > 1:
            index["source"] = [sources[source_of[i]].name for i in kept]
        if duplicates == "keep" and pairs:
            original = {p.second: table.ids[p.first] for p in pairs}
            index["duplicate_of"] = [original.get(i, "") for i in kept]
        pd.DataFrame(index).to_csv(tmp / "index.csv", index=False)
        np.save(tmp / "labels.npy", table.labels[kept])
        kept_per_source = np.bincount(source_of[kept], minlength=len(sources))
        meta = {"format": STORE_FORMAT, "source": str(sources[0].root.resolve()), "image_dir": image_dir,
                "image_size": size, "num_samples": len(kept), "skipped_samples": len(skipped),
                "on_bad_sample": on_bad_sample, "sixteen_bit": sixteen_bit, "max_image_pixels": max_image_pixels,
                "jpeg_decoder": JPEG_DECODER,
                "sources": [{"root": str(s.root.resolve()), "csv": str(s.csv.resolve()),
                             "image_dir": str(s.image_dir.resolve()), "samples": int((source_of == i).sum()),
                             "kept": int(kept_per_source[i])} for i, s in enumerate(sources)],
                "duplicates": {"policy": duplicates, "pairs": len(pairs), "max_hash_distance": duplicate_distance},
                "channels": list(CHANNELS), "num_classes": len(classes), "classes": classes.name,
                "class_names": list(classes.names), "fingerprint": fingerprint}
        write_json_atomic(tmp / "meta.json", meta)


def _check_skipped(skipped: list[tuple[str, str]], total: int, max_bad_fraction: float) -> None:
    for _, reason in skipped:
        log.warning("skipped bad sample: %s", reason)
    if len(skipped) > max_bad_fraction * total:
        raise DataError(f"{len(skipped)} of {total} samples are unreadable, more than data.max_bad_fraction="
                        f"{max_bad_fraction:g}; first: {skipped[0][1]}")


def _truncate_rows(path: Path, rows: int) -> None:
    """Shrink an .npy memmap to its first `rows` rows in place (the skipped samples' rows were never filled)."""
    old = np.load(path, mmap_mode="r")
    shape, header_len = (rows, *old.shape[1:]), old.offset
    del old
    new_header = _npy_header(shape)
    if len(new_header) != header_len:  # the padded header normally keeps its length; otherwise copy
        data = np.load(path, mmap_mode="r")[:rows].copy()
        np.save(path, data)
        return
    with path.open("r+b") as handle:
        handle.write(new_header)
        handle.truncate(header_len + int(np.prod(shape)))


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()

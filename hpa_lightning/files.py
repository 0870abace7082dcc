"""Files written whole or not at all (write to a temporary sibling, rename when complete), temporaries named by host
and process, and their clean-up: the one home of this pattern.

Kept free of heavy imports: the synthetic generator's fresh worker interpreters import it too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from hpa_lightning.errors import StorageFullError

# what a write fails with when the space runs out: a full disk, a quota, a file-size limit (RLIMIT_FSIZE)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temporary_prefix(target: Path) -> str:
    return f"{target.name}.tmp-{socket.gethostname()}-"


def temporary_sibling(target: Path, unique: bool = True) -> Path:
    """`<target>.tmp-<host>-<pid>[-<random>]` next to `target`: the host and pid say whose it is, so a clean-up on
    another node (a SLURM array task, another container sharing the folder) never mistakes it for its own."""
    suffix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}" if unique else str(os.getpid())
    return target.with_name(_temporary_prefix(target) + suffix)


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the temporaries of `target` left by dead processes of this host; other hosts' are never touched (their
    pids mean nothing here). Returns what was removed."""
    prefix = _temporary_prefix(target)
    removed = []
    for tmp in target.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # a file written through a temporary (a checkpoint)
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count} bytes"


def no_space(path: Path, needed: int | None = None) -> StorageFullError:
    """The one-line error for a write of `path` that ran out of space: the file, the space it needs, what is free."""
    try:
        free = f"{_size(shutil.disk_usage(Path(path).parent).free)} free on its disk"
    except OSError:
        free = "its disk is not readable"
    need = f"needs {_size(needed)}, " if needed is not None else ""
    return StorageFullError(f"{path}: no space left to write it ({need}{free}); what was there before is intact")


@contextlib.contextmanager
def atomic_path(path: Path, size: int | None = None) -> Iterator[Path]:
    """A hidden temporary sibling to write `path` through: renamed onto `path` when the block ends normally, removed
    when it raises, so a reader never sees half a file and a crash never leaves one behind under the real name.
    Running out of space (`size`: the bytes the file needs, when known) is a `StorageFullError` naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{temporary_sibling(path).name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in NO_SPACE_ERRNOS:
            raise no_space(path, size) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    data = text.encode()
    with atomic_path(path, size=len(data)) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, payload: object) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_folder(target: Path, marker: str | None = None, replace: bool = False,
                  unique: bool = True) -> Iterator[Path]:
    """A temporary sibling folder to build `target` in, published as `target` by one rename when the block ends
    normally and removed whatever happens: no reader ever sees half a folder under the real name.

    An empty `target` (a placeholder) is replaced; `replace=True` swaps out a complete old one, removed only once the
    new one is in place. With `marker`, a complete folder that a concurrent builder published first (it holds
    `marker`, written last) is equally valid and kept, and ours dropped. Otherwise a `target` that appears meanwhile
    is a `FileExistsError`. `unique=False`: the temporary name has no random part (one per host and process), so a
    process that dies leaves a name `remove_stale_temporaries` finds.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target, unique=unique)
    shutil.rmtree(tmp, ignore_errors=True)  # only with unique=False: left by a killed process that had our pid
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if replace and target.is_dir():
            old = target.with_name(f"{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        elif target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            os.rename(tmp, target)  # refused (EEXIST, ENOTEMPTY) when another folder is already there
        except OSError as err:
            if not (marker and (target / marker).is_file()):
                if target.exists():
                    raise FileExistsError(f"{target} appeared while it was being written; it is never "
                                          f"overwritten") from err
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Held while this process builds `target`: other processes that need the same folder (parallel sweep jobs on a
    fresh cache) wait here for the builder, then find it complete instead of each building it at once. A `flock` on
    `<target>.lock`, dropped by the kernel if the holder dies, so a killed builder never blocks the next one. The
    holder removes the lock file before releasing it: a process arriving later finds the folder complete (or, after a
    failed build, builds it again), so nothing is left next to the folder."""
    path = target.with_name(target.name + ".lock")
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks (some NFS mounts): build side by side, each publishing whole
            path.unlink(missing_ok=True)
            yield
            return
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)

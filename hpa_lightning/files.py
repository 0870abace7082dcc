"""Files written whole or not at all: temporaries named by host and process, and their clean-up.

Kept free of heavy imports: the synthetic generator's fresh worker interpreters import it too.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import uuid
from pathlib import Path


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
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed

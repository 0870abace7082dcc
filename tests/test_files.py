"""The one way a folder is published (files.atomic_folder) and a file written (files.atomic_path): whole under its
name, or not at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpa_lightning.files import atomic_folder


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_published_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("crash while writing")
    assert siblings(target) == []  # neither the folder nor its temporary
    with atomic_folder(target) as tmp:
        assert not target.exists()  # readers never see it while it is written
        (tmp / "card.json").write_text("{}")
    assert siblings(target) == ["out"] and (target / "card.json").read_text() == "{}"


def test_an_existing_folder_is_never_overwritten_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "out"
    (target / "old").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="appeared while it was being written"), atomic_folder(target) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(os.listdir(target)) == ["old"] and siblings(target) == ["out"]
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(os.listdir(target)) == ["new"] and siblings(target) == ["out"]
    empty = tmp_path / "placeholder"
    empty.mkdir()
    with atomic_folder(empty) as tmp:
        (tmp / "x").write_text("x")
    assert os.listdir(empty) == ["x"]


def test_a_concurrent_builders_complete_folder_wins(tmp_path: Path) -> None:
    target = tmp_path / "store"
    with atomic_folder(target, marker="meta.json") as tmp:
        (tmp / "meta.json").write_text("ours")
        target.mkdir()  # another process published its complete store meanwhile
        (target / "meta.json").write_text("theirs")
    assert (target / "meta.json").read_text() == "theirs" and siblings(target) == ["store"]


def test_a_file_that_runs_out_of_space_is_one_line_and_the_old_one_stays(tmp_path: Path) -> None:
    """results.json written when the disk is full (a file-size limit stands in: writes beyond fail with EFBIG as on a
    full disk): one line naming the file and the space it needs, the previous results intact, no temporary left."""
    target = tmp_path / "results.json"
    target.write_text('{"old": true}\n')
    script = f"""
import resource, signal, sys
from hpa_lightning.errors import StorageFullError
from hpa_lightning.files import write_json_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_json_atomic({str(target)!r}, {{"values": list(range(5000))}})
except StorageFullError as err:
    print(err)
    sys.exit(2)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stdout.splitlines()
    assert line.startswith(f"{target}: no space left to write it (needs ") and "free on its disk" in line
    needed = len(json.dumps({"values": list(range(5000))}, indent=2)) + 1
    assert f"needs {needed} bytes" in line
    assert target.read_text() == '{"old": true}\n'
    assert siblings(target) == ["results.json"]

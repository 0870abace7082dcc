"""Checkpoints are written whole or not at all, a full disk is one line naming the file and the space, and a resume
passes over checkpoints it cannot read to the newest one it can."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpa_lightning.errors import InferenceError, RunSetupError, StorageFullError
from hpa_lightning.files import temporary_sibling
from hpa_lightning.training.checkpoint_io import AtomicCheckpointIO
from hpa_lightning.training.continuation import load_resume_checkpoint, resume_checkpoint


def training_checkpoint(value: float, epoch: int = 0) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "loops": {}, "epoch": epoch, "global_step": 10 * epoch}


class FullDisk(AtomicCheckpointIO):
    def write(self, handle, data) -> None:
        handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_save_is_complete_and_loadable(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(training_checkpoint(1.0), path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(64, 64))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_full_disk_keeps_the_previous_checkpoint_and_names_file_and_space(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(training_checkpoint(1.0), path)
    before = path.read_bytes()
    with pytest.raises(StorageFullError) as raised:
        FullDisk().save_checkpoint(training_checkpoint(2.0), path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}: no space left to write it (needs ")
    assert "free on its disk" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_killed_writers_temporary_is_removed_by_the_next_save_and_others_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = temporary_sibling(path)
    left_by_dead = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    left_by_dead.write_bytes(b"half")
    elsewhere = path.with_name(f"{path.name}.tmp-otherhost-{os.getpid()}-0")  # another node's write in progress
    elsewhere.write_bytes(b"half")
    AtomicCheckpointIO().save_checkpoint(training_checkpoint(1.0), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", elsewhere.name])


def run_with_checkpoints(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "run" / "checkpoints"
    for age, name in enumerate(reversed(names)):  # the first name is the newest
        AtomicCheckpointIO().save_checkpoint(training_checkpoint(float(age), epoch=age + 1), folder / name)
        os.utime(folder / name, (1_000_000 + age, 1_000_000 + age))
    return tmp_path / "run"


def test_resume_passes_over_an_unreadable_last_checkpoint_saying_so(tmp_path: Path, caplog) -> None:
    run = run_with_checkpoints(tmp_path, "last.ckpt", "best.ckpt", "epoch0.ckpt")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    (run / "checkpoints" / "best.ckpt").write_bytes(b"not a checkpoint")
    start = resume_checkpoint(run, True, None)
    assert start == str(last)
    with caplog.at_level(logging.WARNING):
        chosen, checkpoint = load_resume_checkpoint(run, start)
    assert chosen == str(run / "checkpoints" / "epoch0.ckpt") and checkpoint["epoch"] == 1
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith(f"resume: {last}: not a readable checkpoint")
    assert str(run / "checkpoints" / "best.ckpt") in lines[1]
    assert lines[1].endswith("trying the run's older checkpoints")
    assert lines[2] == f"resume: continuing from {chosen} (epoch 1, step 10), the newest readable checkpoint of the run"


def test_resume_with_no_readable_checkpoint_names_them(tmp_path: Path) -> None:
    run = run_with_checkpoints(tmp_path, "last.ckpt")
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}}, last)  # weights only: no loop state to continue
    with pytest.raises(RunSetupError, match="no readable checkpoint in .*not a training checkpoint"):
        load_resume_checkpoint(run, str(last))


def test_resume_without_last_checkpoint_starts_from_the_newest_other(tmp_path: Path) -> None:
    run = run_with_checkpoints(tmp_path, "best.ckpt")  # killed between best.ckpt and last.ckpt of epoch 0
    assert resume_checkpoint(run, "auto", None) == str(run / "checkpoints" / "best.ckpt")


def test_a_ckpt_path_of_the_users_own_is_never_swapped_for_another(tmp_path: Path) -> None:
    run = run_with_checkpoints(tmp_path, "last.ckpt")
    other = tmp_path / "elsewhere.ckpt"
    other.write_bytes(b"truncated")
    with pytest.raises(InferenceError, match="elsewhere.ckpt: not a readable checkpoint"):
        load_resume_checkpoint(run, str(other))

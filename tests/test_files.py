"""The one way a folder is published (files.atomic_folder): whole under its name, or not at all."""

from __future__ import annotations

import os
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

"""Class sets (label spaces): HPA 2018's 28 classes, HPA 2021's 19, or a lab's own list; the channel order.

A class set is named by `data.classes`: `hpa2018` (the Kaggle 2018 competition, the default), `hpa2021` (the HPA 2021
single-cell competition's image-level labels, 18 = Negative), or the path of a CSV `id,name` with ids 0..K-1 in
order. Everything that sizes or names classes (the head, losses, metrics, thresholds, outputs, the store) takes the
set from the data; `CLASS_NAMES` / `NUM_CLASSES` are HPA 2018's, what the synthetic generator paints.
"""

from __future__ import annotations

import csv
import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hpa_lightning.errors import DataError

CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
KAGGLE_TRAIN_SAMPLES = 31072
DEFAULT_CLASSES = "hpa2018"
BUILTIN_CLASS_SETS = {"hpa2018": "hpa_classes.csv", "hpa2021": "hpa2021_classes.csv"}


@dataclass(frozen=True)
class ClassSet:
    """A label space: its name (`hpa2018`, `hpa2021` or the CSV's path) and its class names in id order."""

    name: str
    names: tuple[str, ...]
    digest: str  # of the names, so that two lists with the same file name never share a store

    def __len__(self) -> int:
        return len(self.names)

    @property
    def store_tag(self) -> str:
        """What a store's folder name adds for this set: nothing for hpa2018 (stores packed before class sets
        existed stay valid), the name for hpa2021, stem + digest for a CSV of the user's."""
        if self.name == DEFAULT_CLASSES:
            return ""
        return f"-{self.name}" if self.name in BUILTIN_CLASS_SETS else f"-{Path(self.name).stem}{self.digest[:8]}"


def _parse_class_csv(text: str, where: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(text.lstrip("\ufeff").splitlines()))
    if not rows or not {"id", "name"} <= set(rows[0]):
        raise DataError(f"{where}: expected a CSV with columns id,name (ids 0..K-1 in order)")
    seen: dict[str, int] = {}
    for position, row in enumerate(rows):
        line = position + 2
        if (row.get("id") or "").strip() != str(position):
            raise DataError(f"{where} row {line}: id {row.get('id')!r}, expected {position} (ids 0..K-1 in order)")
        name = (row.get("name") or "").strip()
        if not name:
            raise DataError(f"{where} row {line}: empty class name")
        if name in seen:
            raise DataError(f"{where} row {line}: class name {name!r} repeats row {seen[name]}")
        seen[name] = line
    if len(rows) < 2:
        raise DataError(f"{where}: a class set needs at least 2 classes, found {len(rows)}")
    return rows


@functools.cache
def _builtin_rows(name: str) -> tuple[dict[str, str], ...]:
    text = resources.files("hpa_lightning").joinpath(f"resources/{BUILTIN_CLASS_SETS[name]}").read_text()
    return tuple(_parse_class_csv(text, BUILTIN_CLASS_SETS[name]))


def class_set(spec: str | Path | None = DEFAULT_CLASSES) -> ClassSet:
    """The class set `data.classes` names; a missing or malformed CSV is one line naming the file and row."""
    spec = str(spec or DEFAULT_CLASSES)
    if spec in BUILTIN_CLASS_SETS:
        rows = _builtin_rows(spec)
        name = spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"data.classes={spec}: not {' or '.join(BUILTIN_CLASS_SETS)} and no such CSV file")
        rows = _parse_class_csv(path.read_text(encoding="utf-8"), str(path))
        name = str(path.resolve())
    names = tuple(row["name"].strip() for row in rows)
    return ClassSet(name=name, names=names, digest=hashlib.sha256("\n".join(names).encode()).hexdigest())


HPA2018 = class_set(DEFAULT_CLASSES)
CLASS_NAMES: tuple[str, ...] = HPA2018.names
NUM_CLASSES = len(CLASS_NAMES)
KAGGLE_TRAIN_COUNTS: tuple[int, ...] = tuple(int(row["kaggle_2018_train_count"]) for row in _builtin_rows("hpa2018"))

"""Which images a folder in the Kaggle layout holds: the Ids (a CSV's order, else every Id whose channel files are
found, sorted) and the folder of their `{Id}_{red,green,blue,yellow}.{png,jpg,tif}` files, every file checked.

Used by predict, explain and segment alike: `DIR/sample_submission.csv` (Id,Predicted; HPA 2021's has ID) or another
Id CSV (`train.csv`: Id,Target / ID,Label) fixes the Ids and their order; without one, the folder is scanned.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpa_lightning.classes import CHANNELS
from hpa_lightning.data.sources import IMAGE_EXTENSIONS, KAGGLE_IMAGE_DIR, channel_path, check_id, read_csv_strings
from hpa_lightning.errors import DataError

SAMPLE_SUBMISSION = "sample_submission.csv"


_FILE_PATTERN = re.compile(rf"^(?P<id>.+)_(?P<channel>{'|'.join(CHANNELS)})"
                           rf"(?P<ext>{'|'.join(re.escape(e) for e in IMAGE_EXTENSIONS)})$")


@dataclass(frozen=True)
class PredictInput:
    image_dir: Path
    ids: list[str]
    source: str  # where the Ids and their order came from
    incomplete: dict[str, list[str]] = field(default_factory=dict)  # Id -> its missing channels (no CSV given)


def _image_folder(root: Path, image_dir: str) -> Path:
    if not root.is_dir():
        raise DataError(f"{root}: input folder not found")
    candidate = root / image_dir
    if candidate.is_dir():
        return candidate
    if image_dir != KAGGLE_IMAGE_DIR:
        raise DataError(f"{candidate}: image folder not found")
    return root  # images directly in the input folder


def read_id_csv(csv_path: Path) -> list[str]:
    """The Ids of a Kaggle CSV, in its order: column `Id` (HPA 2018) or `ID` (HPA 2021); each checked, no
    duplicates."""
    frame = read_csv_strings(csv_path, "Id,Predicted")
    column = next((c for c in ("Id", "ID") if c in frame.columns), None)
    if column is None:
        raise DataError(f"{csv_path}: missing column Id or ID (found {', '.join(map(str, frame.columns))})")
    ids = frame[column].tolist()
    if not ids:
        raise DataError(f"{csv_path}: no samples (header only)")
    first_line: dict[str, int] = {}
    for row, sample_id in enumerate(ids):
        where = f"{csv_path} row {row + 2}"
        check_id(sample_id, where)
        if sample_id in first_line:
            raise DataError(f"{where}: duplicate Id {sample_id} (first at row {first_line[sample_id]})")
        first_line[sample_id] = row + 2
    return ids


def _missing_channels(image_dir: Path, sample_id: str, channels: Sequence[str]) -> list[tuple[str, DataError]]:
    missing = []
    for channel in channels:
        try:
            channel_path(image_dir, sample_id, channel)
        except DataError as err:
            missing.append((channel, err))
    return missing


def _check_files(image_dir: Path, ids: list[str], csv_path: Path, channels: Sequence[str]) -> None:
    """Every Id of the CSV has its channel files (a submission needs every Id); an Id with none at all is reported
    as a missing Id."""
    for row, sample_id in enumerate(ids):
        missing = _missing_channels(image_dir, sample_id, channels)
        if len(missing) == len(channels):
            raise DataError(f"{csv_path} row {row + 2}: Id {sample_id} has no image files in {image_dir} "
                            f"(expected {sample_id}_{{{','.join(channels)}}}.png)")
        if missing:
            raise missing[0][1]


def scan_ids(image_dir: Path) -> list[str]:
    """The Ids of the channel files in `image_dir`, sorted; a `DataError` when there are none."""
    ids = set()
    with os.scandir(image_dir) as entries:
        for entry in entries:
            match = _FILE_PATTERN.match(entry.name)
            if match and entry.is_file():
                ids.add(match.group("id"))
    if not ids:
        raise DataError(f"{image_dir}: no image files named {{Id}}_{{{','.join(CHANNELS)}}}.png/.jpg/.tif and no "
                        f"{SAMPLE_SUBMISSION}")
    return sorted(ids)


def resolve_input(root: str | Path, image_dir: str = KAGGLE_IMAGE_DIR, id_csvs: Sequence[str] = (SAMPLE_SUBMISSION,),
                  channels: Sequence[str] = CHANNELS) -> PredictInput:
    """The Ids (the first of `id_csvs` found in `root`, in its order, else every Id with all of `channels`, sorted)
    and the folder of their images (`root/image_dir`, else `root` itself for the default `test`), files checked."""
    root = Path(root)
    folder = _image_folder(root, image_dir)
    for name in id_csvs:
        csv_path = root / name
        if csv_path.is_file():
            ids = read_id_csv(csv_path)
            _check_files(folder, ids, csv_path, channels)
            return PredictInput(image_dir=folder, ids=ids, source=str(csv_path))
    # no Id CSV: every complete Id is taken, the incomplete ones are listed
    found = scan_ids(folder)
    incomplete = {i: [channel for channel, _ in missing] for i in found
                  if (missing := _missing_channels(folder, i, channels))}
    complete = [i for i in found if i not in incomplete]
    if not complete:
        first = next(iter(incomplete))
        count = {3: "three", 4: "four"}.get(len(channels), str(len(channels)))
        raise DataError(f"{folder}: no Id has all {count} channel files (e.g. {first} lacks "
                        f"{', '.join(incomplete[first])})")
    return PredictInput(image_dir=folder, ids=complete, source=f"files in {folder}", incomplete=incomplete)

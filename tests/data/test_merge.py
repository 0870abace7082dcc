"""Several sources in one dataset, made from the generator's output: Kaggle-style 8-bit PNGs plus an HPAv18-style
source of RGB-plane JPGs at 4x the size, with planted copies of Kaggle images (the ~6000 duplicates bestfitting
removed from HPAv18). Duplicates are found, handled by policy, listed, and never straddle two splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa_lightning.data.simulator.dataset import generate
from hpa_lightning.data.split import prepare_split
from hpa_lightning.data.store import build_store
from hpa_lightning.errors import DataError
from tests.data.test_formats import rgb_plane_jpg

PLANTED = 3
SIZE = 32


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("sources")
    kaggle = generate(base / "kaggle", n=14, seed=3, size=64, workers=1)
    external_png = generate(base / "external-png", n=8, seed=11, size=64, workers=1)
    external = base / "hpav18"
    (external / "train").mkdir(parents=True)
    frame = pd.read_csv(external_png / "train.csv", dtype=str)
    for path in sorted((external_png / "train").glob("*.png")):
        sample_id, channel = path.stem.rsplit("_", 1)
        rgb_plane_jpg(np.asarray(Image.open(path)), channel, external / "train" / f"{sample_id}_{channel}")
    kaggle_frame = pd.read_csv(kaggle / "train.csv", dtype=str)
    planted = {}
    for number, (sample_id, target) in enumerate(kaggle_frame.head(PLANTED).itertuples(index=False)):
        copy_id = f"hpav18-copy-{number}"
        planted[copy_id] = sample_id
        for channel in ("red", "green", "blue", "yellow"):
            array = np.asarray(Image.open(kaggle / "train" / f"{sample_id}_{channel}.png"))
            rgb_plane_jpg(array, channel, external / "train" / f"{copy_id}_{channel}")
        frame.loc[len(frame)] = [copy_id, target]
    frame.to_csv(external / "train.csv", index=False)
    shutil.rmtree(external_png)
    return kaggle, external, planted


def test_drop_finds_exactly_the_planted_copies_and_keeps_the_first_sources(sources, tmp_path: Path) -> None:
    kaggle, external, planted = sources
    store = build_store([kaggle, external], SIZE, tmp_path / "c", workers=2, duplicates="drop")
    assert len(store) == 14 + 8
    assert not set(planted) & set(store.ids)
    listed = pd.read_csv(store.path / "duplicates.csv", dtype=str)
    assert dict(zip(listed["Id"], listed["duplicate_of"], strict=True)) == planted
    assert set(listed["action"]) == {"dropped"} and set(listed["source"]) == {external.name}
    index = pd.read_csv(store.path / "index.csv", dtype=str)
    assert index["source"].value_counts().to_dict() == {kaggle.name: 14, external.name: 8}


def test_error_names_both_samples_on_one_line(sources, tmp_path: Path) -> None:
    kaggle, external, planted = sources
    with pytest.raises(DataError) as raised:
        build_store([kaggle, external], SIZE, tmp_path / "c", workers=1, duplicates="error")
    message = str(raised.value)
    first_copy = sorted(planted)[0]
    assert "\n" not in message and first_copy in message and planted[first_copy] in message
    assert str(external / "train.csv") in message and str(kaggle / "train.csv") in message
    assert "data.duplicates" in message


def test_kept_duplicates_never_straddle_two_splits(sources, tmp_path: Path) -> None:
    kaggle, external, planted = sources
    store = build_store([kaggle, external], SIZE, tmp_path / "c", workers=1, duplicates="keep")
    assert len(store) == 14 + 8 + PLANTED
    row = {sample_id: i for i, sample_id in enumerate(store.ids)}
    for seed in range(6):
        split = prepare_split(store, val_fraction=0.2, test_fraction=0.2, seed=seed)
        for copy_id, original in planted.items():
            assert split.assignment[row[copy_id]] == split.assignment[row[original]], (seed, copy_id)
        # sizes count images, not copies: 22 distinct images, 4 of them (plus any copies) in val and in test
        sizes = {name: len(split.indices(name)) for name in ("train", "val", "test")}
        assert sum(sizes.values()) == 25 and 4 <= sizes["val"] <= 4 + PLANTED and 4 <= sizes["test"] <= 4 + PLANTED


def test_an_id_in_two_sources_is_refused_naming_both(sources, tmp_path: Path) -> None:
    kaggle, external, _ = sources
    clash = tmp_path / "clash"
    shutil.copytree(external, clash)
    first_kaggle_id = pd.read_csv(kaggle / "train.csv", dtype=str)["Id"][5]
    (clash / "train.csv").write_text((clash / "train.csv").read_text() + f"{first_kaggle_id},3\n")
    with pytest.raises(DataError) as raised:
        build_store([kaggle, clash], SIZE, tmp_path / "c", workers=1)
    assert str(raised.value) == (f"{clash / 'train.csv'} row 13: Id {first_kaggle_id} is also "
                                 f"{kaggle / 'train.csv'} row 7; Ids must be unique across the sources of data.root")


def test_the_datamodule_records_its_sources(sources, tmp_path: Path) -> None:
    from hpa_lightning.data.datamodule import HPADataModule

    kaggle, external, planted = sources
    datamodule = HPADataModule(root=[str(kaggle), {"root": str(external), "image_dir": "train"}], image_size=SIZE,
                               cache_dir=tmp_path / "c", num_workers=0, split={"val_fraction": 0.2,
                                                                               "test_fraction": 0.2})
    datamodule.prepare_data()
    datamodule.setup("fit")
    summary = datamodule.sources_summary()
    assert [s["samples"] for s in summary["sources"]] == [14, 8 + PLANTED]
    assert [s["kept"] for s in summary["sources"]] == [14, 8]
    assert summary["duplicates"] == {"policy": "drop", "pairs": PLANTED}


@pytest.mark.slow
def test_training_on_two_sources_records_them(sources, tmp_path: Path) -> None:
    import json

    from tests.conftest import REPO, run_train

    kaggle, external, _ = sources
    run_dir = tmp_path / "run"
    proc = run_train(["+experiment=focal_g02", "+preset=tiny", "data=hpa", f"data.root=[{kaggle},{external}]",
                      "data.image_size=24", "data.split.val_fraction=0.2", "data.split.test_fraction=0.2",
                      "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], tmp_path / "cache", REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((run_dir / "results.json").read_text())["data"]
    assert [(Path(s["root"]).name, s["samples"], s["kept"]) for s in data["sources"]] == [
        (kaggle.name, 14, 14), (external.name, 8 + PLANTED, 8)]
    assert data["duplicates"] == {"policy": "drop", "pairs": PLANTED}
    assert sum(data["split"].values()) == 22

"""Label spaces beyond Kaggle 2018's 28 classes: HPA 2021 as Kaggle ships it (ID,Label with '|', 19 classes, 16-bit
PNGs of mixed sizes), a lab's own class list, and mean average precision; fixtures made from the generator's output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from hpa_lightning.classes import CLASS_NAMES, class_set
from hpa_lightning.data.simulator.dataset import generate
from hpa_lightning.data.sources import read_label_table
from hpa_lightning.data.store import build_store
from hpa_lightning.errors import DataError
from hpa_lightning.metrics import summarize
from tests.conftest import REPO, compose_config, run_train

# Kaggle 2018 id -> the HPA 2021 id of the nearest location (2021 merged 2018's rarer classes; e.g. peroxisomes,
# endosomes, lysosomes and lipid droplets into "Vesicles and punctate cytosolic patterns"). A test mapping, only
# used to give the generator's images plausible 2021 labels.
TO_2021 = [0, 1, 2, 3, 4, 5, 6, 7, 17, 17, 17, 8, 9, 9, 10, 10, 11, 11, 12, 12, 17, 13, 13, 14, 15, 16, 17, 16]


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_built_in_class_sets() -> None:
    hpa2018, hpa2021 = class_set("hpa2018"), class_set("hpa2021")
    assert hpa2018.names == CLASS_NAMES and len(hpa2018) == 28 and hpa2018.store_tag == ""
    assert len(hpa2021) == 19 and hpa2021.names[0] == "Nucleoplasm" and hpa2021.names[18] == "Negative"
    assert hpa2021.names[17] == "Vesicles and punctate cytosolic patterns" and hpa2021.store_tag == "-hpa2021"


def test_a_labs_class_list_from_a_spreadsheet_csv(tmp_path: Path) -> None:
    """A UTF-8 BOM and CRLF line ends, as spreadsheets write them."""
    path = tmp_path / "lab_classes.csv"
    path.write_bytes("\ufeffid,name\r\n0,Nucleus\r\n1,Cytoplasm\r\n2,Membrane\r\n".encode())
    lab = class_set(str(path))
    assert lab.names == ("Nucleus", "Cytoplasm", "Membrane") and lab.store_tag.startswith("-lab_classes")
    other = write_csv(tmp_path / "b" / "lab_classes.csv", "id,name\n0,A\n1,B\n2,C\n")
    assert class_set(str(other)).store_tag != lab.store_tag  # same file name, other classes: other stores


@pytest.mark.parametrize(("text", "message"), [
    ("id,name\n0,A\n2,B\n", "row 3: id '2', expected 1"),
    ("id,name\n0,A\n1,\n", "row 3: empty class name"),
    ("id,name\n0,A\n1,A\n", "row 3: class name 'A' repeats row 2"),
    ("class,label\n0,A\n", "expected a CSV with columns id,name"),
    ("id,name\n0,A\n", "at least 2 classes"),
])
def test_a_bad_class_list_is_one_line_naming_file_and_row(tmp_path: Path, text: str, message: str) -> None:
    path = write_csv(tmp_path / "classes.csv", text)
    with pytest.raises(DataError) as raised:
        class_set(str(path))
    assert message in str(raised.value) and str(path) in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(DataError, match="data.classes=nowhere.csv: not hpa2018 or hpa2021 and no such CSV file"):
        class_set("nowhere.csv")


def test_hpa2021_labels_are_read_with_their_separator(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", "ID,Label\na,0|18\nb,16\nc,5 | 7\n")
    table = read_label_table(path, class_set("hpa2021"))
    assert table.labels.shape == (3, 19) and table.ids == ["a", "b", "c"]
    assert np.flatnonzero(table.labels[0]).tolist() == [0, 18] and np.flatnonzero(table.labels[2]).tolist() == [5, 7]


@pytest.mark.parametrize(("text", "message"), [
    ("ID,Label\na,0|1\nb,0 16\n", "row 3 (Id b): Label '0 16' is separated by ' '; ID,Label CSVs separate labels "
                                  "with '|'"),
    ("ID,Label\na,19\n", "row 2 (Id a): label 19 out of range 0..18 (the class set has 19 classes)"),
    ("ID,Label\na,1\nb,\n", "row 3 (Id b): empty Label"),
    ("Id,Target\na,0|16\n", "row 2 (Id a): Target '0|16' is separated by '|'; Id,Target CSVs separate labels with "
                            "spaces"),
    ("ID,Target\na,1\n", "missing columns Id,Target or ID,Label (found ID, Target)"),
])
def test_bad_hpa2021_labels_are_one_line_naming_file_and_row(tmp_path: Path, text: str, message: str) -> None:
    path = write_csv(tmp_path / "train.csv", text)
    with pytest.raises(DataError) as raised:
        read_label_table(path, class_set("hpa2021"))
    assert str(raised.value).startswith(str(path)) and message in str(raised.value) and "\n" not in str(raised.value)


def test_an_hpa2021_csv_read_as_2018_says_how_to_train_on_it(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", "ID,Label\na,0|18\n")
    with pytest.raises(DataError, match="data=hpa2021"):
        read_label_table(path)


def test_the_kaggle_2018_layout_with_a_labs_class_list(tmp_path: Path) -> None:
    classes = class_set(str(write_csv(tmp_path / "mine.csv", "id,name\n0,A\n1,B\n2,C\n")))
    table = read_label_table(write_csv(tmp_path / "train.csv", "Id,Target\na,2 0\nb,1\n"), classes)
    assert table.labels.tolist() == [[1, 0, 1], [0, 1, 0]]
    with pytest.raises(DataError, match=r"row 2 \(Id a\): label 3 out of range 0..2"):
        read_label_table(write_csv(tmp_path / "bad.csv", "Id,Target\na,3\n"), classes)


def test_sources_of_different_class_sets_are_refused(tmp_path: Path, kaggle_folder: Path) -> None:
    other = tmp_path / "hpa2021"
    shutil.copytree(kaggle_folder, other)
    frame = pd.read_csv(kaggle_folder / "train.csv", dtype=str)
    pd.DataFrame({"ID": frame["Id"].map(lambda i: f"x{i}"), "Label": "0"}).to_csv(other / "train.csv", index=False)
    with pytest.raises(DataError) as raised:
        build_store([kaggle_folder, other], 8, tmp_path / "c", workers=1, classes=class_set("hpa2021"))
    assert "cannot be mixed" in str(raised.value) and str(other / "train.csv") in str(raised.value)


def test_mean_average_precision_is_sklearns() -> None:
    rng = np.random.default_rng(4)
    targets = (rng.random((300, 19)) < 0.15).astype(np.uint8)
    targets[:, 3] = 0  # no positives: AP undefined, left out of the mean
    targets[:, 5] = 0
    targets[7, 5] = 1  # one positive
    probs = rng.random((300, 19))
    probs[:60, 0] = 0.5  # ties
    summary = summarize(targets, probs)
    valid = [c for c in range(19) if targets[:, c].any()]
    expected = [average_precision_score(targets[:, c], probs[:, c]) for c in valid]
    assert summary["n_ap_classes"] == 18 and summary["per_class_average_precision"][3] is None
    np.testing.assert_allclose([summary["per_class_average_precision"][c] for c in valid], expected, atol=1e-6)
    assert summary["mean_average_precision"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert summarize(np.zeros((4, 3)), rng.random((4, 3)))["mean_average_precision"] is None


def test_the_hpa2021_config_composes() -> None:
    cfg = compose_config(["data=hpa2021", "data.root=/data/hpa2021"])
    assert cfg.data.classes == "hpa2021" and cfg.data.sixteen_bit == "percentile" and cfg.data.synthetic is None
    assert compose_config([]).data.classes == "hpa2018"


# ---- end to end: HPA 2021 as Kaggle ships it ----------------------------------------------------------------------

def kaggle_2021(generated: Path, out: Path, ids: list[str], with_labels: bool = True) -> Path:
    """The generator's samples in HPA 2021's shape: `ID,Label` with '|', 16-bit low-range PNGs of mixed sizes."""
    frame = pd.read_csv(generated / "train.csv", dtype=str).set_index("Id").loc[ids]
    folder = out / ("train" if with_labels else "test")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for sample_id in ids:
        side = int(rng.integers(40, 72))  # mixed sizes, as 2021's 1700-3100 px
        for channel in ("red", "green", "blue", "yellow"):
            array = np.asarray(Image.open(generated / "train" / f"{sample_id}_{channel}.png"))
            big = Image.fromarray(array).resize((side, side), Image.Resampling.BILINEAR)
            # low range, as real 2021 channels (a green channel's mean is a few hundred of 65535)
            Image.fromarray(np.asarray(big).astype(np.uint16) * 8 + 100).save(folder / f"{sample_id}_{channel}.png")
    if with_labels:
        labels = ["|".join(sorted({str(TO_2021[int(c)]) for c in target.split()}, key=int))
                  for target in frame["Target"]]
        pd.DataFrame({"ID": ids, "Label": labels}).to_csv(out / "train.csv", index=False)
    else:
        pd.DataFrame({"ID": ids, "ImageWidth": 2048, "ImageHeight": 2048, "PredictionString": ""}).to_csv(
            out / "sample_submission.csv", index=False)
    return out


@pytest.fixture(scope="module")
def hpa2021_run(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hpa2021")
    generated = generate(base / "generated", n=200, seed=5, size=48, workers=1)
    ids = pd.read_csv(generated / "train.csv", dtype=str)["Id"].tolist()
    kaggle_2021(generated, base / "kaggle2021", ids[:180])
    kaggle_2021(generated, base / "kaggle2021_test", ids[180:], with_labels=False)
    run_dir = base / "run"
    proc = run_train(["+experiment=focal_g02", "+preset=tiny", "data=hpa2021", f"data.root={base / 'kaggle2021'}",
                      "data.synthetic=null", "data.image_size=32", "thresholds.strategy=label_ratio",
                      "loss.pos_weight=auto", "data.oversample=true", f"hydra.run.dir={run_dir}"],
                     shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_hpa2021_trains_with_19_classes_and_reports_map(hpa2021_run: Path) -> None:
    results = json.loads((hpa2021_run / "results.json").read_text())
    assert results["class_names"] == list(class_set("hpa2021").names)
    checkpoint = torch.load(hpa2021_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"][18] == "Negative"
    assert checkpoint["state_dict"]["net.fc.weight"].shape[0] == 19
    assert len(checkpoint["hyper_parameters"]["loss"]["pos_weight"]) == 19
    predictions = pd.read_csv(hpa2021_run / "test_predictions.csv")
    truth = predictions[[f"true_{c}" for c in range(19)]].to_numpy()
    probs = predictions[[f"prob_{c}" for c in range(19)]].to_numpy()
    valid = [c for c in range(19) if truth[:, c].any()]
    expected = np.mean([average_precision_score(truth[:, c], probs[:, c]) for c in valid])
    assert results["test"]["mean_average_precision"] == pytest.approx(expected, abs=1e-4)  # 6-decimal CSV
    thresholds = json.loads((hpa2021_run / "thresholds.json").read_text())
    assert len(thresholds["thresholds"]) == 19 and "Negative" in thresholds["thresholds"]
    assert "mAP:" in (hpa2021_run / "train.log").read_text()


@pytest.mark.slow
def test_hpa2021_test_layout_predicts_and_another_class_set_is_refused(hpa2021_run: Path, capsys) -> None:
    from hpa_lightning import predict

    test_root = hpa2021_run.parent / "kaggle2021_test"
    out = hpa2021_run.parent / "submission.csv"
    predict.main([f"ckpt={hpa2021_run}", f"input={test_root}", f"out={out}", "workers=0", "progress=false",
                  "classes=hpa2021"])
    probabilities = pd.read_csv(hpa2021_run.parent / "submission_probabilities.csv")
    assert list(probabilities.columns) == ["Id", *class_set("hpa2021").names] and len(probabilities) == 20
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        predict.main([f"ckpt={hpa2021_run}", f"input={test_root}", f"out={out}.2", "workers=0", "classes=hpa2018"])
    error = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and error.count("\n") == 0 and "classes=hpa2018: 28 classes" in error
    assert "trained on 19" in error


@pytest.mark.slow
def test_resuming_with_another_class_set_is_one_line(hpa2021_run: Path, shared_cache: Path, tmp_path: Path) -> None:
    proc = run_train(["+experiment=focal_g02", "+preset=tiny", f"hydra.run.dir={tmp_path / 'run'}",
                      f"ckpt_path={hpa2021_run / 'checkpoints' / 'last.ckpt'}"], shared_cache, REPO)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "trained on 19 classes" in errors[0] and "data.classes=hpa2018 has 28" in errors[0]

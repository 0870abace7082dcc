"""The one run-output writer: thresholds.json by the configured strategy, decisions that follow it, predict's reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from hpa_lightning.classes import CLASS_NAMES, NUM_CLASSES
from hpa_lightning.inference.load import thresholds_from_file
from hpa_lightning.metrics import decide, global_threshold, label_ratio_thresholds, tune_thresholds
from hpa_lightning.runs.outputs import write_evaluation
from tests.conftest import compose_config


def split_result(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    targets = (rng.random((n, NUM_CLASSES)) < 0.15).astype(np.uint8)
    probs = np.clip(targets * 0.4 + rng.random((n, NUM_CLASSES)) * 0.6, 0, 1)
    return {"targets": targets, "probs": probs}


@pytest.mark.parametrize("strategy", ["per_class_f1", "label_ratio", "global"])
def test_thresholds_follow_the_strategy_and_predict_reads_them(tmp_path: Path, strategy: str, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    val, test = split_result(rng, 120), split_result(rng, 80)
    train = (rng.random((400, NUM_CLASSES)) < rng.random(NUM_CLASSES) * 0.3).astype(np.uint8)
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "split.csv").write_text("Id,split\n")
    cfg = compose_config(["+preset=tiny", f"thresholds.strategy={strategy}"])
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
    HydraConfig.instance().set_config(cfg)  # as inside a job: ${hydra:...} resolvable, no hydra node in cfg
    with open_dict(cfg):
        del cfg["hydra"]
    ids = {"val": [f"v{i}" for i in range(120)], "test": [f"t{i}" for i in range(80)]}
    results = write_evaluation(cfg, tmp_path, val, test, ids, tmp_path / "split", train, list(CLASS_NAMES))

    expected = {"per_class_f1": lambda: tune_thresholds(val["targets"], val["probs"], min_positives=5),
                "label_ratio": lambda: label_ratio_thresholds(val["probs"], train.mean(axis=0)),
                "global": lambda: np.full(NUM_CLASSES, global_threshold(val["targets"], val["probs"]))}[strategy]()
    np.testing.assert_array_equal(results["thresholds"], expected)
    assert results["thresholds_strategy"] == strategy
    record = json.loads((tmp_path / "thresholds.json").read_text())
    assert record["strategy"] == strategy and list(record["thresholds"]) == list(CLASS_NAMES)
    thresholds, ensure_one, _ = thresholds_from_file(tmp_path / "thresholds.json", list(CLASS_NAMES))
    np.testing.assert_array_equal(thresholds, expected)  # what predict applies
    for name, result in (("val", val), ("test", test)):
        predictions = pd.read_csv(tmp_path / f"{name}_predictions.csv")
        assert predictions["Id"].tolist() == ids[name]
        np.testing.assert_allclose(predictions[[f"prob_{c}" for c in range(NUM_CLASSES)]], result["probs"], atol=1e-6)
        decided = decide(result["probs"], expected, ensure_one=ensure_one)
        assert predictions["Predicted"].fillna("").astype(str).tolist() == [
            " ".join(str(c) for c in np.flatnonzero(row)) for row in decided]
    if strategy == "label_ratio":  # on val, each class is predicted at its train ratio
        counts = (val["probs"] >= expected).sum(axis=0)
        np.testing.assert_array_equal(counts, np.round(train.mean(axis=0) * 120).astype(int))
